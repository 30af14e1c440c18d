"""The Gemma 3 tokenizer wrapper, on the real tokenizer rebuilt from the demo GGUF."""

from __future__ import annotations

import hashlib

import pytest
import torch

from interp.model.tokenizer import Tokenizer, TokenizerError, TokenizerTypeError

GEMMA3_TOKENIZER_SHA256 = "1299c11d7cf632ef3b4e11937501358ada021bbdf7c47638d13c0ee982f2e79c"

TEXTS = [
    "The capital of France is",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "Emoji: 😀🤔🫩 and flags 🇫🇷 and ❤️",
    "中文字符和日本語のテキスト，한국어도 있어요。",
    "line one\nline two\r\n\n\nline five",
    "runs of spaces: a  b   c    d" + " " * 20 + "e" + " " * 31 + "f",
    "digits 0 12 345 6789 3.14159 1,000,000 2025-01-31",
    "accents: café naïve résumé Ærøskøbing Ångström crème brûlée",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "   leading and trailing spaces   ",
    "mixed\u00a0nbsp\u200bzero-width\ttab",
]


@pytest.fixture(scope="module")
def tok(demo_path) -> Tokenizer:
    return Tokenizer.from_file(demo_path / "tokenizer.model")


@pytest.mark.xfail(strict=True, reason=(
    "pieces, scores and types are Gemma 3's (ids match), but the original file's trainer/normalizer "
    "option fields are unknown: the rebuild is 4,689,066 bytes, Google's 4,689,074"))
def test_rebuilt_tokenizer_is_byte_identical_to_gemma3(demo_path):
    data = (demo_path / "tokenizer.model").read_bytes()
    assert hashlib.sha256(data).hexdigest() == GEMMA3_TOKENIZER_SHA256


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == len(tok) == 262_144
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert tok.stop_ids == {1, 106}


def test_encode_reference_prompt(tok):
    assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    assert tok.encode("The capital of France is", bos=False) == [818, 5279, 529, 7001, 563]


def test_from_bytes_equals_from_file(tok, demo_path):
    other = Tokenizer.from_bytes((demo_path / "tokenizer.model").read_bytes())
    assert [other.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(torch.tensor(tok.encode(text))) == text


def test_ids_match_transformers_gguf_tokenizer(tok, hf_gguf_tokenizer):
    for text in TEXTS:
        assert tok.encode(text) == hf_gguf_tokenizer(text).input_ids, text


def test_to_str_tokens(tok):
    assert tok.to_str_tokens("The capital of France is") == ["<bos>", "The", " capital", " of", " France", " is"]
    assert tok.to_str_tokens("The capital", bos=False) == ["The", " capital"]
    assert tok.to_str_tokens([2, 818, 5279]) == ["<bos>", "The", " capital"]
    assert tok.to_str_tokens(torch.tensor([818, 5279])) == ["The", " capital"]
    # plain text (no byte fallback) joins back to the input
    for text in TEXTS[:2] + TEXTS[4:8]:
        assert "".join(tok.to_str_tokens(text, bos=False)) == text


def test_to_str_tokens_byte_fallback(tok):
    ids = tok.encode("🫩", bos=False)  # too new an emoji for the vocabulary: 4 byte tokens
    assert all(tok.sp.is_byte(i) for i in ids)
    assert tok.to_str_tokens(ids) == ["\\xf0", "\\x9f", "\\xab", "\\xa9"]
    assert tok.decode(ids) == "🫩"
    ascii_byte = tok.sp.piece_to_id("<0x41>")
    assert tok.to_str_tokens([ascii_byte]) == ["A"]


def test_batch_encode_left_and_right_padding(tok):
    texts = ["Hi", "The capital of France is"]
    short, long = tok.encode(texts[0]), tok.encode(texts[1])
    ids, mask = tok.batch_encode(texts)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (2, len(long))
    pad = len(long) - len(short)
    assert ids[0].tolist() == [0] * pad + short and mask[0].tolist() == [0] * pad + [1] * len(short)
    assert ids[1].tolist() == long and mask[1].tolist() == [1] * len(long)
    ids, mask = tok.batch_encode(texts, padding_side="right")
    assert ids[0].tolist() == short + [0] * pad and mask[0].tolist() == [1] * len(short) + [0] * pad
    ids, _ = tok.batch_encode(texts, bos=False)
    assert ids[1].tolist() == long[1:]


def test_chat_template(tok):
    user = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(user) == (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(user, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
    )
    convo = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": " What is 2+2? "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert tok.apply_chat_template(convo) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_encode_chat_has_one_bos(tok):
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [tok.bos_id, tok.start_of_turn_id] and ids.count(tok.bos_id) == 1
    assert ids.count(tok.start_of_turn_id) == 2 and ids.count(tok.end_of_turn_id) == 1
    assert tok.decode(ids[1:]) == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    # same as encoding the rendered text without its literal "<bos>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids == tok.encode(rendered[len("<bos>"):])


def test_chat_matches_transformers_ids(tok, hf_gguf_tokenizer):
    rendered = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}])
    hf_ids = hf_gguf_tokenizer(rendered, add_special_tokens=False).input_ids
    assert tok.encode_chat([{"role": "user", "content": "Name a colour."}]) == hf_ids


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: t.encode(""), "empty string"),
        (lambda t: t.batch_encode([]), "empty list"),
        (lambda t: t.batch_encode(["ok", ""]), r"texts\[1\] is an empty string"),
        (lambda t: t.batch_encode(["ok"], padding_side="middle"), "padding_side"),
        (lambda t: t.decode([5, -1]), r"token id -1 at position 1.*0\.\.262143"),
        (lambda t: t.decode([262_144]), r"token id 262144 .*\[0, 262144\)"),
        (lambda t: t.to_str_tokens([3, 10**6]), r"token id 1000000"),
        (lambda t: t.decode(torch.zeros(2, 3, dtype=torch.long)), "one sequence"),
        (lambda t: t.apply_chat_template([]), "no messages"),
        (lambda t: t.apply_chat_template([{"role": "robot", "content": "x"}]), "role 'robot'"),
        (lambda t: t.apply_chat_template([{"role": "assistant", "content": "x"}]), "alternate"),
        (lambda t: t.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
         "alternate"),
    ],
)
def test_value_errors(tok, call, match):
    with pytest.raises(TokenizerError, match=match) as info:
        call(tok)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.encode(123),
        lambda t: t.encode(["a list"]),
        lambda t: t.batch_encode("one string"),
        lambda t: t.batch_encode(["ok", 7]),
        lambda t: t.decode("text"),
        lambda t: t.decode([1.5]),
        lambda t: t.decode(torch.tensor([1.0])),
        lambda t: t.apply_chat_template("hello"),
        lambda t: t.apply_chat_template([{"role": "user"}]),
    ],
)
def test_type_errors(tok, call):
    with pytest.raises(TokenizerTypeError) as info:
        call(tok)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_bad_model_bytes():
    with pytest.raises(TokenizerError, match="not a valid SentencePiece"):
        Tokenizer.from_bytes(b"definitely not a model")

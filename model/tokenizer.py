"""The Gemma 3 tokenizer: SentencePiece BPE with byte fallback, plus the chat format.

>>> tok = Tokenizer.from_file(demo_dir() / "tokenizer.model")          # doctest: +SKIP
>>> tok.encode("The capital of France is")                             # doctest: +SKIP
[2, 818, 5279, 529, 7001, 563]
>>> tok.to_str_tokens("The capital of France is")                      # doctest: +SKIP
['<bos>', 'The', ' capital', ' of', ' France', ' is']
>>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])       # doctest: +SKIP
'<bos><start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

BOS_TEXT = "<bos>"
_ROLES = ("system", "user", "assistant", "model")


class TokenizerError(ValueError):
    """A tokenizer input that cannot be encoded or decoded (the message says how to fix it)."""


class TokenizerTypeError(TokenizerError, TypeError):
    """A tokenizer input of the wrong type (also a ``TypeError``)."""


class Tokenizer:
    """Gemma 3's SentencePiece tokenizer with interpretability-friendly helpers.

    Build it with :meth:`from_file` (a ``tokenizer.model``) or :meth:`from_bytes` (its bytes).
    ``encode`` prepends BOS (id 2) by default and never appends EOS.

    >>> tok = Tokenizer.from_file("tokenizer.model")                   # doctest: +SKIP
    >>> ids, mask = tok.batch_encode(["Hi", "Hello there"])            # doctest: +SKIP
    >>> ids.shape, mask[0].tolist()                                    # doctest: +SKIP
    (torch.Size([2, 3]), [0, 1, 1])
    """

    def __init__(self, processor: Any) -> None:
        self.sp = processor
        self.vocab_size: int = int(processor.get_piece_size())
        ids = {piece: processor.piece_to_id(piece) for piece in
               ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")}
        self.pad_id, self.eos_id, self.bos_id = ids["<pad>"], ids["<eos>"], ids["<bos>"]
        self.start_of_turn_id, self.end_of_turn_id = ids["<start_of_turn>"], ids["<end_of_turn>"]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bytes(cls, model_proto: bytes) -> Tokenizer:
        """Load from the bytes of a SentencePiece ``tokenizer.model``.

        >>> tok = Tokenizer.from_bytes(read_gguf(path).tokenizer_model)   # doctest: +SKIP
        """
        import sentencepiece as spm

        if not isinstance(model_proto, (bytes, bytearray)) or not model_proto:
            raise TokenizerTypeError("from_bytes() needs the non-empty bytes of a SentencePiece tokenizer.model")
        try:
            return cls(spm.SentencePieceProcessor(model_proto=bytes(model_proto)))
        except RuntimeError as e:
            raise TokenizerError(f"these bytes are not a valid SentencePiece model ({e})") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a SentencePiece ``tokenizer.model`` file (or a directory containing one).

        >>> tok = Tokenizer.from_file(demo_dir())                          # doctest: +SKIP
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.model at {path!r}")
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    # ------------------------------------------------------------------ properties
    @property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end generation: EOS (1) and ``<end_of_turn>`` (106)."""
        return frozenset({self.eos_id, self.end_of_turn_id})

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS prepended when ``bos`` (the default).

        A literal ``"<bos>"`` at the very start (as in a rendered chat) is read as the BOS
        token itself, so it is never doubled.

        >>> tok.encode("The capital of France is")                     # doctest: +SKIP
        [2, 818, 5279, 529, 7001, 563]
        >>> tok.encode("Hi", bos=False)                                # doctest: +SKIP
        [10979]
        """
        if not isinstance(text, str):
            raise TokenizerTypeError(
                f"encode() takes a str, got {type(text).__name__}; for several texts use batch_encode()"
            )
        if text.startswith(BOS_TEXT):
            text, bos = text[len(BOS_TEXT):], True
            if not text:
                return [self.bos_id]
        if not text:
            raise TokenizerError(
                "cannot encode an empty string; pass some text (a BOS-only prompt is just [tok.bos_id])"
            )
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Any) -> str:
        """The text of a sequence of token ids (list, tuple or 1-D tensor).

        Control tokens (``<pad>``, ``<eos>``, ``<bos>``) decode to nothing; chat markers such as
        ``<start_of_turn>`` decode to their text.

        >>> tok.decode([2, 818, 5279, 529, 7001, 563])                 # doctest: +SKIP
        'The capital of France is'
        """
        return str(self.sp.decode(self._check_ids(ids, "decode")))

    def to_str_tokens(self, text_or_ids: Any, bos: bool = True) -> list[str]:
        """The text of each token: of ``encode(text, bos)`` for a string, else of the given ids.

        SentencePiece's ``▁`` becomes a space; control tokens keep their names (``'<bos>'``);
        a byte-fallback token shows its character when it is a whole ASCII character, else
        an escape such as ``'\\xf0'`` (one byte of a longer UTF-8 character).

        >>> tok.to_str_tokens("Hi there")                              # doctest: +SKIP
        ['<bos>', 'Hi', ' there']
        """
        if isinstance(text_or_ids, str):
            ids = self.encode(text_or_ids, bos=bos)
        else:
            ids = self._check_ids(text_or_ids, "to_str_tokens")
        return [self._token_text(i) for i in ids]

    def _token_text(self, token_id: int) -> str:
        piece = str(self.sp.id_to_piece(token_id))
        if self.sp.is_byte(token_id):
            value = int(piece[3:-1], 16)
            return chr(value) if value < 0x80 else f"\\x{value:02x}"
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return piece
        return piece.replace("\u2581", " ")

    def batch_encode(
        self, texts: Sequence[str], bos: bool = True, padding_side: str = "left"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode several texts into padded ``ids`` and ``attention_mask`` LongTensors ``[b, s]``.

        Padding uses ``pad_id`` (0) and mask 0; ``padding_side`` is ``"left"`` (the default, what
        generation wants: every prompt ends at the last position) or ``"right"``.

        >>> ids, mask = tok.batch_encode(["Hi", "Hello there"], padding_side="right")  # doctest: +SKIP
        >>> mask.tolist()                                              # doctest: +SKIP
        [[1, 1, 0], [1, 1, 1]]
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TokenizerTypeError(
                f"batch_encode() takes a list of str, got {type(texts).__name__}; for one text use encode()"
            )
        if len(texts) == 0:
            raise TokenizerError("batch_encode() got an empty list; pass at least one text")
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TokenizerTypeError(f"batch_encode() texts[{i}] is {type(t).__name__}, not str")
            if not t:
                raise TokenizerError(f"batch_encode() texts[{i}] is an empty string; remove it or add text")
        seqs = [self.encode(t, bos=bos) for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return ids, mask

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation in the Gemma 3 instruction format (as Hugging Face's template does).

        Roles: an optional leading ``system`` message (folded into the first user turn as written,
        followed by a blank line), then alternating ``user`` and ``assistant`` (or ``model``) turns,
        whose contents are stripped. With ``add_generation_prompt`` the string ends with an open model turn.

        >>> tok.apply_chat_template([{"role": "system", "content": "Be brief."},
        ...                          {"role": "user", "content": "Hi"}])   # doctest: +SKIP
        '<bos><start_of_turn>user\\nBe brief.\\n\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
        """
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TokenizerTypeError(
                "messages must be a list of {'role': ..., 'content': ...} dicts, "
                f"got {type(messages).__name__}"
            )
        if not messages:
            raise TokenizerError("apply_chat_template() got no messages; pass at least one user message")
        for i, m in enumerate(messages):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise TokenizerTypeError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")
            if m["role"] not in _ROLES:
                raise TokenizerError(f"messages[{i}] has role {m['role']!r}; use one of {list(_ROLES)}")
        prefix, turns = "", list(messages)
        if turns[0]["role"] == "system":  # kept as written (not stripped), as Gemma 3's template does
            prefix, turns = turns[0]["content"] + "\n\n", turns[1:]
        parts = [BOS_TEXT]
        for i, m in enumerate(turns):
            role = "model" if m["role"] in ("assistant", "model") else m["role"]
            expected = "user" if i % 2 == 0 else "model"
            if role != expected:
                raise TokenizerError(
                    f"turn {i} has role {m['role']!r} but {expected!r} was expected: after an optional "
                    "leading system message, roles must alternate user/assistant/user/..."
                )
            parts.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{m['content'].strip()}<end_of_turn>\n")
        if add_generation_prompt:
            parts.append("<start_of_turn>model\n")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of :meth:`apply_chat_template`, with exactly one BOS.

        >>> ids = tok.encode_chat([{"role": "user", "content": "Hi"}])   # doctest: +SKIP
        >>> ids[:3], ids.count(tok.bos_id)                             # doctest: +SKIP
        ([2, 105, 2364], 1)
        """
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), bos=True)

    # ------------------------------------------------------------------ helpers
    def _check_ids(self, ids: Any, where: str) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise TokenizerError(
                    f"{where}() takes one sequence, got a tensor of shape {tuple(ids.shape)}; "
                    f"call it per row, e.g. [tok.{where}(row) for row in ids]"
                )
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise TokenizerTypeError(f"{where}() needs integer token ids, got a {ids.dtype} tensor")
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TokenizerTypeError(
                f"{where}() takes a list or 1-D tensor of token ids, got {type(ids).__name__}"
            )
        out = []
        for pos, i in enumerate(ids):
            if isinstance(i, bool) or not hasattr(i, "__index__"):
                raise TokenizerTypeError(f"{where}(): token at position {pos} is {i!r}, not an int")
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"{where}(): token id {i} at position {pos} is outside the vocabulary; "
                    f"valid ids are 0..{self.vocab_size - 1} (range [0, {self.vocab_size}))"
                )
            out.append(i)
        return out

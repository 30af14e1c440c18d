"""What the model accepts as input, and the clear InputError it gives for what it cannot run.

After any rejected input the model is unchanged: same logits as before, no hooks left behind.
"""

from __future__ import annotations

import pytest
import torch

from interp.model import Gemma3, Gemma3Config, InputError

VOCAB, MAX_POS = 100, 16
CFG = Gemma3Config(n_layers=6, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, d_head=8, vocab_size=VOCAB,
                   window=4, max_positions=MAX_POS)


@pytest.fixture(scope="module")
def model() -> Gemma3:
    m = Gemma3.from_config(CFG, seed=0)
    assert m.tokenizer is None
    return m


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def clean(model, ids) -> torch.Tensor:
    return model(ids)


@pytest.fixture(autouse=True)
def _unchanged(model, ids, clean):
    """Every test ends with no hooks active and the model giving its original logits."""
    yield
    assert model.registry.active == {}
    assert torch.equal(model(ids), clean)


def _runs(model):
    """The three ways to run the model; each must reject bad input the same way."""
    return {
        "call": lambda x, **kw: model(x, **kw),
        "run_with_hooks": lambda x, **kw: model.run_with_hooks(x, {"blocks.*.resid_post": lambda t, s: t * 0}, **kw),
        "run_with_cache": lambda x, **kw: model.run_with_cache(x, names=None, **kw),
    }


def _rejects(model, x, match: str | None = None, **kwargs) -> list[str]:
    """Assert every entry point raises InputError on ``x``; return the messages."""
    messages = []
    for how, run in _runs(model).items():
        with pytest.raises(InputError) as info:
            run(x, **kwargs)
        msg = str(info.value)
        if match is not None:
            assert match in msg, f"{how}: {msg!r} lacks {match!r}"
        messages.append(msg)
        assert model.registry.active == {}, how
    return messages


# ---------------------------------------------------------------------------- text without tokenizer
@pytest.mark.parametrize("text", ["The capital of France is", ["a", "b c"], ("one text",)])
def test_text_needs_a_tokenizer(model, text):
    for msg in _rejects(model, text):
        assert "tokenizer" in msg
        assert "token ids" in msg  # says what to do instead


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


# ---------------------------------------------------------------------------- ids out of range
@pytest.mark.parametrize("bad", [-1, -100, VOCAB, VOCAB + 7, 10**6])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_id_out_of_range_names_id_and_range(model, bad, as_tensor):
    x = [[2, 5, bad, 7]]
    if as_tensor:
        x = torch.tensor(x)
    for msg in _rejects(model, x):
        assert str(bad) in msg
        assert f"[0, {VOCAB})" in msg


def test_both_ends_out_of_range(model):
    for msg in _rejects(model, torch.tensor([[-3, 5, VOCAB]])):
        assert "-3" in msg or str(VOCAB) in msg


def test_id_too_big_for_int64_is_an_input_error(model):
    """An absurd id in a Python list should get the same clear message, not a torch overflow."""
    for msg in _rejects(model, [2, 5, 2**70]):
        assert str(2**70) in msg or "vocabulary" in msg


def test_boundary_ids_are_accepted(model):
    out = model(torch.tensor([[0, VOCAB - 1]]))
    assert out.shape == (1, 2, VOCAB)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------- empty input
@pytest.mark.parametrize("x", [
    [],
    (),
    torch.tensor([], dtype=torch.long),
    torch.zeros(1, 0, dtype=torch.long),
    torch.zeros(0, 5, dtype=torch.long),
], ids=["list", "tuple", "tensor_1d", "tensor_1x0", "tensor_0x5"])
def test_empty_input(model, x):
    for msg in _rejects(model, x):
        assert "empty" in msg


@pytest.mark.parametrize("x", [[[]], [[], []]], ids=["one_empty_row", "two_empty_rows"])
def test_empty_rows_say_empty(model, x):
    """`[[]]` is empty input; the message should say so (not talk about float dtypes)."""
    for msg in _rejects(model, x):
        assert "empty" in msg


def test_empty_float_tensor(model):
    _rejects(model, torch.tensor([]))


# ---------------------------------------------------------------------------- too long
def test_longer_than_max_positions(model):
    for msg in _rejects(model, torch.zeros(1, MAX_POS + 1, dtype=torch.long)):
        assert str(MAX_POS + 1) in msg and str(MAX_POS) in msg
    _rejects(model, [1] * (MAX_POS + 5))


def test_exactly_max_positions_runs(model):
    assert model(torch.ones(1, MAX_POS, dtype=torch.long)).shape == (1, MAX_POS, VOCAB)


# ---------------------------------------------------------------------------- wrong types and shapes
@pytest.mark.parametrize("x", [
    torch.tensor([[1.0, 2.0, 3.0]]),
    torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16),
    [1.5, 2.0],
    [[1.0, 2.0]],
    torch.tensor([[True, False]]),
], ids=["float32", "bfloat16", "list_floats", "nested_floats", "bool"])
def test_non_integer_ids(model, x):
    for msg in _rejects(model, x):
        assert "integer" in msg


@pytest.mark.parametrize("x", [
    [[1, 2, 3], [4, 5]],
    [[1], [2, 3], [4, 5, 6]],
    ([1, 2], [3]),
], ids=["two_rows", "three_rows", "tuple_rows"])
def test_ragged_rows(model, x):
    for msg in _rejects(model, x):
        assert "different lengths" in msg
        assert "attention_mask" in msg  # says how to fix it


@pytest.mark.parametrize("x", [
    [[1, 2], 3],
    [[[1]], [[2, 3]]],
], ids=["mixed_row_and_int", "ragged_3d"])
def test_malformed_nested_lists_are_input_errors(model, x):
    _rejects(model, x)


@pytest.mark.parametrize("x", [torch.zeros(1, 2, 3, dtype=torch.long), torch.tensor(5)], ids=["3d", "0d"])
def test_wrong_rank(model, x):
    _rejects(model, x)


@pytest.mark.parametrize("x", [{"ids": [1, 2]}, 3, None], ids=["dict", "int", "none"])
def test_unsupported_input_type(model, x):
    _rejects(model, x)


# ---------------------------------------------------------------------------- attention_mask
@pytest.mark.parametrize("mask", [
    torch.ones(2, 5, dtype=torch.long),
    torch.ones(2, 7, dtype=torch.long),
    torch.ones(1, 6, dtype=torch.long),
    torch.ones(3, 6, dtype=torch.long),
    torch.ones(6, dtype=torch.long),
    torch.ones(2, 6, 1, dtype=torch.long),
], ids=["short", "long", "one_row", "three_rows", "1d_broadcast", "3d"])
def test_mask_of_wrong_shape(model, ids, mask):
    for msg in _rejects(model, ids, attention_mask=mask):
        assert "attention_mask" in msg
        assert str(tuple(ids.shape)) in msg


def test_mask_with_an_all_zero_row(model, ids):
    mask = torch.ones_like(ids)
    mask[1] = 0
    for msg in _rejects(model, ids, attention_mask=mask):
        assert "all zeros" in msg or "all-zero" in msg


@pytest.mark.parametrize("mask", [[[1, 1, 2, 1, 1, 1]], [[1, -1, 1, 1, 1, 1]], [[0.5, 1, 1, 1, 1, 1]]],
                         ids=["two", "minus_one", "half"])
def test_mask_values_other_than_0_and_1(model, mask):
    _rejects(model, torch.tensor([[5, 6, 7, 8, 9, 10]]), attention_mask=torch.tensor(mask))


def test_all_ones_mask_equals_no_mask(model, ids, clean):
    for mask in (torch.ones_like(ids), torch.ones(ids.shape, dtype=torch.bool), torch.ones(ids.shape).tolist()):
        assert torch.equal(model(ids, attention_mask=mask), clean)
    for how, run in _runs(model).items():
        out = run(ids, attention_mask=torch.ones_like(ids))
        ref = run(ids)
        out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
        assert torch.equal(out, ref), how


def test_bool_and_int_masks_agree(model, ids):
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    assert torch.equal(model(ids, attention_mask=mask), model(ids, attention_mask=mask.bool()))


# ---------------------------------------------------------------------------- accepted forms
def test_1d_ids_work_like_a_batch_of_one(model, ids, clean):
    row = ids[1]
    out = model(row)
    assert out.shape == (1, ids.shape[1], VOCAB)
    torch.testing.assert_close(out[0], clean[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(model(row.tolist()), out)
    assert torch.equal(model(row[None]), out)
    assert torch.equal(model(tuple(row.tolist())), out)
    _, cache = model.run_with_cache(row, names="blocks.0.resid_pre")
    assert cache["blocks.0.resid_pre"].shape == (1, ids.shape[1], CFG.d_model)


def test_list_of_lists_equals_tensor(model, ids, clean):
    assert torch.equal(model(ids.tolist()), clean)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_other_integer_dtypes(model, ids, clean, dtype):
    assert torch.equal(model(ids.to(dtype)), clean)


def test_single_token(model):
    out = model([7])
    assert out.shape == (1, 1, VOCAB)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------- bf16 model
@pytest.fixture(scope="module")
def bf16_model() -> Gemma3:
    return Gemma3.from_config(CFG, seed=0, dtype=torch.bfloat16)


def test_bf16_model_runs_and_gives_bf16_logits(bf16_model, ids, clean):
    assert bf16_model.dtype == torch.bfloat16
    logits = bf16_model(ids)
    assert logits.dtype == torch.bfloat16
    assert logits.shape == clean.shape
    assert torch.isfinite(logits).all()
    # the same weights, rounded: close to the fp32 model's logits
    torch.testing.assert_close(logits.float(), clean, rtol=0.1, atol=0.1)


def test_bf16_model_cache_and_padding(bf16_model, ids):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits, cache = bf16_model.run_with_cache(ids, names=None, attention_mask=mask)
    assert logits.dtype == torch.bfloat16
    assert {t.dtype for t in cache.values()} == {torch.bfloat16}
    assert torch.isfinite(logits).all()
    # bf16 rejects bad input the same way
    with pytest.raises(InputError):
        bf16_model(torch.tensor([[VOCAB]]))
    assert bf16_model.registry.active == {}

"""Mistakes that used to fail cryptically (deep in torch, or silently) are clear errors.

Each case asserts the exception type and what its message says, then that the model is still
usable: no hooks left in this context and logits bit-identical to before.
"""

from __future__ import annotations

import re

import pytest
import support
import torch

from interp.hooks import HookError, PositionError, UnknownSiteError
from interp.model import CacheTooLargeError, Gemma3Config, InputError

CFG3 = Gemma3Config(n_layers=3, d_model=16, d_mlp=32, n_heads=2, n_kv_heads=1, d_head=8, vocab_size=50,
                    window=4, max_positions=16)


@pytest.fixture(scope="module")
def m():
    model = support.make_model(support.TINY, tokenizer=support.FakeTokenizer(support.TINY.vocab_size))
    yield model
    assert not model.registry.active, "a test left hooks on the module's model"


@pytest.fixture(scope="module")
def m3():
    model = support.make_model(CFG3)
    yield model
    assert not model.registry.active


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.tensor([[2, 5, 9, 14, 3], [2, 8, 1, 4, 6]])


@pytest.fixture(scope="module")
def clean(m, ids) -> torch.Tensor:
    return m(ids)


@pytest.fixture(scope="module")
def ids3() -> torch.Tensor:
    return torch.tensor([[2, 5, 9, 14, 3]])


@pytest.fixture(scope="module")
def clean3(m3, ids3) -> torch.Tensor:
    return m3(ids3)


def _assert_usable(m, ids, clean) -> None:
    assert not m.registry.active
    assert torch.equal(m(ids), clean)


# ----------------------------------------------------------------------------- logits_at
@pytest.mark.parametrize("at", [5, -6, [0, 5], 100])
def test_logits_at_out_of_range_is_a_position_error(m, ids, clean, at):
    with pytest.raises(PositionError, match=r"logits_at=-?\d+ is out of range: valid are 0\.\.4 \(or -5\.\.-1"):
        m(ids, logits_at=at)
    _assert_usable(m, ids, clean)


def test_logits_at_per_row_out_of_range_is_a_position_error(m, ids, clean):
    with pytest.raises(PositionError, match=r"logits_at=7 is out of range: valid are 0\.\.4"):
        m(ids, logits_at=torch.tensor([[0, 4], [7, 1]]))
    with pytest.raises(IndexError):  # PositionError is an IndexError (and a ValueError)
        m(ids, logits_at=torch.tensor([[0], [-6]]))
    assert issubclass(PositionError, IndexError) and issubclass(PositionError, ValueError)
    _assert_usable(m, ids, clean)
    # the valid per-row form still works after the errors
    out = m(ids, logits_at=torch.tensor([[4], [0]]))
    torch.testing.assert_close(out[:, 0], torch.stack([clean[0, 4], clean[1, 0]]))  # a smaller matmul: rounding


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("n", [0, -1, 1.5, True, "3", None])
def test_generate_max_new_tokens_must_be_a_positive_int(m, ids, clean, n):
    with pytest.raises(InputError, match=re.escape(f"max_new_tokens must be a positive int, got {n!r}")):
        m.generate(ids[:1], max_new_tokens=n)
    _assert_usable(m, ids, clean)


@pytest.mark.parametrize("t", [-1, -0.01, float("nan")])
def test_generate_temperature_must_not_be_negative(m, ids, clean, t):
    with pytest.raises(InputError, match=r"temperature must be >= 0 \(0 = greedy\)"):
        m.generate(ids[:1], max_new_tokens=2, temperature=t)
    _assert_usable(m, ids, clean)


@pytest.mark.parametrize("k", [0, -3, 2.0])
def test_generate_top_k_must_be_positive(m, ids, clean, k):
    with pytest.raises(InputError, match=re.escape(f"top_k must be a positive int (or None for the whole vocabulary), "
                                                   f"got {k!r}")):
        m.generate(ids[:1], max_new_tokens=2, temperature=1.0, top_k=k)
    _assert_usable(m, ids, clean)
    assert m.generate(ids[:1], max_new_tokens=2, temperature=1.0, top_k=1, seed=0).ids.shape == (1, 2)


def test_generate_hooks_are_gone_after_an_input_error(m, ids, clean):
    seen = []
    with pytest.raises(InputError, match="max_new_tokens"):
        m.generate(ids[:1], max_new_tokens=0, hooks={"blocks.0.mlp.out": lambda x, s: seen.append(s.name)})
    assert seen == []
    _assert_usable(m, ids, clean)


# ----------------------------------------------------------------------------- layer bounds
@pytest.mark.parametrize("stop", [9, -1, 4])
def test_stop_at_layer_outside_the_model_names_the_valid_range(m3, ids3, clean3, stop):
    with pytest.raises(InputError, match=rf"stop_at_layer={stop} is outside 0\.\.3.*stops before"):
        m3(ids3, stop_at_layer=stop)
    with pytest.raises(InputError, match=rf"stop_at_layer={stop} is outside 0\.\.3"):
        m3.run_with_cache(ids3, stop_at_layer=stop)
    _assert_usable(m3, ids3, clean3)


@pytest.mark.parametrize("start", [4, -1])
def test_start_at_layer_outside_the_model_names_the_valid_range(m3, ids3, clean3, start):
    resid = m3(ids3, stop_at_layer=1)
    with pytest.raises(InputError, match=rf"start_at_layer={start} is outside 0\.\.3"):
        m3(resid, start_at_layer=start)
    _assert_usable(m3, ids3, clean3)


def test_start_after_stop_is_an_input_error(m3, ids3, clean3):
    resid = m3(ids3, stop_at_layer=2)
    with pytest.raises(InputError, match=r"stop_at_layer=1 is outside 2\.\.3"):
        m3(resid, start_at_layer=2, stop_at_layer=1)
    with pytest.raises(InputError, match=r"stop_at_layer=1 is outside 2\.\.3"):
        m3.run_with_cache(resid, start_at_layer=2, stop_at_layer=1)
    _assert_usable(m3, ids3, clean3)


@pytest.mark.parametrize("stop", [1.0, "2", True])
def test_layer_bounds_must_be_ints(m3, ids3, clean3, stop):
    with pytest.raises(InputError, match=r"stop_at_layer must be an int"):
        m3(ids3, stop_at_layer=stop)
    _assert_usable(m3, ids3, clean3)


# ----------------------------------------------------------------------------- hooks
def test_a_hook_returning_a_tensor_on_another_device_is_a_hook_error(m, ids, clean):
    def to_meta(x, site):
        return torch.empty_like(x, device="meta")

    with pytest.raises(HookError, match=r"'blocks\.2\.mlp\.out'.*device"):
        m.run_with_hooks(ids, {"blocks.2.mlp.out": to_meta})
    with pytest.raises(HookError, match=r"'blocks\.2\.mlp\.out' returned a tensor on meta, but the site is on cpu"):
        m.run_with_cache(ids, names="logits", hooks={"blocks.2.mlp.out": to_meta})
    _assert_usable(m, ids, clean)


def test_one_function_through_two_specs_of_one_scope_would_run_twice(m, ids, clean):
    calls = []

    def f(x, site):
        calls.append(site.name)

    with pytest.raises(ValueError, match=r"'blocks\.0\.mlp\.out'.*'blocks\.\*\.mlp\.out'.*would run twice"):
        with m.hooks({"blocks.0.mlp.out": f, "blocks.*.mlp.out": f}):
            pytest.fail("the scope must not open")
    with pytest.raises(ValueError, match="would run twice"):
        m.run_with_hooks(ids, [("blocks.0.mlp.out", f), ("model.layers.0.mlp.down_proj", f)])  # name and alias
    assert calls == []
    _assert_usable(m, ids, clean)
    # the same (spec, f) pair listed twice runs f twice, as written
    m.run_with_hooks(ids, [("blocks.0.mlp.out", f), ("blocks.0.mlp.out", f)])
    assert calls == ["blocks.0.mlp.out", "blocks.0.mlp.out"]
    # and two different functions through two specs are fine
    calls.clear()
    m.run_with_hooks(ids, {"blocks.0.mlp.out": f, "blocks.*.mlp.out": lambda x, s: calls.append("glob")})
    assert calls == ["blocks.0.mlp.out"] + ["glob"] * support.TINY.n_layers
    _assert_usable(m, ids, clean)


def test_a_glob_that_matches_nothing_suggests_the_right_glob_first(m, ids, clean):
    with pytest.raises(UnknownSiteError, match=r"unknown site 'blocks\.\*\.mlp\.outt'\. Did you mean: "
                                               r"blocks\.\*\.mlp\.out[,?]"):
        with m.hooks({"blocks.*.mlp.outt": lambda x, s: None}):
            pytest.fail("the scope must not open")
    with pytest.raises(UnknownSiteError, match=r"Did you mean: blocks\.\*\.mlp\.out[,?]"):
        m.run_with_cache(ids, names="blocks.*.mlp.outt")
    _assert_usable(m, ids, clean)


# ----------------------------------------------------------------------------- inputs
def test_an_empty_prompt_is_an_input_error(m, ids, clean):
    with pytest.raises(InputError, match="empty prompt"):
        m("")
    with pytest.raises(InputError, match="empty input"):
        m([])
    with pytest.raises(InputError, match="empty input"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="empty prompt"):
        m.generate("", max_new_tokens=1)
    _assert_usable(m, ids, clean)


@pytest.mark.parametrize("bad", [100, -1, 10**6])
def test_token_ids_out_of_range_are_an_input_error(m, ids, clean, bad):
    with pytest.raises(InputError, match=rf"token id {bad} is outside the vocabulary \[0, 100\)"):
        m(torch.tensor([[2, bad, 5]]))
    with pytest.raises(InputError, match=rf"token id {bad} is outside the vocabulary"):
        m.run_with_cache(torch.tensor([[2, 3, bad]]), names="embed")
    _assert_usable(m, ids, clean)


def test_a_too_long_sequence_is_an_input_error(m3, ids3, clean3):
    long = torch.full((1, 17), 3)
    with pytest.raises(InputError, match=r"sequence of 17 tokens is longer than the model's 16 positions"):
        m3(long)
    with pytest.raises(InputError, match=r"16 positions"):
        m3.generate(torch.full((1, 10), 3), max_new_tokens=7)
    assert m3(torch.full((1, 16), 3)).shape == (1, 16, CFG3.vocab_size)  # exactly max_positions is fine
    _assert_usable(m3, ids3, clean3)


# ----------------------------------------------------------------------------- cache size
def test_cache_too_large_reports_bytes_not_zero_mib(m, ids, clean):
    # 2 x 5 x 32 float32 = 1280 bytes against a limit of 100 bytes
    with pytest.raises(CacheTooLargeError, match=r"needs about 1\.2 KiB, over the limit of 100 B\b") as info:
        m.run_with_cache(ids, names="blocks.0.resid_post", max_bytes=100)
    assert "0.0 MiB" not in str(info.value) and "0.0 KiB" not in str(info.value)
    assert isinstance(info.value, MemoryError)
    # 1 x 1 x 32 float32 = 128 bytes: both sizes in bytes
    with pytest.raises(CacheTooLargeError, match=r"needs about 128 B, over the limit of 100 B\b"):
        m.run_with_cache(ids[:1], names="blocks.0.resid_post", positions=[-1], max_bytes=100)
    _assert_usable(m, ids, clean)

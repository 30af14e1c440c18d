"""Gradients, backward hooks, caches that fit, partial runs, the key/value prefix and generation."""

from __future__ import annotations

import pytest
import torch

from interp.hooks import ActivationCache
from interp.model import CacheTooLargeError, Gemma3, Gemma3Config, InputError, KVCache

CFG = Gemma3Config(n_layers=6, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, d_head=8, vocab_size=100,
                   window=4, rope_global_factor=8.0)
IDS = torch.tensor([[2, 17, 5, 9, 33, 41, 7, 12, 60, 3, 8]])


@pytest.fixture(scope="module")
def m() -> Gemma3:
    model = Gemma3.from_config(CFG, seed=3)
    with torch.no_grad():  # larger weights than the N(0, 0.02) default, so nothing is near zero
        model.embed.weight.mul_(50)
    return model


@pytest.fixture(autouse=True)
def no_hooks_left(m):
    yield
    assert not m.registry.active


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, 7] - logits[0, -1, 9]


# ---------------------------------------------------------------------- gradients
def test_gradients_match_autograd_by_hand(m):
    names = ["embed", "blocks.2.resid_post", "blocks.3.attn.pattern", "blocks.4.mlp.hidden", "final_norm"]
    logits, cache, grads = m.run_with_grads(IDS, metric, names)
    assert set(grads) == set(names) and not logits.requires_grad
    torch.testing.assert_close(logits, m(IDS), rtol=0, atol=1e-5)

    # by hand: a leaf at the residual after layer 2, the rest of the model on top of it
    resid = cache["blocks.2.resid_post"].clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(metric(m(resid, start_at_layer=3)), resid)
    torch.testing.assert_close(grads["blocks.2.resid_post"], g, rtol=1e-5, atol=1e-6)

    # by hand: a leaf at the embedding output
    emb = cache["embed"].clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(metric(m(emb, start_at_layer=0)), emb)
    torch.testing.assert_close(grads["embed"], g, rtol=1e-5, atol=1e-6)

    # by hand: the pattern of layer 3, replaced by a leaf through a hook
    pattern = cache["blocks.3.attn.pattern"].clone().requires_grad_(True)
    with torch.enable_grad():
        out = m.run_with_hooks(IDS, {"blocks.3.attn.pattern": lambda x, site: pattern})
        (g,) = torch.autograd.grad(metric(out), pattern)
    torch.testing.assert_close(grads["blocks.3.attn.pattern"], g, rtol=1e-5, atol=1e-6)
    assert grads["blocks.4.mlp.hidden"].shape == (1, IDS.shape[1], CFG.d_mlp)


def test_gradients_of_positions_after_the_metric_are_zero(m):
    _, _, grads = m.run_with_grads(IDS, lambda logits: logits[0, 4, 3], "blocks.1.resid_post")
    g = grads["blocks.1.resid_post"][0]
    assert g[5:].abs().max() == 0 and g[:5].abs().max() > 0  # causal: later tokens cannot matter


def test_metric_must_be_a_scalar(m):
    with pytest.raises(ValueError, match="scalar"):
        m.run_with_grads(IDS, lambda logits: logits[0, -1], "embed")


def test_backward_hooks_see_and_replace_gradients(m):
    _, _, grads = m.run_with_grads(IDS, metric, "blocks.1.resid_post")
    seen = {}

    def double(grad, site):
        seen[site.name] = grad.clone()
        return grad * 2

    with m.backward_hooks({"blocks.3.resid_post": double}):
        _, _, doubled = m.run_with_grads(IDS, metric, "blocks.1.resid_post")
    assert "blocks.3.resid_post" in seen
    torch.testing.assert_close(doubled["blocks.1.resid_post"], 2 * grads["blocks.1.resid_post"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- caches that fit
def test_estimate_equals_the_bytes_actually_cached(m):
    for kwargs in ({}, {"dtype": torch.bfloat16}, {"positions": [-1, 2]}, {"positions": slice(3, 7)}):
        _, cache = m.run_with_cache(IDS, **kwargs)
        estimate = m.estimate_cache_bytes(None, 1, IDS.shape[1], kwargs.get("dtype"), kwargs.get("positions"))
        assert estimate == cache.nbytes, kwargs


def test_cache_positions_keep_those_positions(m):
    _, full = m.run_with_cache(IDS)
    _, last = m.run_with_cache(IDS, positions=[-1])
    assert torch.equal(last["blocks.2.resid_post"], full["blocks.2.resid_post"][:, -1:])
    assert torch.equal(last["blocks.2.attn.pattern"], full["blocks.2.attn.pattern"][:, :, -1:])  # query axis
    assert torch.equal(last["blocks.2.attn.k"], full["blocks.2.attn.k"][:, -1:])


def test_too_large_a_cache_is_refused_before_running_with_options(m):
    calls = []
    with pytest.raises(CacheTooLargeError) as err:
        m.run_with_cache(IDS, hooks={"embed": lambda x, site: calls.append(1)}, max_bytes=10_000)
    text = str(err.value)
    assert "needs about" in text and "torch.bfloat16" in text and "positions=[-1]" in text
    assert calls == [] and not m.registry.active  # refused before the forward ran
    m.run_with_cache(IDS, names="blocks.*.resid_post", max_bytes=10_000)  # a subset that fits


def test_cache_save_and_load_round_trip(m, tmp_path):
    _, cache = m.run_with_cache(IDS, names=["blocks.*.resid_post", "blocks.0.attn.pattern"], dtype=torch.bfloat16)
    cache.save(tmp_path / "run.safetensors")
    back = ActivationCache.load(tmp_path / "run.safetensors")
    assert set(back) == set(cache)
    for name in cache:
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], cache[name])


def test_accumulated_and_decomposed_residual(m):
    _, cache = m.run_with_cache(IDS)
    stages, labels = cache.accumulated_resid()
    assert stages.shape == (CFG.n_layers + 1, 1, IDS.shape[1], CFG.d_model)
    assert labels[0] == "blocks.0.resid_pre" and labels[-1] == f"blocks.{CFG.n_layers - 1}.resid_post"
    parts, _ = cache.decompose_resid(layer=3)
    torch.testing.assert_close(parts.sum(0), cache["blocks.3.resid_pre"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- partial runs
@pytest.mark.parametrize("layer", range(CFG.n_layers + 1))
def test_stop_then_start_at_every_layer_is_the_whole_run(m, layer):
    resid = m(IDS, stop_at_layer=layer)
    assert resid.shape == (1, IDS.shape[1], CFG.d_model)
    assert torch.equal(m(resid, start_at_layer=layer), m(IDS))


def test_logits_at_chosen_positions(m):
    full = m(IDS)

    def same(a, b):  # a matmul over fewer rows may round differently: fp32 rounding, not bits
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)

    same(m(IDS, logits_at=-1), full[:, -1:])
    same(m(IDS, logits_at=[0, 4]), full[:, [0, 4]])
    same(m(IDS, logits_at=slice(2, 5)), full[:, 2:5])
    two = torch.cat([IDS, IDS.flip(1)])
    per_row = m(two, logits_at=torch.tensor([[3], [5]]))
    full2 = m(two)
    assert per_row.shape == (2, 1, CFG.vocab_size)
    same(per_row[:, 0], torch.stack([full2[0, 3], full2[1, 5]]))


def test_start_at_layer_needs_a_residual(m):
    with pytest.raises(InputError, match="residual stream"):
        m(IDS, start_at_layer=2)
    with pytest.raises(InputError, match="outside"):
        m(torch.zeros(1, 3, CFG.d_model), start_at_layer=CFG.n_layers + 1)


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("split", [3, 4, 9])  # row 1 has 2 padding tokens: a prefix needs a real one
def test_prefix_reuse_equals_the_whole_run(m, eager, split):
    m.attn_impl = "eager" if eager else "auto"
    try:
        mask = torch.ones(2, IDS.shape[1], dtype=torch.long)
        mask[1, :2] = 0  # left padding in row 1
        ids = torch.cat([IDS, IDS.roll(3, 1)])
        full = m(ids, mask)
        kv = KVCache.empty(CFG, batch=2)
        m(ids[:, :split], mask[:, :split], kv_cache=kv)
        rest = m(ids[:, split:], mask, kv_cache=kv)
        torch.testing.assert_close(rest, full[:, split:], rtol=0, atol=2e-5)
        assert kv.length == ids.shape[1]  # the growing cache now holds every token
        kv2 = KVCache.empty(CFG, batch=2)  # its own padding mask stands in for attention_mask
        m(ids[:, :split], mask[:, :split], kv_cache=kv2)
        torch.testing.assert_close(m(ids[:, split:], kv_cache=kv2), rest, rtol=0, atol=0)
        # the same prefix from a cache, for the layers above 2 only
        _, cache = m.run_with_cache(ids, ["blocks.*.attn.k_rot", "blocks.*.attn.v", "blocks.3.resid_pre"],
                                     attention_mask=mask)
        prefix = KVCache.from_cache(cache, split, CFG, layers=range(3, CFG.n_layers))
        part = m(cache["blocks.3.resid_pre"][:, split:], mask, start_at_layer=3, kv_cache=prefix)
        torch.testing.assert_close(part, full[:, split:], rtol=0, atol=2e-5)
    finally:
        m.attn_impl = "auto"


def test_prefix_mask_must_cover_prefix_and_new_tokens(m):
    kv = KVCache.empty(CFG, batch=1)
    m(IDS[:, :4], kv_cache=kv)
    with pytest.raises(InputError, match="prefix"):
        m(IDS[:, 4:], torch.ones(1, 7), kv_cache=kv)


# ---------------------------------------------------------------------- generation
def test_greedy_generation_equals_a_loop_without_the_prefix(m):
    new = m.generate(IDS[:, :5], max_new_tokens=6, stop_at_eos=False).ids
    ids = IDS[:, :5]
    for _ in range(6):
        ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, ids[:, 5:])


def test_batched_generation_with_padding_equals_each_row_alone(m):
    rows = [IDS[0, :6].tolist(), IDS[0, 2:5].tolist()]
    padded = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for r, row in enumerate(rows):  # left padding
        padded[r, 6 - len(row):] = torch.tensor(row)
        mask[r, 6 - len(row):] = 1
    batch = m.generate(padded, max_new_tokens=4, stop_at_eos=False, attention_mask=mask)
    for r, row in enumerate(rows):
        alone = m.generate(torch.tensor([row]), max_new_tokens=4, stop_at_eos=False)
        assert torch.equal(alone.ids[0], batch.ids[r])


def test_sampling_is_reproducible_with_a_seed(m):
    a = m.generate(IDS[:, :4], max_new_tokens=8, temperature=1.0, top_k=20, seed=5, stop_at_eos=False)
    b = m.generate(IDS[:, :4], max_new_tokens=8, temperature=1.0, top_k=20, seed=5, stop_at_eos=False)
    assert torch.equal(a.ids, b.ids)


def test_generation_keeps_hooks_for_every_step(m):
    calls = []
    m.generate(IDS[:, :4], max_new_tokens=3, stop_at_eos=False,
               hooks={"blocks.0.resid_post": lambda x, site: calls.append(x.shape[1])})
    assert calls == [4, 1, 1]  # the prompt, then one new token per step
    assert not m.registry.active


def test_position_selections_on_logits_at_runs_use_whole_sequence_positions(m):
    from interp.hooks import zero_ablate

    _, cache = m.run_with_cache(IDS, "final_norm", positions=[2], logits_at=[2, 3])
    _, full = m.run_with_cache(IDS, "final_norm")
    torch.testing.assert_close(cache["final_norm"], full["final_norm"][:, 2:3], rtol=0, atol=1e-5)
    out = m.run_with_hooks(IDS, {"logits": zero_ablate(positions=[3])}, logits_at=[2, 3])
    assert out[0, 1].abs().max() == 0 and out[0, 0].abs().max() > 0
    with pytest.raises(ValueError, match="per-row"):
        m.run_with_hooks(torch.cat([IDS, IDS]), {"logits": zero_ablate(positions=[3])},
                         logits_at=torch.tensor([[2], [3]]))
    assert not m.registry.active


def test_generation_refuses_right_padding(m):
    mask = torch.ones(1, 5, dtype=torch.long)
    mask[0, -2:] = 0
    with pytest.raises(InputError, match="left padding"):
        m.generate(IDS[:, :5], max_new_tokens=2, attention_mask=mask)


def test_prefix_errors(m):
    kv = KVCache.empty(CFG, batch=3)
    m(torch.cat([IDS, IDS, IDS])[:, :4], kv_cache=kv)
    with pytest.raises(InputError, match="3 rows"):
        m(torch.cat([IDS, IDS])[:, 4:], kv_cache=kv)
    with pytest.raises(InputError, match="growing KVCache"):
        m(torch.cat([IDS, IDS, IDS])[:, 4:], kv_cache=kv, stop_at_layer=2)


def test_caching_head_out_leaves_the_output_bit_identical(m):
    for dtype in (torch.float32, torch.bfloat16):
        model = m if dtype == torch.float32 else Gemma3.from_config(CFG, seed=3, dtype=torch.bfloat16)
        model.attn_impl = "eager"
        try:
            plain = model(IDS)
            logits, _ = model.run_with_cache(IDS, names="blocks.*.attn.head_out")
            assert torch.equal(logits, plain)
        finally:
            model.attn_impl = "auto"

"""Interventions (hooks/interventions.py): patching, ablation, steering, selections, batches.

Note on attention paths: hooking ``attn.scores``, ``attn.pattern`` or ``attn.head_out`` switches
that layer to the explicit attention path, which agrees with the fused one only to rounding.
So every bit-identical comparison below hooks the same sites in the reference run (with a
caching or no-op hook) as in the intervened run.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TINY

from interp.hooks import ActivationCache, Site, caching_hook
from interp.hooks.interventions import add, mean_ablate, patch, resample_ablate, selection_mask, zero_ablate
from interp.model import Gemma3, KVCache

CFG = TINY
SEQ = 6
HYP = settings(max_examples=25, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def model() -> Gemma3:
    return Gemma3.from_config(CFG, seed=0)


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:  # three different prompts
    return torch.randint(3, CFG.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def other() -> torch.Tensor:  # another run's prompts (the source of patches)
    return torch.randint(3, CFG.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def names(model) -> list[str]:
    return model.site_names()


def noop(x, site):
    return None


# ---------------------------------------------------------------------- identities
def test_patch_every_site_with_own_cache_is_identity(model, toks):
    logits, cache = model.run_with_cache(toks)
    patched = model.run_with_hooks(toks, {n: patch(cache) for n in model.site_names()})
    assert torch.equal(patched, logits)


@HYP
@given(data=st.data())
def test_patch_random_subset_with_own_cache_is_identity(model, toks, names, data):
    subset = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=8, unique=True))
    logits, cache = model.run_with_cache(toks, names=subset)
    patched = model.run_with_hooks(toks, {n: patch(cache) for n in subset})
    assert torch.equal(patched, logits)


def test_identity_hooks_change_nothing(model, toks, names):
    plain = model(toks)
    fused_sites = [n for n in names if not n.endswith(("attn.scores", "attn.pattern", "attn.head_out"))]
    assert torch.equal(model.run_with_hooks(toks, {n: (lambda x, site: x) for n in fused_sites}), plain)
    assert torch.equal(model.run_with_hooks(toks, {n: noop for n in fused_sites}), plain)
    everything, _ = model.run_with_cache(toks)
    assert torch.equal(model.run_with_hooks(toks, {n: (lambda x, site: x) for n in names}), everything)
    # empty selections and scale=0 are identities too
    empty = [zero_ablate(rows=[]), zero_ablate(positions=[]),
             patch(torch.zeros(1, SEQ, CFG.d_model), positions=slice(SEQ + 5, None)),
             add(torch.ones(CFG.d_model), scale=0.0)]
    for hook in empty:
        with model.hooks({"blocks.*.resid_pre": hook}):
            assert torch.equal(model(toks), plain)


def test_out_of_range_positions_raise_and_leave_no_hooks(model, toks):
    """The one position rule: an int outside the sequence is an error naming it, never a silent skip."""
    plain = model(toks)
    for hook in (zero_ablate(positions=SEQ + 5), patch(torch.zeros(1, SEQ, CFG.d_model), positions=[0, -SEQ - 1]),
                 add(torch.ones(CFG.d_model), positions=[SEQ])):
        with pytest.raises(IndexError, match="outside a sequence of"):
            model.run_with_hooks(toks, {"blocks.0.resid_pre": hook})
    assert not model.registry.active and torch.equal(model(toks), plain)


# ---------------------------------------------------------------------- selections on the model
@HYP
@given(data=st.data())
def test_row_limited_intervention_leaves_other_rows(model, toks, other, names, data):
    site = data.draw(st.sampled_from(names))
    row = data.draw(st.integers(0, toks.shape[0] - 1))
    kind = data.draw(st.sampled_from(["zero", "patch", "add"]))
    if kind == "zero":
        hook = zero_ablate(rows=[row])
    elif kind == "patch":
        _, src = model.run_with_cache(other, names=site)
        hook = patch(src, rows=[row])
    else:
        hook = add(torch.tensor(3.0), rows=[row])
    clean = model.run_with_hooks(toks, {site: noop})  # same attention path as the hooked run
    hooked = model.run_with_hooks(toks, {site: hook})
    keep = [r for r in range(toks.shape[0]) if r != row]
    assert torch.equal(hooked[keep], clean[keep])


def test_head_limited_zero_ablation_on_z(model, toks):
    z, head_out = "blocks.2.attn.z", "blocks.2.attn.head_out"
    _, clean = model.run_with_cache(toks, names=[z, head_out])
    _, abl = model.run_with_cache(toks, names=[z, head_out], hooks={z: zero_ablate(heads=[1, 3])})
    assert torch.equal(abl[z][:, :, [0, 2]], clean[z][:, :, [0, 2]])
    assert torch.equal(abl[head_out][:, :, [0, 2]], clean[head_out][:, :, [0, 2]])
    assert not abl[head_out][:, :, [1, 3]].any()
    assert not torch.equal(abl[head_out][:, :, 1], clean[head_out][:, :, 1])


def test_head_limited_zero_ablation_on_pattern_and_q(model, toks):
    for site in ("blocks.1.attn.pattern", "blocks.1.attn.q"):
        names = [site, "blocks.1.attn.z"]
        _, clean = model.run_with_cache(toks, names=names)
        _, abl = model.run_with_cache(toks, names=names, hooks={site: zero_ablate(heads=2)})
        head_axis = 1 if site.endswith("pattern") else 2
        assert not abl[site].select(head_axis, 2).any()
        others = [0, 1, 3]
        assert torch.equal(abl[site].index_select(head_axis, torch.tensor(others)),
                           clean[site].index_select(head_axis, torch.tensor(others)))
        z_abl, z_clean = abl["blocks.1.attn.z"], clean["blocks.1.attn.z"]
        assert torch.equal(z_abl[:, :, others], z_clean[:, :, others]), site
        assert not torch.equal(z_abl[:, :, 2], z_clean[:, :, 2]), site


def test_head_selection_on_gqa_keys_touches_the_group(model, toks):
    k, z = "blocks.0.attn.k", "blocks.0.attn.z"
    assert CFG.n_heads // CFG.n_kv_heads == 2  # query heads {0, 1} read kv head 0
    _, clean = model.run_with_cache(toks, names=[k, z])
    _, abl = model.run_with_cache(toks, names=[k, z], hooks={k: zero_ablate(heads=[1])})
    assert not abl[k][:, :, 0].any()
    assert torch.equal(abl[k][:, :, 1], clean[k][:, :, 1])
    for h in (0, 1):  # the whole group changes
        assert not torch.equal(abl[z][:, :, h], clean[z][:, :, h])
    assert torch.equal(abl[z][:, :, 2:], clean[z][:, :, 2:])


def test_position_limited_patch_and_causality(model, toks, other):
    site, pos = "blocks.2.resid_pre", [3, 5]
    clean_logits, clean = model.run_with_cache(toks, names=site)
    _, src = model.run_with_cache(other, names=site)
    logits, got = model.run_with_cache(toks, names=site, hooks={site: patch(src, positions=pos)})
    assert torch.equal(got[site][:, pos], src[site][:, pos])
    rest = [p for p in range(SEQ) if p not in pos]
    assert torch.equal(got[site][:, rest], clean[site][:, rest])
    assert torch.equal(logits[:, : min(pos)], clean_logits[:, : min(pos)])  # causality
    assert not torch.equal(logits[:, min(pos)], clean_logits[:, min(pos)])


def test_positions_are_full_sequence_indices_in_a_prefix_run(model, toks, other):
    """With a reused 3-token prefix the sites hold tokens 3..5; positions and a full-sequence
    source are still in whole-sequence indices."""
    resid, pattern = "blocks.2.resid_pre", "blocks.2.attn.pattern"
    _, src = model.run_with_cache(other, names=[resid, pattern])
    hooks = {resid: patch(src, positions=[1, 4]), pattern: zero_ablate(positions=-1, heads=[0])}
    full_logits, full = model.run_with_cache(toks, names=[resid, pattern], hooks=hooks)
    kv = KVCache.empty(CFG, batch=toks.shape[0])
    # the prefix, patched alike (a 3-token run: its source and positions are those of 3 tokens)
    model.run_with_hooks(toks[:, :3], {resid: patch({resid: src[resid][:, :3]}, positions=[1])}, kv_cache=kv)
    part_logits, part = model.run_with_cache(toks[:, 3:], names=[resid, pattern], hooks=hooks, kv_cache=kv)
    assert torch.equal(part[resid][:, 1], src[resid][:, 4])  # local 1 = index 4; index 1 skipped
    assert torch.equal(part[resid][:, [0, 2]], full[resid][:, [3, 5]])
    assert part[pattern].shape[2:] == (3, SEQ) and not part[pattern][:, 0, -1].any()
    torch.testing.assert_close(part_logits, full_logits[:, 3:], rtol=0, atol=1e-5)


def test_a_source_longer_than_the_run_is_refused(model, toks, other):
    """A cache of 6 tokens patched into a 3-token run is not cut to its first 3 tokens silently."""
    site = "blocks.1.resid_pre"
    _, src = model.run_with_cache(other, names=site)
    for hook in (patch(src), mean_ablate(src[site]), resample_ablate(src)):
        with pytest.raises(ValueError, match="covers 6 tokens, but this run has 3"):
            model.run_with_hooks(toks[:, :3], {site: hook})
    assert not model.registry.active
    model.run_with_hooks(toks[:, :3], {site: patch(src[site][:, :3])})  # an explicit slice is fine


def test_neuron_limited_ablation_on_hidden(model, toks):
    site, neurons = "blocks.4.mlp.hidden", [0, 7, 63]
    _, clean = model.run_with_cache(toks, names=site)
    _, abl = model.run_with_cache(toks, names=site, hooks={site: zero_ablate(neurons=neurons)})
    assert not abl[site][..., neurons].any()
    keep = [n for n in range(CFG.d_mlp) if n not in neurons]
    assert torch.equal(abl[site][..., keep], clean[site][..., keep])


# ---------------------------------------------------------------------- ablations
def test_mean_ablate_with_a_cache_averages_over_the_batch(model, toks, other):
    site = "blocks.1.mlp.out"
    _, ref = model.run_with_cache(other, names=site)
    _, got = model.run_with_cache(toks, names=site, hooks={site: mean_ablate(ref)})
    assert torch.equal(got[site], ref[site].mean(0, keepdim=True).expand_as(got[site]))
    # a tensor mean ([d]) on some positions only
    mean = ref[site].mean((0, 1))
    _, clean = model.run_with_cache(toks, names=site)
    _, got = model.run_with_cache(toks, names=site, hooks={site: mean_ablate(mean, positions=slice(0, 2))})
    assert torch.equal(got[site][:, :2], mean.expand(3, 2, -1))
    assert torch.equal(got[site][:, 2:], clean[site][:, 2:])


def test_resample_ablate_is_seeded_and_takes_rows_from_the_other_run(model, toks, other):
    site = "blocks.2.resid_post"
    _, src = model.run_with_cache(other, names=site)
    run = lambda hook: model.run_with_cache(toks, names=site, hooks={site: hook})  # noqa: E731
    a_logits, a = run(resample_ablate(src, seed=5))
    b_logits, b = run(resample_ablate(src, seed=5))
    assert torch.equal(a_logits, b_logits) and torch.equal(a[site], b[site])
    for r in range(toks.shape[0]):
        assert any(torch.equal(a[site][r], src[site][j]) for j in range(other.shape[0]))
    draws = {tuple(run(resample_ablate(src, seed=s))[1][site][:, 0, 0].tolist()) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    _, fixed = run(resample_ablate(src, perm=[2, 0, 1]))
    assert torch.equal(fixed[site], src[site][[2, 0, 1]])


def test_add_steers_and_scale_zero_is_identity(model, toks):
    site, v = "blocks.3.resid_post", torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(3))
    plain = model(toks)
    assert not torch.equal(model.run_with_hooks(toks, {site: add(v)}), plain)
    assert torch.equal(model.run_with_hooks(toks, {site: add(v, scale=0.0)}), plain)
    _, clean = model.run_with_cache(toks, names=site)
    _, got = model.run_with_cache(toks, names=site, hooks={site: add(v, scale=2.0, positions=-1)})
    assert torch.equal(got[site][:, -1], clean[site][:, -1] + 2.0 * v)
    assert torch.equal(got[site][:, :-1], clean[site][:, :-1])


def test_composition_runs_in_list_order(model, toks):
    site, v = "blocks.2.mlp.out", torch.arange(CFG.d_model, dtype=torch.float32)
    for order, expected in (("add_then_zero", torch.zeros(CFG.d_model)), ("zero_then_add", v)):
        hooks = [(site, add(v)), (site, zero_ablate())]
        if order == "zero_then_add":
            hooks.reverse()
        store: dict[str, torch.Tensor] = {}
        model.run_with_hooks(toks, hooks + [(site, caching_hook(store))])
        assert torch.equal(store[site], expected.expand(3, SEQ, -1)), order


# ---------------------------------------------------------------------- errors
def test_heads_on_a_site_without_heads_raises(model, toks):
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.out.*no head axis"):
        model.run_with_hooks(toks, {"blocks.1.mlp.out": zero_ablate(heads=[0])})
    with pytest.raises(ValueError, match="out of range"):
        model.run_with_hooks(toks, {"blocks.1.attn.z": zero_ablate(heads=[CFG.n_heads])})
    assert not model.registry.active  # the scope cleaned up


def test_patch_source_of_wrong_shape_names_the_site(model, toks):
    with pytest.raises(ValueError, match=r"blocks\.1\.resid_pre"):
        model.run_with_hooks(toks, {"blocks.1.resid_pre": patch(torch.zeros(3, SEQ, CFG.d_model + 1))})
    with pytest.raises(KeyError, match=r"blocks\.1\.resid_pre"):
        model.run_with_hooks(toks, {"blocks.1.resid_pre": patch(ActivationCache({"embed": torch.zeros(1)}))})
    with pytest.raises(TypeError):
        zero_ablate(positions="all")


# ---------------------------------------------------------------------- many experiments, one batch
def test_one_batch_holds_many_experiments(model, toks, other):
    prompt = toks[:1]
    _, src = model.run_with_cache(other[:1], names="blocks.3.resid_pre")
    batched = model.run_with_hooks(prompt.expand(3, -1), [
        ("blocks.1.mlp.out", zero_ablate(rows=[0])),
        ("blocks.3.resid_pre", patch(src, rows=[2])),
    ])
    experiments = [{"blocks.1.mlp.out": zero_ablate()}, {}, {"blocks.3.resid_pre": patch(src)}]
    for row, hooks in enumerate(experiments):
        # bit-identical to the same experiment run on every row of a batch of the same size
        same_shape = model.run_with_hooks(prompt.expand(3, -1), hooks)
        assert torch.equal(batched[row], same_shape[row]), row
        # and equal to a run of its own; a batch of 1 runs other matmul kernels, so ~1e-7 apart
        alone = model.run_with_hooks(prompt, hooks)
        torch.testing.assert_close(batched[row], alone[0], rtol=0, atol=1e-6, msg=f"row {row}")
    assert not torch.equal(batched[0], batched[1]) and not torch.equal(batched[2], batched[1])


# ---------------------------------------------------------------------- plain tensors
@HYP
@given(data=st.data())
def test_selection_matches_a_reference_loop(data):
    b, s, h, e = 3, 5, 4, 2
    offset = data.draw(st.integers(0, 3))
    group = data.draw(st.sampled_from([1, 2]))
    site = Site("blocks.0.attn.k", 0, offset=offset, head_axis=2, kv_group=group)
    x = torch.randn(b, s, h, e)
    src = torch.randn(1, offset + s, h, e)  # covers the full sequence
    rows = data.draw(st.none() | st.lists(st.integers(0, b - 1), max_size=3))
    positions = data.draw(st.none() | st.lists(st.integers(-(offset + s), offset + s - 1), max_size=4)
                          | st.builds(slice, st.integers(0, 4), st.integers(2, 9)))
    heads = data.draw(st.none() | st.lists(st.integers(0, h * group - 1), max_size=3))
    out = patch(src, rows=rows, positions=positions, heads=heads)(x, site)
    total = offset + s
    pos_full = set(range(total)) if positions is None else set(range(total)[positions]) \
        if isinstance(positions, slice) else {p % total for p in positions}
    kv = set(range(h)) if heads is None else {q // group for q in heads}
    for i in range(b):
        for t in range(s):
            for j in range(h):
                chosen = (rows is None or i in rows) and (offset + t in pos_full) and j in kv
                expected = src[0, offset + t, j] if chosen else x[i, t, j]
                assert torch.equal(out[i, t, j], expected)


def test_result_is_new_and_keeps_dtype_and_device():
    x = torch.ones(2, 3, 4, dtype=torch.bfloat16)
    before = x.clone()
    site = Site("blocks.0.resid_post", 0)
    for hook in (patch(torch.zeros(2, 3, 4, dtype=torch.float64)), zero_ablate(), zero_ablate(rows=[0]),
                 mean_ablate(torch.zeros(4)), mean_ablate({site.name: torch.zeros(5, 3, 4)}),
                 resample_ablate({site.name: torch.zeros(5, 3, 4)}), add(torch.ones(4, dtype=torch.float64))):
        out = hook(x, site)
        assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape
        assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)


def test_offset_positions_and_per_row_masks():
    site = Site("blocks.0.mlp.out", 0, offset=4)  # the tensor holds sequence indices 4, 5
    x = torch.zeros(2, 2, 1)
    full = torch.arange(6.0).view(1, 6, 1)
    assert patch(full, positions=[0, 5])(x, site).flatten().tolist() == [0, 5, 0, 5]
    assert zero_ablate(positions=-1)(torch.ones(2, 2, 1), site).flatten().tolist() == [1, 0, 1, 0]
    per_row = torch.tensor([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert zero_ablate(positions=per_row)(torch.ones(2, 2, 1), site).flatten().tolist() == [0, 1, 1, 0]
    pattern = Site("blocks.0.attn.pattern", 0, seq_axis=2, head_axis=1)  # [b, h, s_q, s_k]
    m = selection_mask(torch.zeros(1, 2, 3, 3), pattern, positions=1, heads=[0], neurons=[2])
    assert m.expand(1, 2, 3, 3).nonzero().tolist() == [[0, 0, 1, 2]]

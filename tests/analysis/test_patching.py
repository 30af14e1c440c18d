"""Activation patching sweeps against a naive loop: one full forward per experiment.

The sweep batches experiments, starts at the patched layer from the cached residual and
reuses the corrupt run's keys and values before the patched position; the naive loop written
here runs the whole corrupt prompt once per experiment with one hook that patches one site
with the clean run's activation. They must agree to fp32 rounding on every sweep kind, on
tiny configurations (grouped-query attention, sliding-window layers on sequences longer than
the window, a global layer) and on the demo model.
"""

from __future__ import annotations

import sys

import pytest
import support
import torch

import interp.patching as patching
from interp.metrics import kl, logit_diff, prob
from interp.model import Gemma3, Gemma3Config
from interp.model.config import GLOBAL, SLIDING
from interp.patching import SWEEPS, compare, patch_sweep, patch_sweeps, site_of
from interp.patching.experiments import Experiment, plan

ALL_SWEEPS = tuple(SWEEPS)


def make_model(cfg: Gemma3Config, seed: int = 0) -> Gemma3:
    """Random weights scaled so that patching effects are large and attention is far from uniform."""
    return support.make_model(cfg, seed, sensitive=True)


CONFIGS = {
    # window 3 < seq 7: sliding layers really slide, also across the reused prefix
    "gqa_local_global": Gemma3Config(n_layers=3, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, d_head=16,
                                     vocab_size=97, window=3, layer_types=(SLIDING, GLOBAL, SLIDING)),
    "mqa": Gemma3Config(n_layers=2, d_model=24, d_mlp=48, n_heads=2, n_kv_heads=1, d_head=8, vocab_size=61,
                        window=2),
}
CLEAN = [2, 11, 23, 5, 40, 7, 19]
CORRUPT = [2, 11, 31, 5, 40, 8, 19]  # differs at positions 2 and 5


# ---------------------------------------------------------------------- the naive reference
def naive_value(model, clean_ids, corrupt_ids, metric, e: Experiment, clean_cache) -> float:
    """One full forward of the corrupt prompt with one hook patching ``e``'s site."""
    name = f"blocks.{e.layer}.{site_of(e.kind)}"
    clean = clean_cache[name]

    def hook(x, site):
        x = x.clone()
        if e.kind == "attn.z":
            x[:, :, e.head] = clean[:, :, e.head]
        elif e.kind == "attn.z_by_pos":
            x[:, e.start, e.head] = clean[:, e.start, e.head]
        else:
            x[:, e.start] = clean[:, e.start]
        return x

    with torch.no_grad():
        logits = model.run_with_hooks(corrupt_ids, {name: hook})
    return float(metric(logits)[0])


def naive_sweep(model, clean, corrupt, metric, kinds, select=None) -> dict[str, dict[tuple, float]]:
    """``{kind: {cell: raw metric}}`` for every (or every ``select``-ed) experiment, one forward each."""
    clean_ids = model.to_tokens(clean)
    corrupt_ids = model.to_tokens(corrupt)
    names = sorted({f"blocks.*.{site_of(k)}" for k in kinds})
    _, cache = model.run_with_cache(clean_ids, names)
    out: dict[str, dict[tuple, float]] = {k: {} for k in kinds}
    for e in plan(kinds, model.cfg.n_layers, model.cfg.n_heads, clean_ids.shape[1]):
        if select is None or select(e):
            out[e.kind][e.cell] = naive_value(model, clean_ids, corrupt_ids, metric, e, cache)
    return out


def assert_matches(results, reference, atol: float) -> int:
    """Every reference cell equals the sweep's to ``atol`` in normalised units (0 = corrupt, 1 = clean)."""
    n = 0
    for kind, cells in reference.items():
        r = results[kind]
        scale = abs(r.clean_value - r.corrupt_value)
        for cell, value in cells.items():
            got = float(r.raw[cell])
            assert abs(got - value) <= atol * scale, (kind, cell, got, value)
            n += 1
    return n


# ---------------------------------------------------------------------- tiny configurations
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sweep_equals_naive_loop_every_site(name):
    model = make_model(CONFIGS[name])
    metric = logit_diff(3, 4)
    fast = patch_sweeps(model, CLEAN, CORRUPT, metric, ALL_SWEEPS, progress=False)
    ref = naive_sweep(model, CLEAN, CORRUPT, metric, ALL_SWEEPS)
    assert assert_matches(fast, ref, 1e-5) == sum(r.values.numel() for r in fast.values())
    for r in fast.values():
        assert torch.isfinite(r.values).all()
        assert r.values.abs().max() > 0.05  # the sweep sees real effects, not a degenerate model


@pytest.mark.parametrize("metric_kind", ["kl_two_positions", "prob_middle", "callable"])
def test_sweep_equals_naive_loop_other_metrics(metric_kind):
    """Metrics reading earlier positions (logits from the reused prefix) and plain callables."""
    model = make_model(CONFIGS["gqa_local_global"], seed=1)
    clean_logits = model(torch.tensor([CLEAN]))
    metric = {
        "kl_two_positions": kl(clean_logits, positions=[3, -1]),
        "prob_middle": prob(int(clean_logits[0, 4].argmax()), positions=4),  # patches after 4 change nothing
        "callable": lambda logits: logits[:, -2, 5] - logits[:, 1, 6],
    }[metric_kind]
    kinds = ("resid_pre", "attn.out", "attn.z_by_pos")
    fast = patch_sweeps(model, CLEAN, CORRUPT, metric, kinds, progress=False)
    ref = naive_sweep(model, CLEAN, CORRUPT, metric, kinds)
    assert_matches(fast, ref, 1e-5)
    if metric_kind == "prob_middle":
        assert (fast["resid_pre"].values[:, 5:] == 0).all()


def test_hooks_on_the_unembedding_are_respected():
    """A logit difference reads 2 vocabulary columns; with a hook on ``logits`` the sweep runs
    the model's own unembedding instead, so the hook sees (and may change) every run."""
    model = make_model(CONFIGS["mqa"])
    metric = logit_diff(3, 4)
    plain = patch_sweep(model, CLEAN, CORRUPT, metric, "resid_mid", progress=False)
    seen = []
    with model.hooks({"logits": lambda x, site: seen.append(x.shape[0])}):
        hooked = patch_sweep(model, CLEAN, CORRUPT, metric, "resid_mid", progress=False)
    torch.testing.assert_close(hooked.raw, plain.raw, atol=1e-5, rtol=1e-5)
    assert sum(seen) == 2 + plain.values.numel() - plain.skipped  # clean, corrupt, one row per experiment run
    with model.hooks({"logits": lambda x, site: x * 2}):
        doubled = patch_sweep(model, CLEAN, CORRUPT, metric, "resid_mid", progress=False)
    torch.testing.assert_close(doubled.raw, 2 * plain.raw, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("merge", [0, 10**9])
def test_batch_size_memory_limit_and_merging_do_not_change_results(monkeypatch, merge):
    """Batches split by rows or memory, and groups of different starts merged (none / all into one)."""
    model = make_model(CONFIGS["gqa_local_global"])
    metric = logit_diff(3, 4)
    kinds = ("resid_mid", "attn.z", "attn.z_by_pos")
    whole = patch_sweeps(model, CLEAN, CORRUPT, metric, kinds, progress=False)
    monkeypatch.setitem(patching.experiments.MERGE_TOKEN_ROWS, "cpu", merge)
    for kw in ({}, {"batch_size": 1}, {"batch_size": 5}, {"max_bytes": 1}):
        split = patch_sweeps(model, CLEAN, CORRUPT, metric, kinds, progress=False, **kw)
        for k in kinds:
            torch.testing.assert_close(split[k].raw, whole[k].raw, atol=1e-5, rtol=1e-5)


def test_normalisation_zero_is_corrupt_one_is_clean():
    """Prompts differing at one position q: patching before q changes nothing (0); patching the
    residual at q in layer 0, or at the metric position after the last layer, gives the clean run (1)."""
    model = make_model(CONFIGS["gqa_local_global"])  # its global layer lets the last token see position 3
    clean, corrupt = [2, 11, 23, 5, 40, 7, 19], [2, 11, 23, 9, 40, 7, 19]
    r = patch_sweeps(model, clean, corrupt, logit_diff(3, 4), ["resid_pre", "resid_post"], progress=False)
    pre, post = r["resid_pre"].values, r["resid_post"].values
    assert pre[:, :3].abs().max() < 1e-5 and post[:, :3].abs().max() < 1e-5
    assert abs(float(pre[0, 3]) - 1) < 1e-5
    assert abs(float(post[-1, -1]) - 1) < 1e-5
    assert abs(float(post[-1, 3])) < 1e-5  # the last layer's output elsewhere does not reach the metric
    assert r["resid_pre"].corrupt_value != r["resid_pre"].clean_value
    # patches of values equal in both runs are known no-ops and are not run: every position before
    # 3, the layer-0 embeddings of the shared tokens 4-6, and position 6 entering layer 1 (layer 0
    # slides with window 3, so position 6 has not seen position 3 yet)
    assert r["resid_pre"].skipped == 3 * model.cfg.n_layers + 3 + 1


def test_result_format_plot_and_labels():
    model = make_model(CONFIGS["gqa_local_global"])
    r = patch_sweeps(model, CLEAN, CORRUPT, logit_diff(3, 4), ["resid_pre", "attn.z", "attn.z_by_pos"], progress=False)
    cfg = model.cfg
    assert r["resid_pre"].values.shape == (cfg.n_layers, len(CLEAN)) and r["resid_pre"].axes == ("layer", "pos")
    assert r["attn.z"].values.shape == (cfg.n_layers, cfg.n_heads)
    assert r["attn.z_by_pos"].values.shape == (cfg.n_layers, cfg.n_heads, len(CLEAN))
    fig = r["resid_pre"].plot()
    assert list(fig.layout.xaxis.ticktext) == r["resid_pre"].position_labels()
    assert "23/31" in fig.layout.xaxis.ticktext[2]  # positions where the prompts differ show both tokens
    assert len(r["attn.z_by_pos"].plot().layout.yaxis.ticktext) == cfg.n_layers * cfg.n_heads
    top = r["resid_pre"].top(3)
    assert len(top) == 3 and abs(top[0].value) == float(r["resid_pre"].values.abs().max())
    assert r["resid_pre"].values[top[0].index] == top[0].value
    assert top[0].label.startswith("blocks.")
    both = compare(r["resid_pre"], r["resid_pre"])
    assert both.sign_agreement() == 1.0 and both.correlation() == pytest.approx(1.0)
    assert len(both.plot().data) >= 3


def test_bad_inputs_are_explained():
    model = make_model(CONFIGS["mqa"])
    with pytest.raises(ValueError, match="same number of tokens"):
        patch_sweep(model, CLEAN, CLEAN[:-1], logit_diff(3, 4), progress=False)
    with pytest.raises(ValueError, match="unknown sweep"):
        patch_sweep(model, CLEAN, CORRUPT, logit_diff(3, 4), "resid", progress=False)
    with pytest.raises(ValueError, match="both prompts"):
        patch_sweep(model, CLEAN, CLEAN, logit_diff(3, 4), progress=False)


def test_one_sweep_is_kind_several_are_kinds():
    """``kind=`` / ``kinds=`` (the word head_scores and cache.stack use), not ``site=``, which elsewhere
    means a full site name; passing one where the other belongs says which function to call."""
    from interp.attribution import attribution_patch, attribution_patches

    model = make_model(CONFIGS["mqa"])
    metric = logit_diff(3, 4)
    one = patch_sweep(model, CLEAN, CORRUPT, metric, kind="resid_post", progress=False)
    assert torch.equal(one.values, patch_sweeps(model, CLEAN, CORRUPT, metric, kinds=["resid_post"],
                                                progress=False)["resid_post"].values)
    with pytest.raises(TypeError, match=r"kind= takes one sweep; for several use patch_sweeps\(\.\.\., kinds="):
        patch_sweep(model, CLEAN, CORRUPT, metric, kind=["resid_pre", "attn.z"], progress=False)
    with pytest.raises(TypeError, match=r"kinds= takes a list of sweeps; for one use patch_sweep\(\.\.\., kind="):
        patch_sweeps(model, CLEAN, CORRUPT, metric, kinds="resid_pre", progress=False)
    with pytest.raises(TypeError, match=r"for several use attribution_patches\(\.\.\., kinds="):
        attribution_patch(model, CLEAN, CORRUPT, metric, kind=["resid_pre"])
    with pytest.raises(TypeError, match=r"for one use attribution_patch\(\.\.\., kind="):
        attribution_patches(model, CLEAN, CORRUPT, metric, kinds="resid_pre")
    with pytest.raises(TypeError, match="site"):
        patch_sweep(model, CLEAN, CORRUPT, metric, site="resid_pre", progress=False)  # the old spelling is gone


@pytest.mark.parametrize("tqdm_installed", [True, False])
def test_progress_bar_writes_to_stderr(capsys, monkeypatch, tqdm_installed):
    if not tqdm_installed:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the plain stderr line
    model = make_model(CONFIGS["mqa"])
    patch_sweep(model, CLEAN, CORRUPT, logit_diff(3, 4), progress=True)
    err = capsys.readouterr().err
    assert "patching" in err and "14" in err  # 2 layers x 7 positions
    patch_sweep(model, CLEAN, CORRUPT, logit_diff(3, 4), progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------- the demo model
FACT_CLEAN, FACT_CORRUPT = "The capital of France is", "The capital of Italy is"


def answer_id(model, prompt: str, answer: str) -> int:
    """The first token of ``answer`` as the model would read it after ``prompt``."""
    p = model.to_tokens(prompt)[0].tolist()
    full = model.to_tokens(prompt + answer)[0].tolist()
    assert full[:len(p)] == p, "the answer must start a new token"
    return full[len(p)]


def fact_metric(model):
    """logit(' Paris') - logit(' Rome') after the factual prompts (checked to be one token each)."""
    paris, rome = answer_id(model, FACT_CLEAN, " Paris"), answer_id(model, FACT_CORRUPT, " Rome")
    assert model.to_tokens(FACT_CLEAN).shape == model.to_tokens(FACT_CORRUPT).shape
    return logit_diff(paris, rome)


def demo_sample(e: Experiment, n_layers: int) -> bool:
    """About 50 experiments of every kind but resid_mid/resid_post (those are covered on tiny models)."""
    first, mid, last = 0, n_layers // 2, n_layers - 1
    if e.kind == "resid_pre":
        return e.layer in (first, mid, last)
    if e.kind in ("attn.out", "mlp.out"):
        return e.layer == mid
    if e.kind == "attn.z":
        return e.layer in (first, last)
    return e.layer == mid and e.start >= 4


def test_demo_sweep_equals_naive_loop(demo_model):
    demo, fact = demo_model, fact_metric(demo_model)
    kinds = ("resid_pre", "attn.out", "mlp.out", "attn.z", "attn.z_by_pos")
    fast = patch_sweeps(demo, FACT_CLEAN, FACT_CORRUPT, fact, kinds, progress=False)
    ref = naive_sweep(demo, FACT_CLEAN, FACT_CORRUPT, fact, kinds, select=lambda e: demo_sample(e, demo.cfg.n_layers))
    assert assert_matches(fast, ref, 1e-5) >= 40
    # the factual pair behaves like one: the country token carries the answer early on
    pre = fast["resid_pre"].values
    country = [i for i, (a, b) in enumerate(zip(fast["resid_pre"].tokens, fast["resid_pre"].corrupt_tokens)) if a != b]
    assert pre[0, country[0]] == pytest.approx(1.0, abs=1e-4)


def test_prepare_pair_without_caches_scores_both_prompts():
    m = support.make_model()
    pair = patching.prepare_pair(m, [2, 5, 7], [2, 6, 7], logit_diff(3, 4))
    logits = [m(torch.tensor([ids]))[0, -1] for ids in ([2, 5, 7], [2, 6, 7])]
    assert pair.clean_value == pytest.approx(float(logits[0][3] - logits[0][4]), abs=1e-5)
    assert pair.corrupt_value == pytest.approx(float(logits[1][3] - logits[1][4]), abs=1e-5)
    assert len(list(pair.clean_cache.keys())) == 0

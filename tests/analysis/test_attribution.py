"""Attribution patching: the gradient-based linear estimate of every site's patching effect.

Checked three ways: it has exactly the format of actual patching (so ``compare`` plots both);
it is the derivative it claims to be (in float64 it equals a finite difference of the metric
along ``clean - corrupt`` at each site, patched by a hook written here); and on the demo model
with a factual-recall pair it agrees in sign with actual patching on most of the top sites.
"""

from __future__ import annotations

import pytest
import torch
from test_patching import CLEAN, CONFIGS, CORRUPT, FACT_CLEAN, FACT_CORRUPT, fact_metric, make_model

from interp.attribution import attribution_patch, attribution_patches
from interp.metrics import logit_diff
from interp.patching import SWEEPS, compare, patch_sweep, patch_sweeps, site_of
from interp.patching.experiments import Experiment, plan

ALL_SWEEPS = tuple(SWEEPS)


def test_same_format_as_activation_patching():
    model = make_model(CONFIGS["gqa_local_global"])
    metric = logit_diff(3, 4)
    actual = patch_sweeps(model, CLEAN, CORRUPT, metric, ALL_SWEEPS, progress=False)
    estimate = attribution_patches(model, CLEAN, CORRUPT, metric, ALL_SWEEPS)
    assert set(estimate) == set(actual)
    for kind in ALL_SWEEPS:
        a, e = actual[kind], estimate[kind]
        assert e.values.shape == a.values.shape and e.axes == a.axes and e.site == a.site
        assert e.tokens == a.tokens and e.corrupt_tokens == a.corrupt_tokens
        assert e.clean_value == pytest.approx(a.clean_value) and e.corrupt_value == pytest.approx(a.corrupt_value)
        assert e.method == "attribution patching" and torch.isfinite(e.values).all()
        fig = compare(a, e).plot()
        assert len(fig.data) == 4  # two heatmaps, the scatter and its y = x line
    # one head over all positions is the sum of that head at each position
    torch.testing.assert_close(estimate["attn.z"].values, estimate["attn.z_by_pos"].values.sum(-1))
    # positions the prompts share have no activation difference before the first changed token
    assert estimate["resid_pre"].values[:, :2].abs().max() == 0
    single = attribution_patch(model, CLEAN, CORRUPT, metric, "mlp.out")
    torch.testing.assert_close(single.values, estimate["mlp.out"].values)


def finite_difference(model, clean_ids, corrupt_ids, metric, e: Experiment, clean_cache, corrupt_cache, eps: float):
    """(metric(corrupt + eps * (clean - corrupt) at e's site) - metric(corrupt)) / eps, centred."""
    name = f"blocks.{e.layer}.{site_of(e.kind)}"
    delta = clean_cache[name] - corrupt_cache[name]
    mask = torch.zeros_like(delta)
    if e.kind == "attn.z":
        mask[:, :, e.head] = 1
    elif e.kind == "attn.z_by_pos":
        mask[:, e.start, e.head] = 1
    else:
        mask[:, e.start] = 1

    def run(scale):
        with torch.no_grad():
            logits = model.run_with_hooks(corrupt_ids, {name: lambda x, site: x + scale * mask * delta})
        return float(metric(logits)[0])

    return (run(eps) - run(-eps)) / (2 * eps)


def test_estimate_is_the_directional_derivative():
    """float64 weights; the norms still compute in float32, so the finite difference is noisy at
    ~1e-6 of the metric: a centred difference with eps 1e-2, compared to 1% (a wrong gradient is off by O(1))."""
    model = make_model(CONFIGS["gqa_local_global"]).to(torch.float64)
    metric = logit_diff(3, 4)
    estimate = attribution_patches(model, CLEAN, CORRUPT, metric, ALL_SWEEPS)
    clean_ids, corrupt_ids = torch.tensor([CLEAN]), torch.tensor([CORRUPT])
    names = sorted({f"blocks.*.{site_of(k)}" for k in ALL_SWEEPS})
    _, clean_cache = model.run_with_cache(clean_ids, names)
    _, corrupt_cache = model.run_with_cache(corrupt_ids, names)
    checked = 0
    scale = 1e-3 * max(float(r.values.abs().max()) for r in estimate.values()) * abs(
        estimate["resid_pre"].clean_value - estimate["resid_pre"].corrupt_value)
    for e in plan(ALL_SWEEPS, model.cfg.n_layers, model.cfg.n_heads, len(CLEAN)):
        if e.kind not in ("resid_pre", "attn.z") and (e.layer != 1 or e.start not in (2, 5, 6)):
            continue  # every resid_pre and head; the other sweeps at a few cells
        want = finite_difference(model, clean_ids, corrupt_ids, metric, e, clean_cache, corrupt_cache, 1e-2)
        got = float(estimate[e.kind].raw[e.cell]) - estimate[e.kind].corrupt_value
        assert got == pytest.approx(want, rel=1e-2, abs=scale), (e, got, want)
        checked += 1
    assert checked > 30


def test_demo_attribution_agrees_in_sign_with_patching(demo_model):
    demo, fact = demo_model, fact_metric(demo_model)
    actual = patch_sweep(demo, FACT_CLEAN, FACT_CORRUPT, fact, "resid_pre", progress=False)
    estimate = attribution_patch(demo, FACT_CLEAN, FACT_CORRUPT, fact, "resid_pre")
    both = compare(actual, estimate)
    top = 20
    agreement = both.sign_agreement(top=top)
    print(f"\ndemo resid_pre: sign agreement on the top {top} sites {agreement:.0%}, "
          f"over all sites {both.sign_agreement(top=None):.0%}, correlation {both.correlation():.3f}")
    assert agreement >= 0.7

"""NaN and inf never pass silently (issue 10, group 3).

The raw model does not check its activations (by design: checking costs a sync per site); the
analyses (logit lens, DLA, attention patterns and head scores, induction loss, patching) and
``generate`` check their results, and when a result holds NaN or inf they rerun with every site
checking and raise :class:`NonFiniteError` naming the first non-finite site and whether a hook
returned it or the model computed it. ``m.check_finite = True`` makes every forward check as it
goes. ``ActivationCache.save`` refuses non-finite values unless ``allow_non_finite=True``.

NaN spreads *backwards* in time through attention: a masked (or out-of-window) key gets weight
exactly 0, but ``0 * NaN = NaN`` in ``pattern @ v``, so a NaN in one position's values reaches
every position's output, earlier ones included, on the fused and the explicit path alike. After
the last layer there is no attention left, so a NaN written there stays at its position.

After every error the model must be as before: no hooks left, the switch off, logits
bit-identical.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import support
import torch
import torch.nn.functional as F
from support import TINY, FakeTokenizer

import interp
from interp.hooks import ActivationCache, NonFiniteError
from interp.metrics import Metric, logit_diff

IDS = torch.tensor([[2, 17, 5, 9, 7, 33, 41]])  # 7 tokens > window 4
CORRUPT = torch.tensor([[2, 17, 5, 9, 7, 34, 41]])
SEQ = IDS.shape[1]
NAN = float("nan")

SITE = "blocks.0.resid_post"
HOOK_BLAME = r"is the first non-finite site: a hook on it returned NaN or inf"
MODEL_BLAME = r"is the first non-finite site: the model computed NaN or inf there"


def write_at(pos: int, value: float = NAN):
    """A hook writing ``value`` into batch row 0, sequence position ``pos`` (every feature /
    head there); it returns a NEW tensor of the site's shape and dtype."""

    def hook(x: torch.Tensor, site) -> torch.Tensor:
        out = x.index_put((torch.tensor([0]), torch.tensor([pos])), torch.tensor(value, dtype=x.dtype))
        assert out.shape == x.shape and out.dtype == x.dtype and out is not x
        return out

    return hook


NAN_HOOK = {SITE: write_at(2)}


@pytest.fixture(scope="module")
def model():
    return support.make_model(TINY, tokenizer=FakeTokenizer(TINY.vocab_size))


@pytest.fixture(scope="module")
def before(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    assert bool(torch.isfinite(out).all())
    return out


def assert_intact(m, before: torch.Tensor) -> None:
    """No hooks left, the debug switch off, logits bit-identical to ``before``."""
    assert not m.registry.active
    assert m.check_finite is False
    with torch.no_grad():
        after = m(IDS)
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[int]:
    """Counts calls of the fused attention kernel."""
    calls: list[int] = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def site_named(site: str, blame: str = HOOK_BLAME) -> str:
    """The pattern of "<site> is the first non-finite site: <who produced it>"."""
    return re.escape(site) + " " + blame


# ------------------------------------------------------------------ analyses name the hooked site
@pytest.mark.parametrize("value", [NAN, float("inf"), float("-inf")])
def test_logit_lens_names_the_hooked_site(model, before, value):
    with model.hooks({SITE: write_at(2, value)}):
        with pytest.raises(NonFiniteError, match=r"^logit_lens: the residual stream: NaN or inf found\. "
                           + site_named(SITE)):
            interp.logit_lens(model, IDS)
        assert set(model.registry.active) == {SITE}  # the user's scope is still there until it ends
    assert_intact(model, before)


def test_direct_logit_attribution_names_the_hooked_site(model, before):
    with model.hooks(NAN_HOOK):
        with pytest.raises(NonFiniteError, match=r"^direct_logit_attribution: the logits: NaN or inf found\. "
                           + site_named(SITE)):
            interp.direct_logit_attribution(model, IDS, 5, 6)
    assert_intact(model, before)


def test_attention_patterns_name_a_site_upstream_of_the_pattern(model, before):
    # a NaN in resid_pre reaches layer 0's queries and keys, so its pattern itself is NaN
    hooks = {"blocks.0.resid_pre": write_at(2)}
    msg = r"^the attention pattern of layer 0: NaN or inf found\. " + site_named("blocks.0.resid_pre")
    with pytest.raises(NonFiniteError, match=msg):
        interp.attention_patterns(model, IDS, hooks=hooks)
    assert_intact(model, before)
    with model.hooks(hooks):  # the same from an enclosing scope
        with pytest.raises(NonFiniteError, match=msg):
            interp.attention_patterns(model, IDS)
    assert_intact(model, before)
    with pytest.raises(NonFiniteError, match=msg):
        interp.head_scores(model, "induction", seq_len=6, batch_size=1, hooks=hooks)
    assert_intact(model, before)


def test_nan_in_values_leaves_that_layers_pattern_finite_but_not_the_next(model, before):
    """A NaN in blocks.0.attn.v makes layer 0's z NaN, not its pattern: layer 0's pattern is
    returned (finite), layer 1's pattern (read from the NaN residual) is an error naming v."""
    hooks = {"blocks.0.attn.v": write_at(SEQ - 1)}
    res = interp.attention_patterns(model, IDS, layers=[0], hooks=hooks)
    assert bool(torch.isfinite(res.pattern(0)).all())
    with pytest.raises(NonFiniteError, match=r"^the attention pattern of layer 1: NaN or inf found\. "
                       + site_named("blocks.0.attn.v")):
        interp.attention_patterns(model, IDS, layers=[0, 1], hooks=hooks)
    assert_intact(model, before)


def test_induction_loss_names_the_hooked_site(model, before):
    with pytest.raises(NonFiniteError, match=r"^induction_loss: the logits: NaN or inf found\. " + site_named(SITE)):
        interp.induction_loss(model, seq_len=6, batch_size=1, hooks=NAN_HOOK)
    assert_intact(model, before)


def test_patch_sweep_blames_the_site_not_the_metric(model, before):
    with model.hooks(NAN_HOOK):
        with pytest.raises(NonFiniteError, match=r"^the clean run's logits: NaN or inf found\. "
                           + site_named(SITE)) as info:
            interp.patch_sweep(model, IDS, CORRUPT, logit_diff(5, 6), progress=False)
    assert "metric" not in str(info.value)
    assert_intact(model, before)


@pytest.mark.parametrize("prompt", [IDS, " w17| w5| w9"], ids=["ids", "text"])
def test_generate_names_the_hooked_site_instead_of_returning_garbage(model, before, prompt):
    with pytest.raises(NonFiniteError, match=r"^generate\(\): the logits of step 1: NaN or inf found\. "
                       + site_named(SITE)):
        model.generate(prompt, max_new_tokens=3, hooks=NAN_HOOK)
    assert_intact(model, before)


def test_generate_names_the_site_when_a_later_step_turns_nan(model, before):
    """A hook that writes NaN from absolute position SEQ on (the first generated token, the
    input of step 2): step 1 is fine, step 2 raises, and the rerun over the whole context finds it."""

    def from_seq(x, site):
        _, idx = site.whole_sequence(x.shape[site.seq_axis])
        sel = idx >= SEQ
        if not bool(sel.any()):
            return None
        out = x.clone()
        out[:, sel.to(x.device)] = NAN
        return out

    with pytest.raises(NonFiniteError, match=r"^generate\(\): the logits of step 2: NaN or inf found\. "
                       + site_named(SITE)):
        model.generate(IDS, max_new_tokens=3, stop_at_eos=False, hooks={SITE: from_seq})
    assert_intact(model, before)


# -------------------------------------------------------------- NaN spreads backwards in time
@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_nan_in_the_last_values_reaches_earlier_positions(model, before, impl, sdpa_calls, monkeypatch):
    monkeypatch.setattr(model, "attn_impl", impl)
    hooks = {"blocks.0.attn.v": write_at(SEQ - 1)}
    with torch.no_grad(), model.hooks(hooks):
        logits = model(IDS)
    if impl == "auto":
        assert len(sdpa_calls) == TINY.n_layers  # the fused path ran
    else:
        assert sdpa_calls == []  # the explicit path ran
    assert bool(torch.isnan(logits[0]).all(-1).all()), "every position, position 0 included, is NaN"
    sdpa_calls.clear()
    with model.hooks(hooks):
        # position 0 never attends to position SEQ - 1, yet its residual is NaN and the rerun names v
        with pytest.raises(NonFiniteError, match=site_named("blocks.0.attn.v")):
            interp.logit_lens(model, IDS, positions=[0])
    assert (len(sdpa_calls) > 0) == (impl == "auto")
    monkeypatch.setattr(model, "attn_impl", "auto")  # `before` was computed on the default path
    assert_intact(model, before)


def test_masked_weight_is_exactly_zero_yet_z_is_nan(model, before):
    """The mechanism, on the explicit path: position 0's weight on the last key is exactly 0,
    its z is NaN anyway (0 * NaN)."""
    with torch.no_grad(), model.hooks({"blocks.0.attn.v": write_at(SEQ - 1)}):
        _, cache = model.run_with_cache(IDS, names=["blocks.0.attn.pattern", "blocks.0.attn.z"])
    pattern, z = cache["blocks.0.attn.pattern"], cache["blocks.0.attn.z"]
    assert bool(torch.isfinite(pattern).all())
    assert bool((pattern[0, :, 0, SEQ - 1] == 0).all())
    assert bool(torch.isnan(z[0, 0]).all())
    assert_intact(model, before)


def test_nan_at_an_earlier_position_spreads_until_the_last_layer(model, before):
    # after layer 0 there are five attention layers to carry it to every position
    with torch.no_grad(), model.hooks({SITE: write_at(2)}):
        assert bool(torch.isnan(model(IDS)[0]).all(-1).all())
    # after the last layer nothing attends any more: only position 2 is NaN
    last = f"blocks.{TINY.n_layers - 1}.resid_post"
    with torch.no_grad(), model.hooks({last: write_at(2)}):
        nan_rows = torch.isnan(model(IDS)[0]).any(-1)
        assert nan_rows.tolist() == [i == 2 for i in range(SEQ)]
        # an analysis raises only when its own result is non-finite
        lens = interp.logit_lens(model, IDS, positions=[0])
        assert lens.positions == [0] and bool(torch.isfinite(lens.top_probs).all())
        with pytest.raises(NonFiniteError, match=site_named(last)):
            interp.logit_lens(model, IDS, positions=[2])
    assert_intact(model, before)


# ------------------------------------------------------------------------------- the debug switch
def test_check_finite_switch_raises_at_the_site_and_off_is_silent(model, before):
    later_calls: list[str] = []
    hooks = {SITE: write_at(2), "blocks.1.resid_pre": lambda x, s: later_calls.append(s.name)}
    # off (the default): the raw model does not check, by design; NaN logits come back silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), model.hooks(hooks):
            silent = model(IDS)
    assert bool(torch.isnan(silent).any())
    assert later_calls == ["blocks.1.resid_pre"]
    later_calls.clear()
    model.check_finite = True
    try:
        with model.hooks(hooks):
            with pytest.raises(NonFiniteError, match=r"^" + site_named(SITE)):
                model(IDS)
        assert later_calls == [], "the forward stopped at the site, before any later one fired"
    finally:
        model.check_finite = False
    assert_intact(model, before)


# --------------------------------------------------------------------------- NaN in the weights
@pytest.fixture(scope="module")
def nan_weights():
    m = support.make_model(TINY)
    with torch.no_grad():
        m.blocks[2].mlp.down_proj.weight[0, 0] = NAN
        before = m(IDS)
    return m, before


def test_nan_weight_is_named_as_computed_by_the_model(nan_weights):
    m, before = nan_weights
    with pytest.raises(NonFiniteError, match=r"^logit_lens: the residual stream: NaN or inf found\. blocks\.2\.[\w.]+ "
                       + MODEL_BLAME):
        interp.logit_lens(m, IDS)
    assert_intact(m, before)
    with pytest.raises(NonFiniteError, match=r"^generate\(\): the logits of step 1: NaN or inf found\. "
                       r"blocks\.2\.[\w.]+ " + MODEL_BLAME):
        m.generate(IDS, max_new_tokens=2)
    assert_intact(m, before)
    m.check_finite = True
    try:
        with pytest.raises(NonFiniteError, match=r"^blocks\.2\.[\w.]+ " + MODEL_BLAME):
            m(IDS)
    finally:
        m.check_finite = False
    assert_intact(m, before)


# ----------------------------------------------------------------------------------- the metric
@pytest.mark.parametrize("metric, shown", [
    (Metric(lambda lg: lg[..., 0] * NAN, name="nan_metric"), "nan"),
    (Metric(lambda lg: torch.log(lg[..., 0] * 0), name="log_of_zero"), "-inf"),
])
def test_non_finite_metric_from_finite_logits_blames_the_metric(model, before, metric, shown):
    with pytest.raises(NonFiniteError, match=rf"^the metric {metric.name} gives {shown} \(clean\) and {shown} "
                       r"\(corrupt\) from finite logits; check the metric"):
        interp.patch_sweep(model, IDS, CORRUPT, metric, progress=False)
    assert_intact(model, before)


def test_metric_non_finite_only_on_patched_runs_is_reported(model, before):
    """Finite on the clean and corrupt runs (batch 1), NaN on the batched patched runs."""

    def fragile(lg):
        v = lg[..., 5].mean(-1) - lg[..., 6].mean(-1)
        return v if lg.shape[0] == 1 else v * NAN

    with pytest.raises(NonFiniteError, match=r"^patching resid_pre at layer \d+, from position \d+ gave a "
                       r"non-finite metric \(nan\) although both runs were finite; a hook active during the "
                       r"sweep, or the metric, produced it"):
        interp.patch_sweep(model, IDS, CORRUPT, Metric(fragile, name="fragile"), progress=False)
    assert_intact(model, before)


# ------------------------------------------------------------------------------ saving a cache
@pytest.mark.parametrize("value", [NAN, float("inf")])
def test_cache_save_refuses_non_finite_unless_allowed(model, before, tmp_path, value):
    with torch.no_grad():
        _, cache = model.run_with_cache(IDS, names=["blocks.0.resid_pre", SITE], hooks={SITE: write_at(2, value)})
    assert isinstance(cache, ActivationCache)
    path = tmp_path / "c.safetensors"
    with pytest.raises(NonFiniteError, match=r"^the cache holds NaN or inf at \['blocks\.0\.resid_post'\]; pass "
                       r"allow_non_finite=True"):
        cache.save(path)
    assert not path.exists()
    cache.save(path, allow_non_finite=True)
    back = ActivationCache.load(path, names=model.site_names())
    torch.testing.assert_close(back[SITE], cache[SITE], rtol=0, atol=0, equal_nan=True)
    assert not math.isfinite(float(back[SITE][0, 2, 0]))
    assert bool(torch.isfinite(back["blocks.0.resid_pre"]).all())
    assert_intact(model, before)

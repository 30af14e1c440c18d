"""Path patching against a naive loop written here with plain hooks: two full forwards per sender.

Step 1 of the naive loop runs the corrupt prompt with every head's ``attn.z`` and every
``mlp.out`` frozen at the corrupt run's values, except the sender (set to its clean value), and
caches what the receivers read; step 2 runs the corrupt prompt with only the receivers' inputs
set to those values (the final residual gets the sender's change added). ``path_patch`` computes
the same batched, without step 1's forward; they must agree to 1e-5 (normalised units).
"""

from __future__ import annotations

import pytest
import support
import torch

from interp.circuits.path_patching import PathPatchingResult, path_patch
from interp.hooks import UnknownSiteError
from interp.metrics import logit_diff
from interp.patching import compare, patch_sweep
from interp.tokens import Top

CLEAN = [2, 11, 23, 5, 40, 7, 19, 33]
CORRUPT = [2, 11, 31, 5, 40, 8, 19, 33]  # differs at positions 2 and 5


@pytest.fixture(scope="module")
def model():
    """TINY (6 layers, GQA 4/2, window 4 < 8 tokens), weights scaled so that effects are large."""
    m = support.make_model(support.TINY, sensitive=True)
    yield m
    assert not m.registry.active


def _ids(x):
    return torch.tensor([x])


def naive_value(model, metric, sender, receivers, clean=CLEAN, corrupt=CORRUPT) -> float:
    """Raw metric of one sender through ``receivers`` (formats as ``path_patch`` takes them)."""
    n = model.cfg.n_layers
    clean_ids, corrupt_ids = model.to_tokens(clean), model.to_tokens(corrupt)
    sites = ["blocks.*.attn.z", "blocks.*.attn.out", "blocks.*.mlp.out"]
    _, cc = model.run_with_cache(clean_ids, sites)
    _, kc = model.run_with_cache(corrupt_ids, sites + [f"blocks.{n - 1}.resid_post"])
    freeze = {}
    for layer in range(n):
        def z_hook(x, site, layer=layer):
            z = kc[f"blocks.{layer}.attn.z"].clone()
            if isinstance(sender, tuple) and sender[0] == layer:
                z[:, :, sender[1]] = cc[f"blocks.{layer}.attn.z"][:, :, sender[1]]
            return z

        def mlp_hook(x, site, layer=layer):
            which = cc if sender == f"blocks.{layer}.mlp.out" else kc
            return which[f"blocks.{layer}.mlp.out"].clone()

        freeze[f"blocks.{layer}.attn.z"] = z_hook
        freeze[f"blocks.{layer}.mlp.out"] = mlp_hook
        if sender == f"blocks.{layer}.attn.out":
            freeze[f"blocks.{layer}.attn.out"] = lambda x, site, layer=layer: cc[f"blocks.{layer}.attn.out"].clone()
    record = {}
    for r in receivers:
        name, head = (r, None) if isinstance(r, str) else r
        if name in ("logits", "resid_final"):
            record[f"blocks.{n - 1}.resid_post"] = "final"
        elif name.endswith(".mlp"):
            record[name.replace(".mlp", ".pre_mlp_norm")] = None
        else:
            record.setdefault(name, set())
            if record[name] is not None:
                record[name] = None if head is None else record[name] | {head}
    with torch.no_grad():
        _, rec = model.run_with_cache(corrupt_ids, list(record), hooks=freeze)
    patches = {}
    for name, heads in record.items():
        value = rec[name]
        if heads == "final":
            patches[name] = lambda x, site, v=value, c=kc[name]: x + (v - c)
        elif heads is None:
            patches[name] = lambda x, site, v=value: v.clone()
        else:
            def set_heads(x, site, v=value, hs=tuple(sorted(heads))):  # noqa: B008
                x = x.clone()
                hs = list(hs)
                x[:, :, hs] = v[:, :, hs]
                return x
            patches[name] = set_heads
    with torch.no_grad():
        logits = model.run_with_hooks(corrupt_ids, patches)
    return float(metric(logits)[0])


def check_against_naive(model, metric, senders, receivers, result, cells):
    with torch.no_grad():
        clean = float(metric(model(_ids(CLEAN)))[0])
        corrupt = float(metric(model(_ids(CORRUPT)))[0])
    assert result.clean_value == pytest.approx(clean, rel=1e-5)
    assert result.corrupt_value == pytest.approx(corrupt, rel=1e-5)
    assert abs(clean - corrupt) > 1.0  # the sensitive model separates the two prompts
    want = torch.tensor([(naive_value(model, metric, s, receivers) - corrupt) / (clean - corrupt) for s in senders])
    want = want.float()
    got = torch.stack([result.values[c] for c in cells])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got.abs().max() > 1e-2  # something flows through these receivers
    return got


RECEIVER_SETS = {
    "q_k_v_and_final": [("blocks.4.attn.q", 1), ("blocks.4.attn.k", 0), ("blocks.5.attn.v", 1), "logits"],
    "all_q_heads_and_mlp": ["blocks.3.attn.q", "blocks.2.mlp", ("blocks.4.attn.k", 1)],
}


def full_logits_metric(logits):
    """A plain callable: the analyses compute every position's full logits for it."""
    return logits[:, -1, 3] - logits[:, -1, 9] + 0.5 * logits[:, -3, 5]


@pytest.mark.parametrize("which", list(RECEIVER_SETS))
@pytest.mark.parametrize("metric_kind", ["logit_diff", "callable"])
def test_heads_equal_the_naive_loop(model, which, metric_kind):
    """logit_diff reads two vocabulary entries (only those are unembedded); a callable, all logits."""
    metric = logit_diff(3, 4) if metric_kind == "logit_diff" else full_logits_metric
    receivers = RECEIVER_SETS[which]
    r = path_patch(model, CLEAN, CORRUPT, metric, "heads", receivers, batch_size=5)
    first = {"q_k_v_and_final": 4, "all_q_heads_and_mlp": 3}[which]  # heads before the earliest receiver
    assert isinstance(r, PathPatchingResult) and r.axes == ("layer", "head")
    assert r.values.shape == (first, model.cfg.n_heads)
    cells = [(layer, h) for layer in range(first) for h in range(model.cfg.n_heads)]
    check_against_naive(model, metric, cells, receivers, r, cells)
    assert not model.registry.active


def test_component_senders_equal_the_naive_loop(model):
    senders = ["blocks.1.mlp.out", "blocks.2.attn.out", (3, 2), "blocks.3.mlp.out"]
    receivers = ["blocks.4.mlp", ("blocks.5.attn.q", 2), "resid_final"]
    r = path_patch(model, CLEAN, CORRUPT, logit_diff(3, 4), senders, receivers, batch_size=3)
    assert r.axes == ("sender",) and r.values.shape == (4,)
    assert r.labels == ["blocks.1.mlp.out", "blocks.2.attn.out", "blocks.3.attn.z head 2", "blocks.3.mlp.out"]
    assert r.receivers == ["blocks.4.mlp (input)", "blocks.5.attn.q head 2", "logits (final residual)"]
    check_against_naive(model, logit_diff(3, 4), senders, receivers, r, [(i,) for i in range(4)])
    assert r.top(1)[0].label in r.labels
    assert len(r.plot().data) == 1


def test_top_entries_are_senders(model):
    heads = path_patch(model, CLEAN, CORRUPT, logit_diff(3, 4), "heads", ["logits"])
    top = heads.top(2)
    again = path_patch(model, CLEAN, CORRUPT, logit_diff(3, 4), top, ["logits"])
    torch.testing.assert_close(again.values, torch.tensor([t.value for t in top]), atol=1e-6, rtol=0)
    assert again.labels == [f"blocks.{t.index[0]}.attn.z head {t.index[1]}" for t in top]
    assert isinstance(top[0], Top)


def test_last_layer_heads_and_activation_patching(model):
    """A last-layer head reaches the logits directly and through the last MLP: with both as receivers,
    path patching is activation patching of the head; with the logits alone it is activation
    patching with the last MLP frozen at its corrupt output."""
    last, heads = model.cfg.n_layers - 1, model.cfg.n_heads
    metric = logit_diff(3, 4)
    senders = [(last, h) for h in range(heads)]
    act = patch_sweep(model, CLEAN, CORRUPT, metric, "attn.z", progress=False)
    both = path_patch(model, CLEAN, CORRUPT, metric, senders, ["logits", f"blocks.{last}.mlp"])
    torch.testing.assert_close(both.values, act.values[last], atol=1e-5, rtol=0)
    direct = path_patch(model, CLEAN, CORRUPT, metric, senders, ["logits"])
    _, cc = model.run_with_cache(_ids(CLEAN), [f"blocks.{last}.attn.z"])
    _, kc = model.run_with_cache(_ids(CORRUPT), [f"blocks.{last}.mlp.out"])
    frozen = []
    for h in range(heads):
        def patch_head(x, site, h=h):
            x = x.clone()
            x[:, :, h] = cc[site.name][:, :, h]
            return x
        hooks = {f"blocks.{last}.attn.z": patch_head, f"blocks.{last}.mlp.out": lambda x, site: kc[site.name]}
        with torch.no_grad():
            frozen.append(float(metric(model.run_with_hooks(_ids(CORRUPT), hooks))[0]))
    want = (torch.tensor(frozen) - act.corrupt_value) / (act.clean_value - act.corrupt_value)
    torch.testing.assert_close(direct.values, want, atol=1e-5, rtol=0)
    assert (direct.values - act.values[last]).abs().max() > 1e-3  # the last MLP's response matters here
    # with the logits as the only receiver every layer's heads are senders: same grid as an attn.z sweep
    grid = path_patch(model, CLEAN, CORRUPT, metric, "heads", ["logits"])
    torch.testing.assert_close(grid.values[last], direct.values, atol=1e-6, rtol=0)
    assert compare(act, grid).correlation() > 0


def assert_usable(model, before):
    assert not model.registry.active
    with torch.no_grad():
        assert torch.equal(model(_ids(CORRUPT)), before)


@pytest.mark.parametrize("senders, receivers, error, match", [
    ([(4, 1)], [("blocks.2.attn.q", 0)], ValueError,
     r"sender blocks\.4\.attn\.z head 1 comes after receiver blocks\.2\.attn\.q head 0"),
    ([(2, 1)], [("blocks.2.attn.k", 0)], ValueError, r"blocks\.2\.attn\.z head 1 comes after .*blocks\.2\.attn\.k"),
    (["blocks.3.mlp.out"], ["blocks.3.mlp"], ValueError, r"blocks\.3\.mlp\.out comes after receiver blocks\.3\.mlp"),
    ("heads", [("blocks.2.attn.zz", 0)], UnknownSiteError, r"unknown site 'blocks\.2\.attn\.zz'.*blocks\.2\.attn\.z"),
    ("heads", ["blocks.9.mlp"], UnknownSiteError, r"layers 0\.\.5"),
    ("heads", ["blocks.4.resid_pre"], ValueError, r"'blocks\.4\.resid_pre' is not a receiver; receivers are"),
    ("heads", [("blocks.4.attn.k", 2)], IndexError, r"2 key/value heads.*grouped-query.*h // 2"),
    ("heads", [("blocks.4.attn.q", 4)], IndexError, r"outside the layer's 4 query heads"),
    ("heads", [("blocks.4.mlp", 1)], ValueError, r"an MLP receiver takes no head"),
    ("heads", ["blocks.0.attn.v"], ValueError, r"there are none"),
    ([(6, 0)], ["logits"], IndexError, r"head \(6, 0\) is outside 6 layers x 4 heads"),
    (["blocks.2.resid_mid"], ["logits"], ValueError, r"'blocks\.2\.resid_mid' is not a sender"),
    ([1.5], ["logits"], TypeError, r"a sender is one of"),
    ([], ["logits"], ValueError, r"no senders"),
    ("heads", [], ValueError, r"no receivers"),
])
def test_errors_name_the_problem_and_leave_the_model_usable(model, senders, receivers, error, match):
    with torch.no_grad():
        before = model(_ids(CORRUPT))
    with pytest.raises(error, match=match):
        path_patch(model, CLEAN, CORRUPT, logit_diff(3, 4), senders, receivers)
    assert_usable(model, before)


def test_metric_failure_mid_run_leaves_no_hooks(model):
    with torch.no_grad():
        before = model(_ids(CORRUPT))
    calls = []

    def metric(logits):  # fine for the clean and corrupt runs, then breaks
        calls.append(logits.shape[0])
        if len(calls) > 2:
            raise RuntimeError("metric broke")
        return logits[:, -1, 3] - logits[:, -1, 4]

    with pytest.raises(RuntimeError, match="metric broke"):
        path_patch(model, CLEAN, CORRUPT, metric, "heads", [("blocks.3.attn.q", 0)])
    assert_usable(model, before)


def test_demo_model_equals_the_naive_loop(demo_model):
    """The real Gemma 3 270M (18 layers, MQA) on a names swap."""
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    metric = logit_diff(" Mary", " John").bind(demo_model)
    senders = [(3, 1), (10, 0), (14, 2), "blocks.12.mlp.out"]
    receivers = [("blocks.15.attn.q", 1), ("blocks.16.attn.k", 0), "logits"]
    r = path_patch(demo_model, clean, corrupt, metric, senders, receivers, batch_size=3)
    span = r.clean_value - r.corrupt_value
    want = torch.tensor([(naive_value(demo_model, metric, s, receivers, clean, corrupt) - r.corrupt_value) / span
                         for s in senders]).float()
    torch.testing.assert_close(r.values, want, atol=1e-5, rtol=0)
    assert not demo_model.registry.active

"""Attribution graphs through a cross-layer transcoder, and node budgets (issue 18 items 1-2).

A CLT graph is exact (edges + constants = values for every target), its replacement model
reproduces the logits, each edge is a direct effect through every later layer, a CLT that writes
only to its own layer gives the per-layer graph, and a lazy CLT the eager one's graph. A budgeted
graph's rows are the full graph's rows (the features left out summed into their error nodes), its
features are the ones the influence ranking picks, and its memory stays within the estimate
made from the budget."""

from __future__ import annotations

import ctypes
import gc

import pytest
import torch
from support import TINY, FakeTokenizer, make_model

from interp.circuits import GraphTooLargeError, attribution_graph, estimate_bytes, intervene
from interp.circuits.dictionaries import GraphDictionaries
from interp.circuits.replacement import final_logits, replacement_forward, run_prompt
from interp.features import CrossLayerTranscoder, Transcoder

IDS = torch.tensor([2, 5, 7, 9, 11, 13, 4, 8, 6, 10])  # longer than TINY's window of 4


@pytest.fixture(scope="module")
def model():
    m = make_model(TINY, seed=1)
    m.tokenizer = FakeTokenizer(TINY.vocab_size)
    return m


@pytest.fixture(scope="module")
def clt():
    return CrossLayerTranscoder.random(TINY.n_layers, TINY.d_model, 40, seed=3, skip=True)


@pytest.fixture(scope="module")
def clt_graph(model, clt):
    return attribution_graph(model, IDS, clt, max_feature_nodes=None, batch_size=32, progress=False)


def logits_of(model):
    with torch.no_grad():
        return model(IDS[None])[0, -1].float()


# ---------------------------------------------------------------------- cross-layer transcoders
def test_clt_graph_is_exact_and_has_every_active_feature(model, clt, clt_graph):
    g = clt_graph
    assert g.check() < 1e-6 and g.logit_error < 1e-5
    run = run_prompt(model, IDS, GraphDictionaries(model, clt), len(IDS) - 1, bos_features=False)
    assert int(g.mask("feature").sum()) == g.active_features == sum(int((a != 0).sum()) for a in run.acts.values())
    assert g.transcoders == [f"blocks.{i}.pre_mlp_norm->blocks.{i}.post_mlp_norm" for i in range(TINY.n_layers)]
    # a layer-0 feature reaches features three layers up directly (it writes every later MLP output)
    layer = torch.tensor([n.layer for n in g.nodes])
    is_feat = g.mask("feature")
    assert g.adjacency[(layer == 4) & is_feat][:, (layer == 0) & is_feat].abs().sum() > 0


def test_clt_replacement_model_reproduces_the_logits_only_with_its_errors(model, clt):
    dicts = GraphDictionaries(model, clt)
    run = run_prompt(model, IDS, dicts, -1, bos_features=False)
    tokens = torch.arange(TINY.vocab_size)
    with torch.no_grad():
        full = final_logits(model, replacement_forward(model, run, dicts), len(IDS) - 1, tokens)
        without = final_logits(model, replacement_forward(model, run, dicts, errors=False), len(IDS) - 1, tokens)
    torch.testing.assert_close(full, logits_of(model), atol=1e-5, rtol=1e-5)
    assert (without - logits_of(model)).abs().max() > 1e-2


def test_clt_edges_are_direct_effects_through_every_later_layer(model, clt, clt_graph):
    """Triple one layer-0 feature in the frozen replacement model (every other feature held): each
    later feature's pre-activation and each logit moves by 2 * its edge from that feature."""
    g = clt_graph
    dicts = GraphDictionaries(model, clt)
    run = run_prompt(model, IDS, dicts, -1, bos_features=False)
    feats = [(i, n) for i, n in enumerate(g.nodes) if n.kind == "feature" and n.layer == 0]
    src, node = max(feats, key=lambda f: g.adjacency[:, f[0]].abs().sum())
    base = replacement_forward(model, run, dicts)
    acts = {k: v.clone() for k, v in run.acts.items()}
    acts[0][node.pos, node.index] *= 3.0
    moved = replacement_forward(model, run, dicts, acts=acts, frozen=base.frozen)
    checked = 0
    for i, n in enumerate(g.nodes):
        if n.kind == "feature" and n.layer > 0:
            enc = dicts.encoder_columns(n.layer, torch.tensor([n.index]))[0]
            change = float((moved.x_in[n.layer] - base.x_in[n.layer])[0, n.pos].detach().float() @ enc)
            assert change == pytest.approx(2.0 * float(g.adjacency[i, src]), abs=2e-5)
            checked += abs(float(g.adjacency[i, src])) > 1e-3
    tokens = torch.tensor([n.index for n in g.nodes if n.kind == "logit"])
    change = (final_logits(model, moved, len(IDS) - 1, tokens) - final_logits(model, base, len(IDS) - 1, tokens))
    torch.testing.assert_close(change.detach(), 2.0 * g.adjacency[g.mask("logit")][:, src], atol=2e-5, rtol=1e-4)
    assert checked > 5


def test_a_clt_writing_only_its_own_layer_gives_the_per_layer_graph(model):
    n, d, w = TINY.n_layers, TINY.d_model, 24
    tcs = [Transcoder.random(model, layer=i, d_sae=w, seed=i) for i in range(n)]
    dec = [torch.cat([tc.W_dec.detach()[:, None], torch.zeros(w, n - i - 1, d)], 1) for i, tc in enumerate(tcs)]
    clt = CrossLayerTranscoder([tc.W_enc.detach() for tc in tcs], dec, [tc.b_enc.detach() for tc in tcs],
                               [tc.b_dec.detach() for tc in tcs], [tc.threshold.detach() for tc in tcs])
    a = attribution_graph(model, IDS, tcs, max_feature_nodes=None, progress=False)
    b = attribution_graph(model, IDS, clt, max_feature_nodes=None, progress=False)
    assert [x.key for x in a.nodes] == [x.key for x in b.nodes]
    torch.testing.assert_close(b.adjacency, a.adjacency, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.constants, a.constants, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.values, a.values)


def test_a_lazy_clt_gives_the_eager_graph(model, clt, clt_graph, tmp_path):
    lazy = CrossLayerTranscoder.load(clt.save(tmp_path / "clt"), lazy=True)
    g = attribution_graph(model, IDS, lazy, max_feature_nodes=None, batch_size=32, progress=False)
    torch.testing.assert_close(g.adjacency, clt_graph.adjacency, atol=1e-6, rtol=1e-5)


def test_clt_interventions(model, clt, clt_graph):
    before = logits_of(model)
    top = [n for n, _ in clt_graph.top_features(3)]
    r = intervene(model, clt_graph, clt, {top[0]: 0.0, top[1]: 2 * top[1].activation})
    assert r.max_error < 1e-4  # direct: exact
    m = intervene(model, clt_graph, clt, {top[0]: 0.0}, mode="model")
    assert m.change.abs().max() > 0
    assert not model.registry.active and torch.equal(logits_of(model), before)


def test_clt_refusals(model, clt):
    with pytest.raises(TypeError, match="on its own"):
        attribution_graph(model, IDS, [clt], progress=False)
    other = CrossLayerTranscoder.random(TINY.n_layers - 1, TINY.d_model, 8)
    with pytest.raises(ValueError, match="layers"):
        attribution_graph(model, IDS, other, progress=False)
    assert not model.registry.active


def test_clt_and_per_layer_scores_side_by_side(model, clt, clt_graph):
    tcs = [Transcoder.random(model, layer=i, d_sae=40, seed=i) for i in range(TINY.n_layers)]
    per_layer = attribution_graph(model, IDS, tcs, max_feature_nodes=None, progress=False)
    for g in (clt_graph, per_layer):
        replacement, completeness = g.scores()
        assert 0 <= replacement <= 1 and 0 <= completeness <= 1


# ---------------------------------------------------------------------- node budgets
def dropped_into_errors(full, small):
    """The full graph's rows, restricted to the small graph's nodes, with the edges of the features
    the small graph left out added to the error node of their layer and position."""
    index = {n.key: i for i, n in enumerate(full.nodes)}
    keep = torch.tensor([index[n.key] for n in small.nodes])
    cols = full.adjacency[:, keep].clone()
    for j, n in enumerate(full.nodes):
        if n.kind == "feature" and n.key not in {x.key for x in small.nodes}:
            err = small.index(f"err L{n.layer}@{n.pos}")
            cols[:, err] += full.adjacency[:, j]
    return cols[keep], full.constants[keep]


@pytest.mark.parametrize("kind", ["per-layer", "clt"])
def test_budgeted_rows_are_the_full_graphs_rows(model, clt, kind):
    dicts = clt if kind == "clt" else [Transcoder.random(model, layer=i, d_sae=40, seed=i, skip=i == 2)
                                       for i in range(TINY.n_layers)]
    full = attribution_graph(model, IDS, dicts, max_feature_nodes=None, progress=False)
    small = attribution_graph(model, IDS, dicts, max_feature_nodes=30, batch_size=8, update_interval=1,
                              progress=False)
    assert int(small.mask("feature").sum()) == 30 and small.active_features == full.active_features > 100
    assert small.check() < 1e-6 and "30 features of" in repr(small)
    rows, consts = dropped_into_errors(full, small)
    t = small.targets
    torch.testing.assert_close(small.adjacency[t], rows[t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.constants, consts, atol=1e-6, rtol=1e-6)


def test_the_budget_keeps_the_features_the_influence_ranking_picks(model):
    """With one ranking (update_interval * batch_size >= the budget) the features are the top ones
    by influence through the logits' rows alone, computed here from the full graph."""
    tcs = [Transcoder.random(model, layer=i, d_sae=40, seed=i) for i in range(TINY.n_layers)]
    full = attribution_graph(model, IDS, tcs, max_feature_nodes=None, progress=False)
    small = attribution_graph(model, IDS, tcs, max_feature_nodes=25, batch_size=32, progress=False)
    logit = full.mask("logit")
    a = full.adjacency[logit].abs()
    score = (full.logit_probabilities[:, None] * a / a.sum(1, keepdim=True)).sum(0)
    feats = full.mask("feature").nonzero()[:, 0]
    top = feats[score[feats].argsort(descending=True, stable=True)[:25]]
    assert {full.nodes[int(i)].key for i in top} == {n.key for n in small.nodes if n.kind == "feature"}


def test_a_budget_above_the_active_count_is_the_full_graph(model, clt, clt_graph):
    g = attribution_graph(model, IDS, clt, max_feature_nodes=10**6, batch_size=32, progress=False)
    assert torch.equal(g.adjacency, clt_graph.adjacency)


def test_budget_arguments_are_checked(model, clt):
    for kw in ({"max_feature_nodes": 0}, {"max_feature_nodes": True}, {"update_interval": 0},
               {"batch_size": 2.0}):
        with pytest.raises(ValueError, match="must be a positive int"):
            attribution_graph(model, IDS, clt, progress=False, **kw)


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_the_budget_bounds_memory_and_the_estimate_holds(model):
    """Dense transcoders: about 50,000 active features, whose full graph (two 10 GB matrices) could
    never be built here; with a budget it runs within ``max_bytes``, and the peak resident memory
    it adds stays below the estimate (the estimate's coefficients, checked by measurement)."""
    tcs = [Transcoder.random(model, layer=i, d_sae=2048, seed=i, threshold=0.0) for i in range(TINY.n_layers)]
    with pytest.raises(GraphTooLargeError, match="max_feature_nodes="):
        attribution_graph(model, IDS, tcs, max_feature_nodes=None, max_bytes=400 * 2**20, progress=False)
    attribution_graph(model, IDS[:4], tcs, max_feature_nodes=8, progress=False)  # warm up the allocator
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the peak counts this graph only
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current size
        start = _rss()
    except OSError:
        pytest.skip("this kernel cannot reset the peak resident size (/proc/self/clear_refs)")
    g = attribution_graph(model, IDS, tcs, max_feature_nodes=600, batch_size=64, max_bytes=400 * 2**20,
                          progress=False)
    peak = _peak_rss() - start
    est = estimate_bytes(model, len(IDS), g.active_features, 600, int(g.mask("logit").sum()), 64,
                         writer_slots=g.active_features)
    assert g.active_features > 40_000 and g.check() < 1e-5
    assert est["rows"] > 0.5 * peak  # the budget's rows are the bulk of the memory, as estimated
    assert peak < sum(est.values()), (peak, est)


# ---------------------------------------------------------------------- the real model
def test_demo_clt_graph_is_exact_within_a_budget(demo_model):
    """The real Gemma 3 270M through a random CLT (all 18 layers): the full graph and a budgeted one
    are exact, reproduce the logits, and the budget's rows are the full graph's."""
    m = demo_model
    clt = CrossLayerTranscoder.random(m.cfg.n_layers, m.cfg.d_model, 48, seed=0, skip=True, threshold=0.3)
    full = attribution_graph(m, "The capital of France is", clt, max_feature_nodes=None, progress=False)
    assert full.logit_error < 1e-3 and full.check() < 1e-6 and full.active_features > 200
    assert "logit ' Paris'" in [n.label for n in full.nodes if n.kind == "logit"]
    small = attribution_graph(m, "The capital of France is", clt, max_feature_nodes=64, batch_size=16,
                              update_interval=1, progress=False)
    assert small.check() < 1e-6 and int(small.mask("feature").sum()) == 64
    rows, consts = dropped_into_errors(full, small)
    torch.testing.assert_close(small.adjacency[small.targets], rows[small.targets], atol=1e-4, rtol=1e-4)

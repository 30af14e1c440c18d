"""Attribution graphs: exactness (every target's edges add up to its value), each edge is a real
direct effect, the replacement model reproduces the logits, pruning keeps what it says, files and
exports, interventions, errors. On the tiny model (GQA, a prompt longer than the sliding window,
a global layer, skip transcoders, a layer without a transcoder) and on the demo model."""

from __future__ import annotations

import pytest
import torch
from support import SCRIPT, TINY, FakeTokenizer, make_model

from interp.circuits import Graph, GraphTooLargeError, attribution_graph, graph_scores, intervene
from interp.circuits.dictionaries import GraphDictionaries
from interp.circuits.replacement import final_logits, replacement_forward, run_prompt
from interp.features import JumpReLUSAE, Transcoder
from interp.hooks import NonFiniteError
from interp.model import Gemma3Config

IDS = torch.tensor([2, 5, 7, 9, 11, 13, 4, 8, 6, 10])  # longer than TINY's window of 4; token 7 is <script>


def transcoders(model, layers=None, d_sae=48, **kw):
    layers = range(model.cfg.n_layers) if layers is None else layers
    return [Transcoder.random(model, layer=i, d_sae=d_sae, seed=10 + i, skip=i % 2 == 0, **kw) for i in layers]


@pytest.fixture(scope="module")
def model():
    m = make_model(TINY, seed=1)
    m.tokenizer = FakeTokenizer(TINY.vocab_size)
    return m


@pytest.fixture(scope="module")
def tcs(model):
    out = transcoders(model, [0, 1, 2, 4, 5])  # layer 3 keeps its whole MLP (error nodes only)
    out[1].site, out[1].site_out = "blocks.1.resid_mid", "blocks.1.mlp.out"  # the other site pair
    return out


@pytest.fixture(scope="module")
def graph(model, tcs):
    return attribution_graph(model, IDS, tcs, batch_size=24, progress=False)


def logits_before(model):
    with torch.no_grad():
        return model(IDS[None])


# ---------------------------------------------------------------------- exactness
def test_every_target_is_the_sum_of_its_edges_and_constant(graph):
    res = graph.residual()[graph.targets].abs()
    assert (res <= 1e-6 * graph.scale()[graph.targets]).all()  # fp32 rounding of sums whose edges cancel
    assert graph.check() < 1e-6
    counts = {k: int(graph.mask(k).sum()) for k in ("embedding", "feature", "error", "logit")}
    assert counts["embedding"] == len(IDS) and counts["error"] == TINY.n_layers * len(IDS)
    assert counts["feature"] > 100 and 1 <= counts["logit"] <= 10
    # sources have no inputs; no node reads a later position; logits read everything earlier
    assert graph.adjacency[~graph.targets].abs().sum() == 0
    pos = torch.tensor([n.pos for n in graph.nodes])
    assert graph.adjacency[pos[:, None] < pos[None, :]].abs().sum() == 0


def test_mqa_config_and_a_bad_edge_would_be_seen():
    cfg = Gemma3Config(n_layers=3, d_model=24, d_mlp=48, n_heads=3, n_kv_heads=1, d_head=8, vocab_size=30, window=3,
                       layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    m = make_model(cfg, seed=3)
    g = attribution_graph(m, torch.tensor([2, 4, 6, 8, 10, 12]), transcoders(m, d_sae=24), progress=False)
    g.check()
    g.adjacency[g.targets.nonzero()[0, 0], 0] += 0.01  # one wrong edge breaks exactness
    with pytest.raises(AssertionError, match="edges \\+ constant"):
        g.check()


def test_bos_features_are_left_out_unless_asked_for(model, tcs, graph):
    assert graph.bos_features is False and not any(n.pos == 0 for n in graph.nodes if n.kind == "feature")
    with_bos = attribution_graph(model, IDS, tcs, bos_features=True, progress=False)
    assert any(n.pos == 0 for n in with_bos.nodes if n.kind == "feature") and with_bos.check() < 1e-6
    # what BOS features wrote is in the error nodes at position 0 instead
    err = [i for i, n in enumerate(graph.nodes) if n.kind == "error" and n.pos == 0 and n.layer == 0]
    err_b = [i for i, n in enumerate(with_bos.nodes) if n.kind == "error" and n.pos == 0 and n.layer == 0]
    assert float(graph.values[err[0]]) != pytest.approx(float(with_bos.values[err_b[0]]))


def test_batch_size_does_not_change_the_graph(model, tcs, graph):
    other = attribution_graph(model, IDS, tcs, batch_size=7, progress=False)
    torch.testing.assert_close(other.adjacency, graph.adjacency, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(other.constants, graph.constants, atol=1e-6, rtol=1e-5)


def test_replacement_model_reproduces_the_logits_only_with_its_errors(model, tcs):
    tc_map = GraphDictionaries(model, tcs)
    run = run_prompt(model, IDS, tc_map, -1, bos_features=False)
    tokens = torch.arange(TINY.vocab_size)
    with torch.no_grad():
        full = final_logits(model, replacement_forward(model, run, tc_map), len(IDS) - 1, tokens)
        without = final_logits(model, replacement_forward(model, run, tc_map, errors=False), len(IDS) - 1, tokens)
    real = logits_before(model)[0, -1]
    torch.testing.assert_close(full, real, atol=1e-5, rtol=1e-5)
    assert (without - real).abs().max() > 1e-2


def test_each_edge_is_a_direct_effect(model, tcs, graph):
    """Scale one source feature in the frozen replacement model: every target it reaches directly
    moves by (scale - 1) * edge when all other features are held (an independent forward, not a
    gradient)."""
    tc_map = GraphDictionaries(model, tcs)
    run = run_prompt(model, IDS, tc_map, -1, bos_features=False)
    feats = [(i, n) for i, n in enumerate(graph.nodes) if n.kind == "feature" and n.layer == 0]
    src, node = max(feats, key=lambda f: graph.adjacency[:, f[0]].abs().sum())
    base = replacement_forward(model, run, tc_map)
    acts = {k: v.clone() for k, v in run.acts.items()}
    acts[0][node.pos, node.index] *= 3.0
    moved = replacement_forward(model, run, tc_map, acts=acts, frozen=base.frozen)
    for i, n in enumerate(graph.nodes):
        if n.kind != "feature" or n.layer == 0:
            continue
        tc = tc_map.per_layer[n.layer]
        change = float((moved.x_in[n.layer] - base.x_in[n.layer])[0, n.pos].detach().float() @ tc.W_enc[:, n.index])
        assert change == pytest.approx(2.0 * float(graph.adjacency[i, src]), abs=2e-5)


def test_intervene_direct_is_exact_and_model_mode_runs_the_real_model(model, tcs, graph):
    before = logits_before(model)
    top = [n for n, _ in graph.top_features(3)]
    r = intervene(model, graph, tcs, {n.key: 0.0 for n in top})
    assert r.max_error < 1e-5 and r.change.abs().max() > 1e-4
    r2 = intervene(model, graph, tcs, {(n.layer, n.pos, n.index): 2 * n.activation for n in top[:1]})
    assert r2.max_error < 1e-5
    real = intervene(model, graph, tcs, {n.key: 0.0 for n in top}, mode="model")
    assert real.mode == "model" and torch.isfinite(real.change).all() and real.change.abs().max() > 1e-4
    assert torch.equal(real.predicted, r.predicted)  # the graph predicts direct effects in both modes
    assert "graph predicts" in [t.name for t in r.plot().data]
    assert not model.registry.active and torch.equal(logits_before(model), before)
    with pytest.raises(ValueError, match="error node"):
        intervene(model, graph, tcs, {"err L0@1": 0.0})
    with pytest.raises(KeyError, match="no node"):
        intervene(model, graph, tcs, {"L0.F99999@1": 0.0})
    with pytest.raises(ValueError, match="full graph"):
        intervene(model, graph.prune(), tcs, {top[0].key: 0.0})


# ---------------------------------------------------------------------- pruning and scores
@pytest.mark.parametrize("node_threshold,edge_threshold", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.99)])
def test_pruning_keeps_the_stated_fraction(graph, node_threshold, edge_threshold):
    p = graph.prune(node_threshold, edge_threshold)
    assert p.pruned.node_influence_kept >= node_threshold - 1e-6
    assert p.pruned.edge_influence_kept >= edge_threshold - 1e-6
    assert len(p) < len(graph)
    assert int(p.mask("embedding").sum()) == len(IDS) and int(p.mask("logit").sum()) == int(graph.mask("logit").sum())
    keys = [n.key for n in p.nodes]
    rows = torch.tensor([graph.index(k) for k in keys])
    kept = p.adjacency != 0
    torch.testing.assert_close(p.adjacency[kept], graph.adjacency[rows][:, rows][kept])  # edges keep their weights
    feats = p.mask("feature")
    assert kept[:, feats].any(0).all() and kept[feats].any(1).all()  # no dangling features


def test_scores_reward_features_over_errors(graph):
    replacement, completeness = graph.scores()
    assert 0 < replacement < 1 and 0 < completeness < 1
    perfect = graph.subgraph(torch.ones(len(graph), dtype=torch.bool))
    perfect.adjacency[:, graph.mask("error")] = 0
    assert graph_scores(perfect) == (1.0, 1.0)


# ---------------------------------------------------------------------- files, exports, plots
def test_save_and_load_round_trip(graph, tmp_path):
    back = Graph.load(graph.save(tmp_path / "g.safetensors"))
    assert torch.equal(back.adjacency, graph.adjacency) and back.nodes == graph.nodes and back.tokens == graph.tokens
    p = graph.prune()
    assert Graph.load(p.save(tmp_path / "p.safetensors")).pruned == p.pruned
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an attribution graph"):
        Graph.load(tmp_path / "other.safetensors")


def test_plot_escapes_tokens_and_sizes_by_influence(graph):
    fig = graph.plot()
    names = [t.name for t in fig.data if t.mode != "lines"]
    assert names == ["embedding", "error", "feature", "logit"]
    assert SCRIPT not in fig.to_json() and "&lt;script&gt;" in fig.to_json()
    feats = next(t for t in fig.data if t.name == "feature")
    assert max(feats.marker.size) > min(feats.marker.size)
    assert any(t.mode == "lines" for t in fig.data)


def test_logits_sit_above_the_position_they_predict_from(graph):
    """The logit stars cluster over the last position (most likely at the right), not across the row."""
    fig = graph.plot()
    logits = next(t for t in fig.data if t.name == "logit")
    last = len(graph.tokens) - 1
    assert all(last - 0.4 <= x <= last + 0.4 for x in logits.x)
    g = graph if graph.pruned is not None else graph.prune()
    probs = sorted(n.activation for n in g.nodes if n.kind == "logit")
    by_x = [p for _, p in sorted(zip(logits.x, [float(s) for s in logits.marker.size]))]
    assert len(by_x) == len(probs) and by_x == sorted(by_x)  # sized by probability: the largest at the right
    if len(logits.x) > 1:
        assert {"top center", "bottom center"} <= set(logits.textposition)


# ---------------------------------------------------------------------- errors
def test_bad_inputs_are_clear_errors_and_leave_the_model_usable(model, tcs):
    before = logits_before(model)
    sae = JumpReLUSAE.random(TINY.d_model, 16, site="blocks.1.resid_post")
    wrong_site = Transcoder.random(model, layer=1, d_sae=16)
    wrong_site.site_out = "blocks.2.post_mlp_norm"
    cases = [
        ([], ValueError, "at least one transcoder"),
        ([sae], ValueError, "is an SAE"),
        ([tcs[0], tcs[0]], ValueError, "two transcoders for layer 0"),
        ([wrong_site], ValueError, "same layer"),
        (["not a transcoder"], TypeError, "interp.features dictionaries"),
    ]
    for given, err, msg in cases:
        with pytest.raises(err, match=msg):
            attribution_graph(model, IDS, given, progress=False)
    with pytest.raises(ValueError, match="one prompt"):
        attribution_graph(model, [" w5| w6", " w5"], tcs, progress=False)
    with pytest.raises(IndexError, match="outside the prompt"):
        attribution_graph(model, IDS, tcs, position=10, progress=False)
    with pytest.raises(ValueError, match="batch_size must be"):
        attribution_graph(model, IDS, tcs, batch_size=0, progress=False)
    with pytest.raises(GraphTooLargeError, match="set batch_size=") as e:
        attribution_graph(model, IDS, tcs, max_bytes=20_000_000, progress=False)
    fits = int(str(e.value).split("set batch_size=")[1].split()[0])
    attribution_graph(model, IDS, tcs, max_bytes=20_000_000, batch_size=fits, progress=False)  # what it names fits
    with pytest.raises(GraphTooLargeError, match="set max_feature_nodes=") as e:
        attribution_graph(model, IDS, tcs, max_bytes=2_000_000, progress=False)
    fits = int(str(e.value).split("set max_feature_nodes=")[1].split()[0])
    small = attribution_graph(model, IDS, tcs, max_bytes=2_000_000, max_feature_nodes=fits, batch_size=1,
                              progress=False)
    assert int(small.mask("feature").sum()) == fits and small.check() < 1e-6
    with pytest.raises(GraphTooLargeError, match="shorter prompt"):
        attribution_graph(model, IDS, tcs, max_bytes=10_000, progress=False)
    assert not model.registry.active and torch.equal(logits_before(model), before)


def test_non_finite_transcoder_is_named(model):
    bad = Transcoder.random(model, layer=2, d_sae=16)
    with torch.no_grad():
        bad.W_enc[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="layer 2 features"):
        attribution_graph(model, IDS, [bad], progress=False)
    assert not model.registry.active


def test_non_finite_edges_are_an_error(model):
    """Finite features but an overflowing decoder: the edges (here from the error nodes) are not
    finite, found chunk by chunk, and the model is left as it was."""
    before = logits_before(model)
    bad = Transcoder.random(model, layer=2, d_sae=16)
    with torch.no_grad():
        bad.b_dec[0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN or inf edges"):
        attribution_graph(model, IDS, [bad], batch_size=4, progress=False)
    assert not model.registry.active and torch.equal(logits_before(model), before)


def test_chosen_logits(model, tcs):
    g = attribution_graph(model, IDS, tcs, logits=[" w5", 9], progress=False)
    assert [n.index for n in g.nodes if n.kind == "logit"] == [5, 9]
    g.check()


# ---------------------------------------------------------------------- the real model
def test_demo_graph_is_exact(demo_model):
    m = demo_model
    tcs = [Transcoder.random(m, layer=i, d_sae=256, seed=i, k=8) for i in (2, 9, 16)]
    g = attribution_graph(m, "The capital of France is", tcs, progress=False)
    assert g.logit_error < 1e-3
    assert "logit ' Paris'" in [n.label for n in g.nodes if n.kind == "logit"]  # real tokenizer, real predictions
    assert g.check() < 1e-6
    assert int(g.mask("feature").sum()) == 3 * 8 * (len(g.tokens) - 1)  # TopK: 8 per token; none at BOS

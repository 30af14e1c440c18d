"""Graph files (``Graph.to_neuronpedia``): Neuronpedia's graph schema, circuit-tracer's conventions
(checked against what circuit-tracer 0.5.0 itself computes, ``ct_viewer/golden.json``), the slug
and scan rules, and the file opened in circuit-tracer's own local viewer in headless Chromium.

The viewer test needs circuit-tracer's virtual environment and the viewer's JavaScript libraries,
which ``.ci/circuit-tracer-venv DIR`` builds; ``INTERP_CIRCUIT_TRACER_PYTHON=DIR/bin/python``
points the test at it (else it skips, or fails when ``INTERP_REQUIRE_BROWSER`` is set).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from support import SCRIPT, TINY, FakeTokenizer, make_model

from interp.circuits import Graph, Node, attribution_graph, influence, prune
from interp.circuits.graph_files import NEURONPEDIA_MODELS, neuronpedia_model_id, node_record
from interp.circuits.prune import cumulative
from interp.features import Transcoder

HERE = Path(__file__).parent / "ct_viewer"
GOLDEN = json.loads((HERE / "golden.json").read_text())
IDS = torch.tensor([2, 5, 7, 9, 11, 13, 4, 8, 6, 10])


@pytest.fixture(scope="module")
def graph() -> Graph:
    model = make_model(TINY, seed=1)
    model.tokenizer = FakeTokenizer(TINY.vocab_size)
    tcs = [Transcoder.random(model, layer=i, d_sae=48, seed=10 + i, skip=i % 2 == 0) for i in range(TINY.n_layers)]
    return attribution_graph(model, IDS, tcs, batch_size=24, progress=False)


def write(graph: Graph, folder: Path, slug: str = "tiny-graph", **kw) -> dict:
    return json.loads(graph.to_neuronpedia(folder, slug, scan=kw.pop("scan", "gemma-3-270m"), **kw).read_text())


# ------------------------------------------------------------- Neuronpedia's graph schema
def _is(value, *types: str) -> bool:
    """JSON-schema type check (``integer`` excludes bools and floats, ``number`` excludes bools)."""
    checks = {"string": lambda v: isinstance(v, str), "null": lambda v: v is None,
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "boolean": lambda v: isinstance(v, bool), "array": lambda v: isinstance(v, list),
              "object": lambda v: isinstance(v, dict)}
    return any(checks[t](value) for t in types)


def check_schema(doc: dict) -> None:
    """The facts of Neuronpedia's graph schema (its webapp's ``graph-schema.json``): required keys
    and their types, plus the types circuit-tracer's ``graph_models`` give the optional ones."""
    assert set(doc) >= {"metadata", "qParams", "nodes", "links"}
    meta = doc["metadata"]
    for key, types in {"slug": ("string",), "scan": ("string",), "prompt_tokens": ("array",),
                       "prompt": ("string",)}.items():
        assert key in meta and _is(meta[key], *types), key
    assert all(_is(t, "string") for t in meta["prompt_tokens"])
    assert _is(meta.get("node_threshold", 0.0), "number") and _is(meta.get("transcoder_list", []), "array")
    q = doc["qParams"]
    assert _is(q, "object") and all(_is(v, "string") for v in q.get("pinnedIds", []))
    for key in ("supernodes",):
        assert _is(q.get(key, []), "array")
    for key in ("linkType", "clickedId", "sg_pos"):
        assert _is(q.get(key, ""), "string")
    required = {"node_id": ("string",), "feature": ("integer", "null"), "layer": ("string", "integer"),
                "ctx_idx": ("integer",), "feature_type": ("string",), "jsNodeId": ("string",), "clerp": ("string",)}
    optional = {"influence": ("number", "null"), "activation": ("number", "null"), "token_prob": ("number",),
                "is_target_logit": ("boolean",), "run_idx": ("integer",), "reverse_ctx_idx": ("integer",)}
    for node in doc["nodes"]:
        for key, types in required.items():
            assert key in node and _is(node[key], *types), (key, node)
        for key, types in optional.items():
            assert key not in node or _is(node[key], *types), (key, node)
    for link in doc["links"]:
        assert _is(link["source"], "string") and _is(link["target"], "string") and _is(link["weight"], "number")


def test_file_passes_neuronpedia_schema_and_links_resolve(graph, tmp_path):
    doc = write(graph, tmp_path)
    check_schema(doc)
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids))
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert {n["feature_type"] for n in doc["nodes"]} == {"embedding", "cross layer transcoder",
                                                          "mlp reconstruction error", "logit"}
    assert doc["metadata"]["prompt_tokens"][2] == SCRIPT and doc["metadata"]["scan"] == "gemma-3-270m"
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert sum(n["is_target_logit"] for n in logits) == 1 and all(n["layer"] == str(TINY.n_layers + 1) for n in logits)
    meta = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [m["slug"] for m in meta["graphs"]] == ["tiny-graph"]
    write(graph, tmp_path)  # a rewrite replaces its entry
    assert len(json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]) == 1


def test_a_broken_file_fails_the_schema_check(graph, tmp_path):
    doc = write(graph, tmp_path)
    for breaks in (lambda d: d["metadata"].pop("scan"), lambda d: d["nodes"][0].update(ctx_idx="0"),
                   lambda d: d["nodes"][0].pop("jsNodeId"), lambda d: d["links"][0].update(weight=None)):
        broken = json.loads(json.dumps(doc))
        breaks(broken)
        with pytest.raises(AssertionError):
            check_schema(broken)


# ------------------------------------------------------------- circuit-tracer's conventions
def test_node_records_match_circuit_tracer():
    g = GOLDEN["nodes"]
    feature = node_record(Node("feature", 3, 5, 1234, "", 1.5), 18, 0.25, False)
    assert feature == g["feature"]
    embedding = node_record(Node("embedding", -1, 1, 817, "x"), 18, 0.75, False)
    assert embedding == g["embedding"]
    logit = node_record(Node("logit", 18, 6, 2201, "logit ' Paris'", 0.4567), 18, 0.9, True)
    assert logit == g["logit"]  # influence null, clerp with double quotes
    # errors: circuit-tracer 0.5.0 writes node_id '0_{layer}_{pos}', which collides with layer 0's
    # features (its issue #78); its fix (pull request #102) writes '{layer}_-1_{pos}', as we do
    error = node_record(Node("error", 2, 4, -1, ""), 18, 0.5, False)
    assert error == {**g["error"], "node_id": "2_-1_4"} and g["error"]["node_id"] == "0_2_4"


def test_logit_clerp_parses_as_circuit_tracers_viewer_reads_it(graph, tmp_path):
    doc = write(graph, tmp_path)
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    words = {n.index: n.label for n in graph.nodes if n.kind == "logit"}
    for n in logits:
        token = n["clerp"].split('"')[1].split('" k(p=')[0]  # util-cg.js: d.clerp?.split(`"`)[1]?.split(...)[0]
        assert repr(token) == words[n["feature"]].removeprefix("logit ")
        assert float(n["clerp"].split("(p=")[1].split(")")[0]) == pytest.approx(n["token_prob"], abs=5e-4)
        assert n["influence"] is None and n["activation"] is None


def _golden_graph() -> tuple[Graph, list[int]]:
    """circuit-tracer's golden graph in our node order; ``perm[i]``: our node i's index in theirs."""
    p = GOLDEN["prune"]
    feats, n_layers, n_pos = p["features"], p["n_layers"], p["n_pos"]
    n_f, n_log = len(feats), len(p["logit_probabilities"])
    err0, tok0 = n_f, n_f + n_layers * n_pos
    log0 = tok0 + n_pos
    nodes = [Node("embedding", -1, pos, pos) for pos in range(n_pos)]
    perm = [tok0 + pos for pos in range(n_pos)]
    nodes += [Node("feature", layer, pos, f, activation=1.0) for layer, pos, f in feats]
    perm += list(range(n_f))
    nodes += [Node("error", layer, pos, -1) for layer in range(n_layers) for pos in range(n_pos)]
    perm += list(range(err0, tok0))
    nodes += [Node("logit", n_layers, n_pos - 1, 50 + i, activation=pr)
              for i, pr in enumerate(p["logit_probabilities"])]
    perm += list(range(log0, log0 + n_log))
    a = torch.tensor(p["adjacency"])[perm][:, perm]
    n = len(nodes)
    return Graph(a, torch.zeros(n), torch.zeros(n), nodes, torch.arange(n_pos), ["t"] * n_pos, n_layers), perm


def test_influence_is_circuit_tracers_cumulative_influence_on_the_full_graph():
    g, perm = _golden_graph()
    p = GOLDEN["prune"]
    theirs = torch.tensor(p["cumulative_influence"])[perm]
    assert torch.allclose(cumulative(influence(g)), theirs, atol=1e-6)
    pruned = prune(g, p["node_threshold"], p["edge_threshold"])
    kept = [n.key for n in pruned.nodes]
    assert kept == [g.nodes[i].key for i in range(len(g)) if p["node_mask"][perm[i]]]  # the same nodes kept
    mine = torch.tensor([float(theirs[g.index(k)]) for k in kept])
    assert torch.allclose(pruned.cumulative_influence, mine, atol=1e-6)  # the full graph's, not the pruned one's


def test_the_viewers_influence_filter_shows_the_pruned_graph(graph, tmp_path):
    doc = write(graph, tmp_path)
    inner = [n for n in doc["nodes"] if n["feature_type"] not in ("embedding", "logit")]
    hidden = [n for n in inner if n["influence"] > doc["metadata"]["node_threshold"]]
    assert len(hidden) <= 1  # only the node that crosses the threshold, as circuit-tracer's files
    full = cumulative(influence(graph))
    by_id = {node_record(n, graph.n_layers, 0.0, False)["node_id"]: float(full[i]) for i, n in enumerate(graph.nodes)}
    assert all(n["influence"] == pytest.approx(by_id[n["node_id"]], abs=1e-6) for n in inner)


def test_a_pruned_graph_keeps_the_full_graphs_influence_through_save_and_load(graph, tmp_path):
    pruned = graph.prune()
    again = Graph.load(pruned.save(tmp_path / "p.safetensors"))
    assert torch.equal(again.cumulative_influence, pruned.cumulative_influence)
    assert write(again, tmp_path / "a") == write(graph, tmp_path / "b")  # pruned first or here: one file
    assert torch.equal(pruned.prune(0.5).cumulative_influence,
                       pruned.cumulative_influence[[pruned.index(n.key) for n in pruned.prune(0.5).nodes]])
    pruned.cumulative_influence = None
    with pytest.raises(ValueError, match="pass the unpruned graph"):
        write(pruned, tmp_path / "c")


# ------------------------------------------------------------- slug and scan
@pytest.mark.parametrize("slug", ["my graph?", "../escape", ".hidden", "a/b", "", "ü"])
def test_slugs_outside_neuronpedias_rule_are_refused(graph, tmp_path, slug):
    with pytest.raises(ValueError, match="only letters, digits"):
        write(graph, tmp_path, slug)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("scan", ["interp-blocks.0.pre_mlp_norm->blocks.0.post_mlp_norm", "tiny", "gemma-2-2b"])
def test_scans_that_neuronpedia_refuses_are_refused(graph, tmp_path, scan):
    with pytest.raises(ValueError, match="Neuronpedia model id"):
        write(graph, tmp_path, scan=scan)


def test_default_scan_is_the_models_neuronpedia_id(graph, tmp_path):
    with pytest.raises(ValueError, match="does not record which Gemma 3"):
        graph.to_neuronpedia(tmp_path, "x")  # a random 6-layer model is no released Gemma 3
    g = Graph.load(graph.save(tmp_path / "g.safetensors"))
    g.model_id = "gemma-3-1b-it"
    assert Graph.load(g.save(tmp_path / "g.safetensors")).model_id == "gemma-3-1b-it"
    doc = json.loads(g.to_neuronpedia(tmp_path, "x").read_text())
    assert doc["metadata"]["scan"] == "gemma-3-1b-it"


def test_neuronpedia_model_ids():
    assert neuronpedia_model_id("google/gemma-3-270m") == neuronpedia_model_id("demo") == "gemma-3-270m"
    assert neuronpedia_model_id("google/gemma-3-1b-pt") == "gemma-3-1b"
    assert neuronpedia_model_id("/data/models/gemma-3-4b-it/") == "gemma-3-4b-it"
    assert neuronpedia_model_id("google/gemma-3-27b-it-qat") == "gemma-3-27b-it"
    for other in ("", "google/gemma-2-2b", "/tmp/weights", "gemma-3-1b1"):
        assert neuronpedia_model_id(other) == ""
    assert len(NEURONPEDIA_MODELS) == 10


# ------------------------------------------------------------- circuit-tracer's local viewer
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def viewer() -> tuple[str, Path, str]:
    """(the circuit-tracer venv's python, the viewer's node_modules, chromium), or a skip."""
    python = os.environ.get("INTERP_CIRCUIT_TRACER_PYTHON", "")
    modules = Path(python).absolute().parent.parent / "viewer" / "node_modules" if python else Path()
    missing = ("INTERP_CIRCUIT_TRACER_PYTHON is not set (build the venv with .ci/circuit-tracer-venv DIR, then "
               "INTERP_CIRCUIT_TRACER_PYTHON=DIR/bin/python)" if not python else
               f"{python} does not exist" if not Path(python).exists() else
               f"no {modules / 'playwright-core'} (.ci/circuit-tracer-venv installs it)"
               if not (modules / "playwright-core").exists() else
               "no node on this machine" if shutil.which("node") is None else
               "no chromium on this machine (apt-get install chromium)" if CHROMIUM is None else "")
    if missing:
        if os.environ.get("INTERP_REQUIRE_BROWSER") and python:
            pytest.fail(missing)
        pytest.skip(missing)
    return python, modules, str(CHROMIUM)


def open_in_viewer(viewer, data: Path, query: str, shot: Path) -> dict:
    """Start circuit-tracer's server on ``data``, load its graph page in Chromium, report what it drew."""
    python, modules, chromium = viewer
    server = subprocess.Popen([python, str(HERE / "serve.py"), str(data)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().strip() or 0)
        assert port, server.stderr.read() if server.stderr else "the server printed no port"
        proc = subprocess.run(["node", str(HERE / "view.cjs"), f"http://127.0.0.1:{port}/index.html?{query}",
                               str(shot), str(modules), chromium, str(shot.parent / f"profile-{shot.stem}")],
                              capture_output=True, text=True, timeout=180)
    finally:
        server.kill()
        server.wait(timeout=10)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_circuit_tracers_viewer_draws_every_node(graph, viewer, tmp_path):
    doc = write(graph, tmp_path / "data")
    threshold = doc["metadata"]["node_threshold"]
    shown = [n for n in doc["nodes"] if n["feature_type"] in ("embedding", "logit") or n["influence"] <= threshold]
    seen = open_in_viewer(viewer, tmp_path / "data", "slug=tiny-graph", tmp_path / "default.png")
    assert seen["errors"] == [] and seen["blocked"] == []
    assert seen["nodes"] == len(shown) >= len(doc["nodes"]) - 1  # the viewer's own filter at node_threshold
    tokens = [n["clerp"].split('"')[1] for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert sorted(t for t in seen["logitLabels"] if t.startswith(" w")) == sorted(tokens)  # no 'undefined'
    everything = open_in_viewer(viewer, tmp_path / "data", "slug=tiny-graph&pruningThreshold=1",
                                tmp_path / "all.png")
    assert everything["errors"] == [] and everything["nodes"] == len(doc["nodes"])
    keep = os.environ.get("INTERP_VIEWER_SCREENSHOT")
    if keep:
        shutil.copy(tmp_path / "default.png", keep)

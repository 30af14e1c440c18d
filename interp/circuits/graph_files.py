"""Graph files: the JSON that Neuronpedia's graph viewer and circuit-tracer's local viewer read.

The format is circuit-tracer's (``create_graph_files``, 0.5.0) and Neuronpedia's graph schema:
``metadata`` (``slug``, ``scan``, ``transcoder_list``, ``prompt_tokens``, ``prompt``,
``node_threshold``, ``schema_version``), ``qParams``, ``nodes``, ``links``. As circuit-tracer
writes them:

- node ids: a feature ``{layer}_{feature}_{pos}``, an error ``{layer}_-1_{pos}`` (circuit-tracer's
  fixed form, pull request #102: 0.5.0's ``0_{layer}_{pos}`` collided with layer 0's features), a
  token ``E_{token id}_{pos}``, a logit ``{n_layers + 1}_{token id}_{pos}``;
- ``influence``: each node's *cumulative* influence on the full graph, before pruning (nodes
  sorted by influence, the running sum over the total), so that the viewers' influence filter
  (keep nodes with ``influence <= node_threshold``) shows the pruned graph; ``null`` for logits;
- a logit's ``clerp``: ``Output "{token}" (p=0.123)`` (the viewer reads the token between the
  double quotes).

``scan`` names the model, as Neuronpedia reads it: a model id it hosts (for Gemma 3:
:data:`NEURONPEDIA_MODELS`); a slug and a scan hold only letters, digits, ``_``, ``.`` and ``-``.

>>> check_slug("capital-of-france")
'capital-of-france'
>>> neuronpedia_model_id("google/gemma-3-1b-pt"), neuronpedia_model_id("/models/gemma-3-270m-it")
('gemma-3-1b', 'gemma-3-270m-it')
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_text
from .prune import prune

if TYPE_CHECKING:
    from .graph import Graph, Node

SIZES = {18: "270m", 26: "1b", 34: "4b", 48: "12b", 62: "27b"}  # the released Gemma 3 sizes by layer count
NEURONPEDIA_MODELS = tuple(f"gemma-3-{s}{t}" for s in SIZES.values() for t in ("", "-it"))
NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")


def neuronpedia_model_id(source: str) -> str:
    """Neuronpedia's model id for a model loaded from ``source`` (a hub id or a folder named like
    one: ``google/gemma-3-4b-it`` -> ``gemma-3-4b-it``, ``gemma-3-1b-pt`` -> ``gemma-3-1b``); ``""``
    when the name is not a released Gemma 3. The ``demo`` model is Gemma 3 270M (pretrained)."""
    if str(source) == "demo":
        return "gemma-3-270m"
    name = Path(str(source).rstrip("/\\")).name.lower()
    found = re.search(r"gemma-3-(270m|1b|4b|12b|27b)(-it|-pt)?(?![a-z0-9])", name)
    if found is None:
        return ""
    return f"gemma-3-{found.group(1)}" + ("-it" if found.group(2) == "-it" else "")


def check_slug(slug: Any) -> str:
    """``slug`` if Neuronpedia accepts it as a graph slug (and it is a plain file name), else a
    ValueError naming the rule."""
    if not isinstance(slug, str) or not NAME_CHARS.fullmatch(slug) or slug.startswith("."):
        raise ValueError(f"slug {slug!r} may hold only letters, digits, '_', '.' and '-' and may not start with '.' "
                         "(Neuronpedia's rule for graph slugs; it is also the file name), e.g. 'capital-of-france'")
    return slug


def check_scan(scan: Any) -> str:
    """``scan`` if it is one of the Gemma 3 model ids Neuronpedia hosts, else a ValueError."""
    if not isinstance(scan, str) or not NAME_CHARS.fullmatch(scan) or scan not in NEURONPEDIA_MODELS:
        raise ValueError(f"scan {scan!r} must be the Neuronpedia model id of the model the graph was made on "
                         "(Neuronpedia reads scan as a model id and refuses others): one of "
                         f"{list(NEURONPEDIA_MODELS)}")
    return scan


def default_scan(graph: Graph) -> str:
    """The graph's model id, or a ValueError saying which scan to pass."""
    if graph.model_id:
        return check_scan(graph.model_id)
    size = SIZES.get(graph.n_layers)
    hint = (f"for a {graph.n_layers}-layer model: 'gemma-3-{size}' (pretrained) or 'gemma-3-{size}-it'" if size
            else f"a {graph.n_layers}-layer model is no released Gemma 3 size, so Neuronpedia has no model for it; "
                 f"circuit-tracer's local viewer takes any of {list(NEURONPEDIA_MODELS)}")
    raise ValueError(f"this graph does not record which Gemma 3 it was made on; pass scan= ({hint})")


def logit_token(node: Node) -> str:
    """The token text of a logit node (its label is ``logit`` and the token's repr)."""
    text = node.label.removeprefix("logit ")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, str) else text


def node_record(node: Node, n_layers: int, influence: float | None, target: bool) -> dict[str, Any]:
    """One node as circuit-tracer's graph file writes it (see the module docstring)."""
    n = node
    if n.kind == "feature":
        ident, js = f"{n.layer}_{n.index}_{n.pos}", f"{n.layer}_{n.index}-0"
        feature, layer, ftype = (n.layer + n.index) * (n.layer + n.index + 1) // 2 + n.index, str(n.layer), \
            "cross layer transcoder"
    elif n.kind == "error":
        ident, js, feature, layer, ftype = (f"{n.layer}_-1_{n.pos}", f"{n.layer}_{n.pos}-0", -1, str(n.layer),
                                            "mlp reconstruction error")
    elif n.kind == "embedding":
        ident, js, feature, layer, ftype = f"E_{n.index}_{n.pos}", f"E_{n.index}-{n.pos}", n.pos, "E", "embedding"
    else:
        layer = str(n_layers + 1)
        ident, js, feature, ftype = f"{layer}_{n.index}_{n.pos}", f"L_{n.index}-{n.pos}", n.index, "logit"
    logit = n.kind == "logit"
    return {"node_id": ident, "feature": feature, "layer": layer, "ctx_idx": n.pos, "feature_type": ftype,
            "token_prob": n.activation if logit else 0.0, "is_target_logit": target, "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": js,
            "clerp": f'Output "{logit_token(n)}" (p={n.activation:.3f})' if logit else "",
            "influence": None if logit else influence, "activation": n.activation if n.kind == "feature" else None}


def to_neuronpedia(graph: Graph, path: str | os.PathLike, slug: str, scan: str | None = None,
                   node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Path:
    """Write ``{path}/{slug}.json`` in the graph format of Neuronpedia's viewer and circuit-tracer's
    local viewer (see the module docstring) and add it to ``{path}/graph-metadata.json``. An
    unpruned graph is pruned first; a pruned one must carry the full graph's influence (graphs
    pruned by :func:`~interp.circuits.prune.prune` do). ``scan``: the Neuronpedia model id
    (default: the one the graph records, e.g. ``gemma-3-270m``). Returns the JSON file.

    >>> graph.to_neuronpedia("graphs", "capital-of-france")  # doctest: +SKIP
    PosixPath('graphs/capital-of-france.json')
    """
    check_slug(slug)
    scan = default_scan(graph) if scan is None else check_scan(scan)
    g = graph if graph.pruned is not None else prune(graph, node_threshold, edge_threshold)
    if g.cumulative_influence is None:
        raise ValueError("this pruned graph does not carry its full graph's influence (it was pruned by an older "
                         "version or built by hand); pass the unpruned graph and let to_neuronpedia prune it")
    ranks = g.cumulative_influence.tolist()
    first_logit = next((i for i, n in enumerate(g.nodes) if n.kind == "logit"), -1)
    nodes = [node_record(n, g.n_layers, float(ranks[i]), i == first_logit) for i, n in enumerate(g.nodes)]
    nz = g.adjacency.nonzero()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(g.adjacency[t, s])}
             for t, s in nz.tolist()]
    meta = {"slug": slug, "scan": scan, "transcoder_list": list(g.transcoders), "prompt_tokens": list(g.tokens),
            "prompt": g.prompt, "node_threshold": g.pruned.node_threshold if g.pruned else node_threshold,
            "schema_version": 1}
    doc = {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                         "sg_pos": ""}, "nodes": nodes, "links": links}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{slug}.json"
    write_text(out, json.dumps(doc))
    index = folder / "graph-metadata.json"
    listed = json.loads(index.read_text(encoding="utf-8")).get("graphs", []) if index.is_file() else []
    listed = [m for m in listed if m.get("slug") != slug] + [meta]
    write_text(index, json.dumps({"graphs": listed}, indent=1))
    return out


__all__ = ["to_neuronpedia", "neuronpedia_model_id", "check_slug", "check_scan", "NEURONPEDIA_MODELS"]

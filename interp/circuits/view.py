"""Look at an attribution graph: a plotly view for Jupyter (the JSON that Neuronpedia's graph
viewer and circuit-tracer's local viewer read is written by :mod:`interp.circuits.graph_files`).

The view puts token positions across and layers up (token embeddings at the bottom, the logits
at the top); a node's size is its influence on the logits, an edge's colour its sign (blue
excites, red inhibits) and its width its share of the target's input times the target's
influence (the edges that matter most for the logits are drawn, at most ``max_edges``). Hovering
a feature shows its activation and influence, and, given the store it was harvested from and the
transcoders, the contexts where it fires most.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from ..display import figure
from ..plots import escape_text, escape_token
from .prune import influence, normalized, prune

if TYPE_CHECKING:
    from .graph import Graph, Node

COLORS = {"embedding": "#6c757d", "feature": "#2a9d8f", "error": "#adb5bd", "logit": "#e9c46a"}
SYMBOLS = {"embedding": "square", "feature": "circle", "error": "diamond", "logit": "star"}


def _positions(graph: Graph) -> list[tuple[float, float]]:
    """``(x, y)`` per node: position (features of one layer and position spread across it), layer."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, n in enumerate(graph.nodes):
        groups.setdefault((n.layer, n.pos) if n.kind != "logit" else (n.layer, -1), []).append(i)
    xy = [(0.0, 0.0)] * len(graph)
    for (layer, pos), members in groups.items():
        if pos == -1:  # logits: above the position they predict from, the most likely at the right
            members = sorted(members, key=lambda i: graph.nodes[i].activation)
        for j, i in enumerate(members):
            n = graph.nodes[i]
            x = n.pos + (0.8 * (j + 0.5) / len(members) - 0.4 if len(members) > 1 else 0.0)
            xy[i] = (x, float(layer))
    return xy


def _contexts(store: Any, transcoders: Any, nodes: Sequence[Node], k: int = 3) -> dict[int, str]:
    """Hover lines with each feature's top contexts in ``store`` (``{node number: html}``)."""
    from ..features.dashboard import top_activations

    if transcoders is None:
        raise ValueError("to show top activations, pass the transcoders too: graph.plot(store=..., transcoders=...)")
    tcs = transcoders if isinstance(transcoders, Mapping) else {
        int(t.site.split(".")[1]): t for t in transcoders if t.site}
    out: dict[int, str] = {}
    by_layer: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.kind == "feature" and n.layer in tcs:
            by_layer.setdefault(n.layer, []).append(i)
    tok = getattr(store, "tokenizer", None)
    for layer, members in by_layer.items():
        feats = sorted({nodes[i].index for i in members})
        tops = top_activations(tcs[layer], store, feats, k=k, window=(8, 0), progress=False)
        for i in members:
            lines = []
            for row, pos, value in tops.top(nodes[i].index):
                words = store.token_strings(row, tok)[max(0, pos - 8):pos + 1]
                shown = "".join(escape_token(w) for w in words[:-1]) + f"<b>{escape_token(words[-1])}</b>"
                lines.append(f"{value:.2f}: …{shown}")
            out[i] = "<br>".join(lines) if lines else "(never fires in the store)"
    return out


def plot_graph(graph: Graph, store: Any = None, transcoders: Any = None, title: str | None = None,
               node_threshold: float = 0.8, edge_threshold: float = 0.98, max_edges: int = 400) -> go.Figure:
    """The graph as a figure; an unpruned graph is pruned first (``node_threshold``,
    ``edge_threshold``). At most ``max_edges`` edges are drawn (the heaviest).

    >>> graph.prune().plot(store=store, transcoders=transcoders)  # doctest: +SKIP
    """
    g = graph if graph.pruned is not None else prune(graph, node_threshold, edge_threshold)
    inf = influence(g)
    inf[g.mask("logit")] = g.logit_probabilities  # logits: sized by probability
    scale = float(inf.max()) or 1.0
    xy = _positions(g)
    extra = _contexts(store, transcoders, g.nodes) if store is not None else {}
    fig = figure()
    a = g.adjacency
    nz = a.nonzero()
    if len(nz):
        # an edge's weight for drawing: its share of the target's input times the target's influence
        # (raw weights are in each target's own units: a feature's pre-activation, a logit)
        score = (normalized(a) * inf[:, None])[nz[:, 0], nz[:, 1]]
        signs = a[nz[:, 0], nz[:, 1]] > 0
        order = score.argsort(descending=True)[:max_edges]
        top = float(score.max()) or 1.0
        for sign, color in ((True, "rgba(33,102,172,{a})"), (False, "rgba(178,24,43,{a})")):
            for lo, hi, width in ((0.5, 1.01, 3.0), (0.15, 0.5, 1.8), (0.0, 0.15, 0.8)):
                xs: list[float | None] = []
                ys: list[float | None] = []
                for j in order.tolist():
                    if bool(signs[j]) != sign or not lo <= float(score[j]) / top < hi:
                        continue
                    t, s = (int(v) for v in nz[j])
                    xs += [xy[s][0], xy[t][0], None]
                    ys += [xy[s][1], xy[t][1], None]
                if xs:
                    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                             line={"width": width, "color": color.format(a=0.25 + 0.5 * hi / 1.01)}))
    for kind in ("embedding", "error", "feature", "logit"):
        idx = [i for i, n in enumerate(g.nodes) if n.kind == kind]
        if not idx:
            continue
        hover = []
        for i in idx:
            n = g.nodes[i]
            text = f"<b>{escape_text(n.label)}</b><br>value {float(g.values[i]):.3f}"
            if kind == "feature":
                text += f"<br>activation {n.activation:.3f}"
            if kind == "logit":
                text += f"<br>probability {n.activation:.3f}"
            text += f"<br>influence {float(inf[i]):.4f}"
            if i in extra:
                text += "<br><i>top activations</i><br>" + extra[i]
            hover.append(text)
        sizes = [6 + 22 * (float(inf[i]) / scale) ** 0.5 for i in idx]
        words, places = None, None
        if kind == "logit":  # labels alternate above and below, so that neighbours in one column do not collide
            words = [escape_token(g.nodes[i].label.removeprefix("logit ")[1:-1]) for i in idx]
            by_x = sorted(range(len(idx)), key=lambda j: xy[idx[j]][0])
            places = [""] * len(idx)
            for rank, j in enumerate(by_x):
                places[j] = "top center" if (len(by_x) - 1 - rank) % 2 == 0 else "bottom center"
        fig.add_trace(go.Scatter(x=[xy[i][0] for i in idx], y=[xy[i][1] for i in idx], name=kind,
                                 mode="markers+text" if words else "markers", text=words,
                                 textposition=places or "top center", textfont={"size": 10},
                                 marker={"size": sizes, "color": COLORS[kind], "symbol": SYMBOLS[kind],
                                         "line": {"width": 0.5, "color": "#333"}},
                                 hovertext=hover, hoverinfo="text"))
    seq = len(g.tokens)
    default_title = f"Attribution graph: {int(g.mask('feature').sum())} features, {int(g.mask('error').sum())} errors"
    if g.pruned is not None:
        default_title += f" (pruned: {g.pruned.node_influence_kept:.0%} of the influence)"
    rows = ["Emb"] + [f"L{i}" for i in range(g.n_layers)] + ["Logits"]
    fig.update_layout(
        title=title or default_title, height=160 + 32 * (g.n_layers + 2),
        xaxis={"tickmode": "array", "tickvals": list(range(seq)), "tickangle": -45,
               "ticktext": [escape_token(t) for t in g.tokens], "range": [-0.7, seq - 0.3]},
        yaxis={"tickmode": "array", "tickvals": list(range(-1, g.n_layers + 1)), "ticktext": rows},
        plot_bgcolor="white", legend={"orientation": "h", "y": -0.25}, hoverlabel={"align": "left"})
    return fig


__all__ = ["plot_graph"]

"""Check a graph by intervening on its features: set some features' activations (0 ablates) and
compare how the logits move with what the graph predicts.

The graph's prediction is its direct edges: a feature set from ``act`` to ``new`` moves logit
``t`` by ``adjacency[t, s] * (new / act - 1)`` through paths that do not pass through another
feature. Two ways to measure:

- ``"direct"``: in the local replacement model (attention patterns, norm scales *and every other
  feature* frozen). There the prediction is exact, to fp32 rounding: a check of the graph's
  arithmetic and of every edge into the logits.
- ``"model"``: in the real model, through :func:`interp.features.dictionary_hooks` (the change of
  each feature's decoder output is added at its position; attention, norms and downstream
  features respond). The difference from the prediction is what the graph leaves to other
  features and to what it freezes; features of late layers, with little downstream, should
  match closely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch

from ..display import figure
from ..features.interventions import dictionary_hooks
from ..model import Gemma3
from ..plots import escape_token
from .dictionaries import GraphDictionaries, Transcoders
from .graph import Graph, Node
from .replacement import final_logits, replacement_forward, run_prompt

FeatureKey = str | Node | tuple[int, int, int]


@dataclass
class InterventionResult:
    """Logits of the graph's logit tokens before and after an intervention, and the graph's
    prediction of the change. ``labels``: the tokens; ``mode``: ``"direct"`` or ``"model"``."""

    labels: list[str]
    before: torch.Tensor
    after: torch.Tensor
    predicted: torch.Tensor
    mode: str

    @property
    def change(self) -> torch.Tensor:
        """``after - before``."""
        return self.after - self.before

    @property
    def max_error(self) -> float:
        """Largest ``|change - predicted|``."""
        return float((self.change - self.predicted).abs().max())

    def plot(self, title: str | None = None) -> go.Figure:
        """Grouped bars: the change of each logit, measured and predicted."""
        x = [escape_token(t) for t in self.labels]
        fig = figure([go.Bar(name="measured", x=x, y=self.change.tolist()),
                         go.Bar(name="graph predicts", x=x, y=self.predicted.tolist())])
        fig.update_layout(barmode="group", title=title or f"Logit changes ({self.mode} intervention)",
                          yaxis_title="change of logit")
        return fig

    def __repr__(self) -> str:
        rows = ", ".join(f"{t!r}: {float(c):+.3f} (graph {float(p):+.3f})"
                         for t, c, p in zip(self.labels, self.change, self.predicted))
        return f"InterventionResult({self.mode}; {rows})"


def _feature_nodes(graph: Graph, features: Mapping[FeatureKey, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in features.items():
        if isinstance(key, Node):
            key = key.key
        if isinstance(key, tuple):
            layer, pos, f = key
            key = Node("feature", layer, pos, f).key
        i = graph.index(key)
        if graph.nodes[i].kind != "feature":
            raise ValueError(f"{key!r} is a {graph.nodes[i].kind} node; only features can be set")
        out[i] = float(value)
    if not out:
        raise ValueError("features= is empty: give {node key or (layer, pos, feature): new activation}")
    return out


def _predict(graph: Graph, changes: dict[int, float]) -> torch.Tensor:
    """Direct effect on each logit of setting features ``{node: new activation}``."""
    scale = torch.zeros(len(graph), dtype=torch.float64)
    for i, value in changes.items():
        act = graph.nodes[i].activation
        scale[i] = value / act - 1.0 if act != 0 else 0.0
    return (graph.adjacency.double() @ scale)[graph.mask("logit")].float()


def intervene(model: Gemma3, graph: Graph, transcoders: Transcoders,
              features: Mapping[FeatureKey, float], *, mode: str = "direct") -> InterventionResult:
    """Set ``features`` (``{node key | Node | (layer, pos, feature): new activation}``) on the
    graph's prompt and measure the graph's logits (see the module docstring for ``mode``).

    >>> r = intervene(model, graph, transcoders, {"L3.F12@5": 0.0})  # doctest: +SKIP
    >>> r.max_error < 1e-4  # direct mode: exact  # doctest: +SKIP
    True
    """
    if mode not in ("direct", "model"):
        raise ValueError(f"mode must be 'direct' or 'model', got {mode!r}")
    if graph.pruned is not None:
        raise ValueError("intervene on the full graph (its edges are complete); a pruned graph's predictions would "
                         "miss the pruned paths")
    dicts = GraphDictionaries(model, transcoders)
    changes = _feature_nodes(graph, features)
    ids = graph.ids.to(model.device)
    logit_nodes = [n for n in graph.nodes if n.kind == "logit"]
    tokens = torch.tensor([n.index for n in logit_nodes], device=model.device)
    position = logit_nodes[0].pos
    with torch.no_grad():
        before = model(ids[None])[0, position, tokens].float()
    if mode == "direct":
        run = run_prompt(model, ids, dicts, position, graph.bos_features)
        acts = {layer: a.clone() for layer, a in run.acts.items()}
        for i, value in changes.items():
            n = graph.nodes[i]
            acts[n.layer][n.pos, n.index] = value
        with torch.no_grad():
            base_trace = replacement_forward(model, run, dicts)
            base = final_logits(model, base_trace, position, tokens).detach()
            trace = replacement_forward(model, run, dicts, acts=acts, frozen=base_trace.frozen)
            after = final_logits(model, trace, position, tokens).detach()
        after = before + (after - base)  # the replacement's change, on the model's logits
    else:
        hooks: list[tuple[str, Any]] = []
        for i, value in changes.items():
            n = graph.nodes[i]
            if dicts.clt is not None:
                hooks += dictionary_hooks(dicts.clt, clamp={(n.layer, n.index): value}, positions=[n.pos])
            else:
                hooks += dictionary_hooks(dicts.per_layer[n.layer], clamp={n.index: value}, positions=[n.pos])
        with torch.no_grad():
            after = model.run_with_hooks(ids[None], hooks)[0, position, tokens].float()
    labels = [n.label.removeprefix("logit ").strip("'\"") for n in logit_nodes]
    return InterventionResult(labels, before.cpu(), after.cpu(), _predict(graph, changes), mode)


__all__ = ["intervene", "InterventionResult"]

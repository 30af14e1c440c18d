"""The attribution graph: nodes, their direct effects on each other, and what explains each node.

Nodes come in four kinds, in this order: the prompt's token ``embedding`` at each position, the
active transcoder ``feature`` s (sorted by layer, position, feature), one ``error`` per layer
and position (what the transcoder misses of the MLP's output; the whole output of a layer
without a transcoder), and the output ``logit`` s. Embeddings and errors are *sources*: nothing
in the graph explains them. Features and logits are *targets*:

``adjacency[t].sum() + constants[t] == values[t]``

to fp32 rounding, where ``adjacency[t, s]`` is the direct effect of ``s`` on ``t`` (through the
frozen attention and norms and the transcoders' skip terms, no other node in between),
``values[t]`` the target's value on the prompt (a feature's pre-activation, a logit) and
``constants[t]`` what biases contribute (encoder and decoder biases). A source's ``values`` entry
is the norm of the vector it writes; its constant is 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import atomic_write
from .graph_files import to_neuronpedia
from .prune import PruneInfo, graph_scores, influence, prune
from .view import plot_graph

if TYPE_CHECKING:
    import plotly.graph_objects as go

NODE_KINDS = ("embedding", "feature", "error", "logit")


@dataclass(frozen=True)
class Node:
    """One node: ``kind`` (see :data:`NODE_KINDS`), ``layer`` (-1 for embeddings, ``n_layers`` for
    logits), ``pos``, ``index`` (the feature index, the token id of an embedding or a logit, -1 for
    an error), ``label`` (a readable name), ``activation`` (a feature's activation; a logit's
    probability)."""

    kind: str
    layer: int
    pos: int
    index: int
    label: str = ""
    activation: float = 0.0

    @property
    def key(self) -> str:
        """A short unique name: ``E3`` (embedding at position 3), ``L2.F17@5`` (feature 17 of layer 2
        at position 5), ``err L2@5``, ``logit 1234``."""
        if self.kind == "embedding":
            return f"E{self.pos}"
        if self.kind == "feature":
            return f"L{self.layer}.F{self.index}@{self.pos}"
        if self.kind == "error":
            return f"err L{self.layer}@{self.pos}"
        return f"logit {self.index}"


@dataclass
class Graph:
    """An attribution graph (see the module docstring). ``adjacency [nodes, nodes]``: row = target,
    column = source. ``tokens``: the prompt's token strings; ``logit_probabilities``: the
    probability of each logit node's token; ``logit_error``: the largest difference between the
    replacement model's logits and the model's (fp32 rounding when the graph is exact).
    ``transcoders``: a name per transcoder (for exports); ``pruned``: set on a pruned graph;
    ``bos_features``: whether features at a leading BOS token are nodes; ``model_id``: the
    Neuronpedia id of the model it was made on (``gemma-3-270m``; ``""`` for other models);
    ``cumulative_influence``: on a pruned graph, each node's cumulative influence in the unpruned
    graph (:func:`~interp.circuits.prune.cumulative`; what graph files report); ``active_features``:
    how many features were active on the prompt (the graph's feature nodes are the most influential
    of them when a node budget left some out; see :func:`~interp.circuits.build.attribution_graph`)."""

    adjacency: torch.Tensor
    values: torch.Tensor
    constants: torch.Tensor
    nodes: list[Node]
    ids: torch.Tensor
    tokens: list[str]
    n_layers: int
    prompt: str = ""
    logit_error: float = 0.0
    transcoders: list[str] = field(default_factory=list)
    pruned: PruneInfo | None = None
    bos_features: bool = False
    model_id: str = ""
    cumulative_influence: torch.Tensor | None = None
    active_features: int = 0

    # ------------------------------------------------------------------ structure
    def __len__(self) -> int:
        return len(self.nodes)

    def mask(self, *kinds: str) -> torch.Tensor:
        """Bool ``[nodes]``: the nodes of these kinds."""
        bad = set(kinds) - set(NODE_KINDS)
        if bad:
            raise ValueError(f"unknown node kind(s) {sorted(bad)}; kinds are {NODE_KINDS}")
        return torch.tensor([n.kind in kinds for n in self.nodes], dtype=torch.bool)

    @property
    def targets(self) -> torch.Tensor:
        """Bool ``[nodes]``: features and logits (the nodes whose inputs the graph explains)."""
        return self.mask("feature", "logit")

    @property
    def logit_probabilities(self) -> torch.Tensor:
        """Probability of each logit node's token, in node order."""
        return torch.tensor([n.activation for n in self.nodes if n.kind == "logit"])

    def index(self, key: str) -> int:
        """The node number of ``Node.key`` ``key`` (e.g. ``"L2.F17@5"``)."""
        for i, n in enumerate(self.nodes):
            if n.key == key:
                return i
        raise KeyError(f"no node {key!r} in this graph (keys look like 'E0', 'L2.F17@5', 'err L2@5', 'logit 123')")

    def residual(self) -> torch.Tensor:
        """``adjacency.sum(1) + constants - values`` for targets (0 for sources): zero to fp32
        rounding on a full graph; on a pruned graph, what pruning dropped."""
        out = self.adjacency.sum(1) + self.constants - self.values
        return torch.where(self.targets, out, torch.zeros_like(out))

    def scale(self) -> torch.Tensor:
        """``[nodes]``: the size of the sum each target is made of, ``|value| + |constant| + sum |edges|``
        (fp32 rounding of that sum is about ``1e-7 * scale``; edges often cancel)."""
        return self.values.abs() + self.constants.abs() + self.adjacency.abs().sum(1)

    def check(self, rtol: float = 1e-5) -> float:
        """Raise AssertionError unless every target's edges and constant add up to its value within
        ``rtol * scale()`` (fp32 rounding); returns the largest residual relative to its scale."""
        rel = self.residual().abs() / self.scale().clamp_min(1e-30)
        worst = int(rel.argmax()) if len(rel) else 0
        if len(rel) and float(rel[worst]) > rtol:
            res = self.residual()
            raise AssertionError(f"node {self.nodes[worst].key}: edges + constant = "
                                 f"{float(self.values[worst] + res[worst]):.6g} but its value is "
                                 f"{float(self.values[worst]):.6g} (relative error {float(rel[worst]):.2g})")
        return float(rel.max()) if len(rel) else 0.0

    def top_features(self, k: int = 10) -> list[tuple[Node, float]]:
        """The ``k`` features with the most influence on the logits, ``(node, influence)``."""
        inf = influence(self)
        feats = [i for i, n in enumerate(self.nodes) if n.kind == "feature"]
        feats.sort(key=lambda i: -float(inf[i]))
        return [(self.nodes[i], float(inf[i])) for i in feats[:k]]

    def subgraph(self, keep: torch.Tensor) -> Graph:
        """The graph restricted to the nodes in bool mask ``keep`` (edges among them kept)."""
        idx = keep.nonzero()[:, 0]
        ranks = None if self.cumulative_influence is None else self.cumulative_influence[idx].clone()
        return replace(self, adjacency=self.adjacency[idx][:, idx].clone(), values=self.values[idx].clone(),
                       constants=self.constants[idx].clone(), nodes=[self.nodes[int(i)] for i in idx],
                       cumulative_influence=ranks)

    # ------------------------------------------------------------------ analysis (see prune.py, view.py)
    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
        """See :func:`interp.circuits.prune.prune`."""
        return prune(self, node_threshold, edge_threshold)

    def scores(self) -> tuple[float, float]:
        """``(replacement, completeness)``; see :func:`interp.circuits.prune.graph_scores`."""
        return graph_scores(self)

    def plot(self, store: Any = None, transcoders: Any = None, title: str | None = None, **kwargs: Any) -> go.Figure:
        """See :func:`interp.circuits.view.plot_graph`."""
        return plot_graph(self, store=store, transcoders=transcoders, title=title, **kwargs)

    def to_neuronpedia(self, path: str | os.PathLike, slug: str, scan: str | None = None, **kwargs: Any) -> Path:
        """See :func:`interp.circuits.graph_files.to_neuronpedia`."""
        return to_neuronpedia(self, path, slug, scan=scan, **kwargs)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the graph to one ``.safetensors`` file (tensors, nodes and facts as metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        nodes = [[n.kind, n.layer, n.pos, n.index, n.label, n.activation] for n in self.nodes]
        meta = {"kind": "interp.AttributionGraph", "nodes": nodes, "tokens": self.tokens, "n_layers": self.n_layers,
                "prompt": self.prompt, "logit_error": self.logit_error, "transcoders": self.transcoders,
                "pruned": None if self.pruned is None else vars(self.pruned), "bos_features": self.bos_features,
                "model_id": self.model_id, "active_features": self.active_features}
        tensors = {"adjacency": self.adjacency.contiguous(), "values": self.values.contiguous(),
                   "constants": self.constants.contiguous(), "ids": self.ids.contiguous()}
        if self.cumulative_influence is not None:
            tensors["cumulative_influence"] = self.cumulative_influence.contiguous()
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"graph": json.dumps(meta)}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Graph:
        """Read a graph written by :meth:`save` (no pickle)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta_text = (f.metadata() or {}).get("graph")
            if meta_text is None:
                raise ValueError(f"{path} is not an attribution graph written by Graph.save")
            meta = json.loads(meta_text)
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        nodes = [Node(kind, int(layer), int(pos), int(index), str(label), float(act))
                 for kind, layer, pos, index, label, act in meta["nodes"]]
        n = len(nodes)
        ranks = t.get("cumulative_influence")
        if tuple(t["adjacency"].shape) != (n, n) or t["values"].shape[0] != n or t["constants"].shape[0] != n or (
                ranks is not None and tuple(ranks.shape) != (n,)):
            raise ValueError(f"{path}: the tensors do not match its {n} nodes")
        pruned = None if meta.get("pruned") is None else PruneInfo(**meta["pruned"])
        return cls(t["adjacency"], t["values"], t["constants"], nodes, t["ids"], list(meta["tokens"]),
                   int(meta["n_layers"]), meta.get("prompt", ""), float(meta.get("logit_error", 0.0)),
                   list(meta.get("transcoders", [])), pruned, bool(meta.get("bos_features", False)),
                   str(meta.get("model_id", "")), ranks, int(meta.get("active_features", 0)))

    def __repr__(self) -> str:
        counts = {k: int(self.mask(k).sum()) for k in NODE_KINDS}
        edges = int((self.adjacency != 0).sum())
        state = "" if self.pruned is None else f", pruned at {self.pruned.node_threshold}/{self.pruned.edge_threshold}"
        left = self.active_features - counts["feature"] if self.pruned is None else 0
        budget = f" of {self.active_features} active" if left > 0 else ""
        return (f"Graph({counts['feature']} features{budget}, {counts['error']} errors, {counts['embedding']} tokens, "
                f"{counts['logit']} logits; {edges} edges{state})")


__all__ = ["Graph", "Node", "PruneInfo", "NODE_KINDS"]

"""Influence, pruning and the two scores of an attribution graph (Ameisen et al. 2025, "Circuit
Tracing", the methods paper's definitions).

*Influence*: normalise each target's incoming edges by their absolute sum (``W = |A| / row
sums``: how much of a node's input each source supplies) and weight the logits by their
probabilities ``w``; a node's influence is what it supplies to the logits along every path,
``w W + w W^2 + ...`` (finite: the graph is acyclic).

*Pruning* keeps the most influential nodes until they hold ``node_threshold`` of the total
influence (token embeddings and logits are always kept), then the edges carrying
``edge_threshold`` of the pruned graph's edge influence (an edge's score: its share of the
target's input times the target's influence), then drops features and errors left without
outgoing edges and features left without incoming ones.

*Scores*: the **replacement score** is the share of the tokens' and errors' influence that the
tokens have (1: the logits are explained from the tokens through features alone); the
**completeness score** the share of each node's input that does not come from error nodes,
averaged over nodes weighted by their influence (logits included).

>>> import torch
>>> from interp.circuits.graph import Graph, Node
>>> nodes = [Node("embedding", -1, 0, 5), Node("feature", 0, 0, 1), Node("error", 0, 0, -1),
...          Node("logit", 1, 0, 7, activation=1.0)]
>>> A = torch.zeros(4, 4); A[1, 0] = 2.0; A[3, 1] = 3.0; A[3, 2] = 1.0
>>> g = Graph(A, torch.tensor([1.0, 2.0, 1.0, 4.0]), torch.zeros(4), nodes, torch.tensor([5]), ["x"], 1)
>>> [round(float(v), 2) for v in influence(g)]
[0.75, 0.75, 0.25, 0.0]
>>> tuple(round(s, 3) for s in graph_scores(g))
(0.75, 0.857)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .graph import Graph


@dataclass
class PruneInfo:
    """How a pruned graph was made: the thresholds, and the fraction of the full graph's influence
    on the logits that the kept nodes and edges carry."""

    node_threshold: float
    edge_threshold: float
    node_influence_kept: float
    edge_influence_kept: float
    nodes_before: int
    edges_before: int


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """``|A|`` with each row divided by its sum (rows without inputs stay 0)."""
    a = adjacency.abs()
    sums = a.sum(1, keepdim=True)
    return torch.where(sums > 0, a / sums.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))


def logit_weights(graph: Graph) -> torch.Tensor:
    """``[nodes]``: each logit node's probability, 0 elsewhere."""
    w = torch.zeros(len(graph))
    is_logit = graph.mask("logit")
    w[is_logit] = graph.logit_probabilities
    return w


def _propagate(w_norm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(weights)
    step = weights @ w_norm
    for _ in range(len(weights) + 1):
        if not bool(step.any()):
            return total
        total += step
        step = step @ w_norm
    raise ValueError("influence did not vanish: the graph has a cycle (its adjacency is not a DAG)")


def influence(graph: Graph) -> torch.Tensor:
    """Each node's influence on the logits (``[nodes]``; logits themselves 0)."""
    return _propagate(normalized(graph.adjacency), logit_weights(graph))


def cumulative(scores: torch.Tensor) -> torch.Tensor:
    """Each node's cumulative influence: nodes sorted from the most influential, the running sum
    over the total (circuit-tracer's ``influence`` field in graph files; 1.0 for nodes without
    influence, 0 everywhere when nothing has any).

    >>> cumulative(torch.tensor([1.0, 3.0, 0.0])).tolist()
    [1.0, 0.75, 1.0]
    """
    order = scores.argsort(descending=True)
    ranked = scores[order]
    total = ranked.sum()
    out = torch.zeros_like(scores)
    out[order] = ranked.cumsum(0) / total if float(total) > 0 else torch.zeros_like(ranked)
    return out


def _keep_top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the highest scores whose sum first reaches ``fraction`` of the total."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    total = float(scores.sum())
    if total <= 0:
        return keep
    order = scores.argsort(descending=True)
    cum = scores[order].cumsum(0) / total
    n = min(int((cum < fraction - 1e-12).sum()) + 1, len(scores))
    keep[order[:n]] = True
    return keep


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
    """The graph with its most influential nodes and edges (see the module docstring); its
    ``pruned`` field records the thresholds and the fractions of influence kept, its
    ``cumulative_influence`` each kept node's :func:`cumulative` influence in the unpruned graph
    (what graph files report; a pruned graph pruned again keeps the first graph's).

    >>> g.prune(0.5, 0.9).pruned.node_influence_kept >= 0.5  # doctest: +SKIP
    True
    """
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 < t <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {t}")
    weights = logit_weights(graph)
    node_inf = influence(graph)
    always = graph.mask("embedding", "logit")
    candidates = ~graph.mask("logit")
    keep = torch.zeros(len(graph), dtype=torch.bool)
    keep[candidates] = _keep_top(node_inf[candidates], node_threshold)
    total = float(node_inf[candidates].sum())
    node_kept = float(node_inf[keep].sum()) / total if total > 0 else 1.0
    keep |= always

    a = graph.adjacency * (keep[:, None] & keep[None, :])
    w_norm = normalized(a)
    edge_scores = w_norm * (_propagate(w_norm, weights) + weights)[:, None]
    edges = _keep_top(edge_scores.flatten(), edge_threshold).view_as(a) & (a != 0)
    total_edges = float(edge_scores.sum())
    edge_kept = float(edge_scores[edges].sum()) / total_edges if total_edges > 0 else 1.0
    needs_out, needs_in = graph.mask("feature", "error"), graph.mask("feature")
    while True:  # drop nodes left dangling, until nothing changes
        before = keep.clone()
        keep &= ~needs_out | edges.any(0)
        keep &= ~needs_in | edges.any(1)
        edges &= keep[:, None] & keep[None, :]
        if torch.equal(before, keep):
            break
    info = PruneInfo(node_threshold, edge_threshold, node_kept, edge_kept, len(graph),
                     int((graph.adjacency != 0).sum()))
    full_rank = graph.cumulative_influence if graph.cumulative_influence is not None else cumulative(node_inf)
    out = graph.subgraph(keep)
    idx = keep.nonzero()[:, 0]
    out.cumulative_influence = full_rank[idx].clone()  # the first unpruned graph's, for graph files
    out.adjacency = torch.where(edges[idx][:, idx], out.adjacency, torch.zeros_like(out.adjacency))
    out.pruned = info
    return out


def graph_scores(graph: Graph) -> tuple[float, float]:
    """``(replacement score, completeness score)``, each in [0, 1] (see the module docstring)."""
    weights = logit_weights(graph)
    w_norm = normalized(graph.adjacency)
    inf = _propagate(w_norm, weights)
    tokens = float(inf[graph.mask("embedding")].sum())
    errors = float(inf[graph.mask("error")].sum())
    replacement = tokens / (tokens + errors) if tokens + errors > 0 else 0.0
    is_error = graph.mask("error")
    has_input = w_norm.sum(1) > 0
    non_error = torch.where(has_input, 1.0 - w_norm[:, is_error].sum(1), torch.zeros(len(graph)))
    weight = (inf + weights) * has_input
    completeness = float((non_error * weight).sum() / weight.sum()) if float(weight.sum()) > 0 else 0.0
    return replacement, completeness


__all__ = ["influence", "prune", "graph_scores", "normalized", "logit_weights", "cumulative"]

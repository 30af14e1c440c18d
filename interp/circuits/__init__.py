"""Circuits: attribution graphs through transcoders (:func:`attribution_graph`, :class:`Graph`),
their pruning, scores, plots and Neuronpedia export, and interventions that check them."""

from .build import GraphTooLargeError, attribution_graph, estimate_bytes
from .graph import KINDS, Graph, Node, PruneInfo
from .intervene import Intervention, intervene
from .prune import graph_scores, influence, prune

__all__ = ["attribution_graph", "Graph", "Node", "PruneInfo", "KINDS", "GraphTooLargeError", "estimate_bytes",
           "influence", "prune", "graph_scores", "intervene", "Intervention"]

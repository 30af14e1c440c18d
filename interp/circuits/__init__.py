"""Circuits: attribution graphs through transcoders (:func:`attribution_graph`, :class:`Graph`),
their pruning, scores, plots and Neuronpedia export, and interventions that check them; path
patching (:func:`path_patch`) and edge attribution patching (:func:`edge_attribution_patch`)."""

from .build import GraphTooLargeError, attribution_graph, estimate_bytes
from .edge_attribution import EdgeScores, edge_attribution_patch
from .graph import NODE_KINDS, Graph, Node, PruneInfo
from .intervene import InterventionResult, intervene
from .path_patching import path_patch
from .path_result import PathPatchingResult
from .prune import graph_scores, influence, prune

__all__ = ["attribution_graph", "Graph", "Node", "PruneInfo", "NODE_KINDS", "GraphTooLargeError", "estimate_bytes",
           "influence", "prune", "graph_scores", "intervene", "InterventionResult",
           "path_patch", "PathPatchingResult", "edge_attribution_patch", "EdgeScores"]

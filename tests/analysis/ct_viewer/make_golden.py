"""Writes ``golden.json``: what circuit-tracer 0.5.0 itself computes, for the fast tests of our
graph files (``tests/analysis/test_graph_files.py``) to compare with, without circuit-tracer.

- ``nodes``: circuit-tracer's node records (``Node.feature_node`` / ``error_node`` /
  ``token_node`` / ``logit_node``) for a few nodes;
- ``prune``: a small random attribution graph in circuit-tracer's node order (features, errors
  layer-major, tokens, logits), and what its ``prune_graph`` returns for it: the node mask and
  each node's cumulative influence (the ``influence`` its graph files write).

Run in the circuit-tracer virtual environment (``.ci/circuit-tracer-venv``), from the repository root:

    $INTERP_CIRCUIT_TRACER_PYTHON tests/analysis/ct_viewer/make_golden.py
"""

import json
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch
from circuit_tracer.frontend.graph_models import Node
from circuit_tracer.graph import prune_graph

nodes = {
    "feature": Node.feature_node(3, 5, 1234, influence=0.25, activation=1.5).model_dump(),
    "error": Node.error_node(2, 4, influence=0.5).model_dump(),
    "embedding": Node.token_node(1, 817, influence=0.75).model_dump(),
    "logit": Node.logit_node(pos=6, vocab_idx=2201, token=" Paris", num_layers=18, target_logit=True,
                             token_prob=0.4567).model_dump(),
}

gen = torch.Generator().manual_seed(0)
n_layers, n_pos, n_logits = 3, 4, 3
feats = [(layer, pos, f) for layer in range(n_layers) for pos in range(n_pos) for f in range(2)
         if torch.rand(1, generator=gen).item() < 0.7]
n_f = len(feats)
n = n_f + n_layers * n_pos + n_pos + n_logits
err0, tok0, log0 = n_f, n_f + n_layers * n_pos, n_f + n_layers * n_pos + n_pos
A = torch.zeros(n, n)
for i, (layer, pos, _) in enumerate(feats):  # a feature reads tokens, earlier layers' features and errors
    for j, (l2, p2, _) in enumerate(feats):
        if l2 < layer and p2 <= pos:
            A[i, j] = torch.randn(1, generator=gen).item()
    for l2 in range(layer):
        for p2 in range(pos + 1):
            A[i, err0 + l2 * n_pos + p2] = torch.randn(1, generator=gen).item()
    for p2 in range(pos + 1):
        A[i, tok0 + p2] = torch.randn(1, generator=gen).item()
A[log0:, :log0] = torch.randn(n_logits, log0, generator=gen) * (torch.rand(n_logits, log0, generator=gen) < 0.6)
probs = torch.tensor([0.5, 0.3, 0.2])
fake = SimpleNamespace(input_tokens=list(range(n_pos)), logit_targets=[None] * n_logits, selected_features=feats,
                       adjacency_matrix=A, logit_probabilities=probs)
node_mask, edge_mask, scores = prune_graph(fake, 0.8, 0.98)
golden = {"circuit_tracer": version("circuit-tracer"), "nodes": nodes,
          "prune": {"n_layers": n_layers, "n_pos": n_pos, "features": feats, "adjacency": A.tolist(),
                    "logit_probabilities": probs.tolist(), "node_threshold": 0.8, "edge_threshold": 0.98,
                    "node_mask": node_mask.tolist(), "cumulative_influence": scores.tolist()}}
out = Path(__file__).with_name("golden.json")
out.write_text(json.dumps(golden) + "\n")
print(out, n, "nodes", int(node_mask.sum()), "kept")

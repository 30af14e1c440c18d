"""Notebooks usually run under ``torch.set_grad_enabled(False)``: every analysis that needs
gradients switches them on itself, gives the same result as with gradients on, and leaves the
caller's mode as it was."""

from __future__ import annotations

import pytest
import torch
from support import TINY, make_model

import interp
from interp.features import Transcoder, train

CLEAN, CORRUPT = [2, 5, 7, 9, 11], [2, 6, 7, 9, 11]


@pytest.fixture(scope="module")
def model():
    return make_model(TINY, seed=2)


def analyses(m):
    metric = interp.logit_diff(3, 4)
    tcs = [Transcoder.random(m, layer=i, d_sae=16, seed=i) for i in range(2)]
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    return {
        "atp": lambda: interp.attribution_patch(m, CLEAN, CORRUPT, metric).values,
        "ig": lambda: interp.attribution_patch(m, CLEAN, CORRUPT, metric, method="ig", steps=2).values,
        "atp*": lambda: interp.attribution_patch(m, CLEAN, CORRUPT, metric, kind="attn.z", method="atp*").values,
        "edges": lambda: interp.edge_attribution_patch(m, CLEAN, CORRUPT, metric).values,
        "graph": lambda: interp.attribution_graph(m, CLEAN, tcs, progress=False).adjacency,
        "grads": lambda: m.run_with_grads(torch.tensor([CLEAN]), lambda lg: lg[0, -1, 3], "blocks.1.resid_pre")[2][
            "blocks.1.resid_pre"],
        "train": lambda: train(x, "topk", d_sae=16, steps=3, k=2, batch_size=64, progress=False).W_dec,
        "probe": lambda: interp.probe({"a": x}, (x[:, 0] > 0).long(), steps=20).weights,
    }


@pytest.mark.parametrize("name", ["atp", "ig", "atp*", "edges", "graph", "grads", "train", "probe"])
def test_works_with_gradients_off_and_keeps_the_mode(model, name):
    run = analyses(model)[name]
    with_grad = run()
    with torch.no_grad():
        without = run()
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(without, with_grad, atol=1e-6, rtol=1e-5)

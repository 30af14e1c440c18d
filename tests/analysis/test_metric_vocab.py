"""A target id outside the vocabulary is refused by the metric, naming the metric and the range,
wherever the metric is used (called directly, or bound by an analysis)."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.metrics import logit_diff, prob


@pytest.mark.parametrize("metric", [logit_diff(50, 3), prob(99), logit_diff(3, -1)])
def test_called_on_logits(metric):
    with pytest.raises(IndexError, match=r"metric .*outside the vocabulary of 40 tokens \(ids 0\.\.39\)"):
        metric(torch.zeros(1, 3, 40))


def test_bound_by_an_analysis(tiny_model):
    vocab = tiny_model.cfg.vocab_size
    clean, corrupt = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 4, 3]])
    with pytest.raises(IndexError, match=f"logit_diff.*\\[{vocab}\\] are outside the vocabulary of {vocab}"):
        interp.patch_sweep(tiny_model, clean, corrupt, logit_diff(vocab, 3))
    assert not tiny_model.registry.active


def test_positions_take_the_one_positions_type():
    """Metrics take ``positions=`` like every other function: an int, a list or a tensor; a slice
    (whose positions depend on the length) is refused with the fix."""
    logits = torch.arange(24.0).view(1, 4, 6)
    assert torch.equal(prob(2, positions=[1, 3])(logits), prob(2, positions=torch.tensor([1, 3]))(logits))
    assert logit_diff(1, 0, positions=-1).resolve(4) == [3]
    with pytest.raises(TypeError, match=r"not a slice.*list them"):
        prob(2, positions=slice(1, None))
    with pytest.raises(TypeError, match="position"):
        prob(2, position=1)  # the old spelling: one word per concept

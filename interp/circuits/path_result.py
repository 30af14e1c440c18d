"""What :func:`~interp.circuits.path_patching.path_patch` returns: a :class:`~interp.patching.PatchingResult`
that also names its senders and receivers.

>>> import torch
>>> r = PathPatchingResult(torch.tensor([0.2, -0.5]), torch.zeros(2), "senders", ("sender",), ["a"], ["a"],
...                        1.0, 0.0, labels=["blocks.0.attn.z head 1", "blocks.1.mlp.out"])
>>> r.top(1)[0].label, r.grid()[1]
('blocks.1.mlp.out', ['blocks.0.attn.z head 1', 'blocks.1.mlp.out'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..patching import PatchingResult


@dataclass(repr=False)
class PathPatchingResult(PatchingResult):
    """Path patching values: ``[layers, heads]`` (axes ``('layer', 'head')``, for
    ``senders="heads"``) or ``[senders]`` (axes ``('sender',)``, in the order given, named by
    ``labels``); ``receivers`` names the receivers (also in ``method``)."""

    labels: list[str] = field(default_factory=list)
    receivers: list[str] = field(default_factory=list)

    def index_labels(self, index: Sequence[int]) -> str:
        """A readable name for one cell (the sender)."""
        if self.axes == ("sender",):
            return self.labels[index[0]]
        return super().index_labels(index)

    def grid(self) -> tuple[torch.Tensor, list[str], list[str], str, str]:
        """As :meth:`PatchingResult.grid`; one row of senders for the list form."""
        if self.axes == ("sender",):
            return self.values.detach().float().cpu()[None], list(self.labels), ["path"], "sender", ""
        return super().grid()

    def __repr__(self) -> str:
        return (f"PathPatchingResult({self.method}, shape={tuple(self.values.shape)}, "
                f"clean={self.clean_value:.4g}, corrupt={self.corrupt_value:.4g})")


__all__ = ["PathPatchingResult"]

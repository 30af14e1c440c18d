"""Patching metrics: functions of logits that give one value per batch row.

A :class:`Metric` knows which sequence positions it reads, so a sweep computes the final norm
and the unembedding only there (``model(..., logits_at=metric.positions)``), and, when it reads
only a few vocabulary entries (``token_ids``, e.g. the two of a logit difference), only those
columns of the unembedding. It evaluates a whole batch of patched runs at once. Call it on full
logits ``[batch, seq, vocab]``; sweeps call :meth:`Metric.from_selected` on logits of its
positions only ``[batch, k, vocab]`` (or ``[batch, k, len(token_ids)]``).

>>> import torch
>>> logits = torch.zeros(2, 3, 5); logits[:, -1, 4] = 2.0
>>> logit_diff(4, 1)(logits)
tensor([2., 2.])
>>> logit_diff(4, 1).positions
(-1,)
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

Positions = Union[int, Sequence[int]]


def _positions(position: Positions) -> tuple[int, ...]:
    out = (position,) if isinstance(position, int) else tuple(int(p) for p in position)
    if not out:
        raise ValueError("a metric needs at least one position")
    return out


class Metric:
    """``fn(logits [batch, k, vocab]) -> [batch]`` on the logits of ``positions`` (k of them).

    ``positions`` are sequence indices (negative counts from the end), or None for every
    position (then ``fn`` gets full logits). ``token_ids``, when given, are the only vocabulary
    entries ``fn`` reads: it then gets ``[batch, k, len(token_ids)]``, in that order (and a sweep
    computes only those logits). Values are computed in float32.

    >>> m = Metric(lambda l: l[:, 0, 1] - l[:, 1, 1], positions=[0, -1], name="drift")
    >>> m(torch.arange(6.0).view(1, 3, 2))
    tensor([-4.])
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], positions: Positions | None = (-1,),
                 name: str = "metric", token_ids: Sequence[int] | None = None):
        self.fn = fn
        self.positions = None if positions is None else _positions(positions)
        self.name = name
        self.token_ids = None if token_ids is None else tuple(int(t) for t in token_ids)

    def resolve(self, seq: int) -> list[int]:
        """The absolute sequence indices this metric reads in a sequence of ``seq`` tokens, sorted.

        >>> logit_diff(1, 2, position=[-1, 0]).resolve(4)
        [0, 3]
        """
        if self.positions is None:
            return list(range(seq))
        out = []
        for p in self.positions:
            q = p + seq if p < 0 else p
            if not 0 <= q < seq:
                raise ValueError(f"metric {self.name!r} reads position {p}, outside a sequence of {seq} tokens")
            out.append(q)
        return sorted(set(out))

    def from_selected(self, logits: torch.Tensor, seq: int, vocab_selected: bool = False) -> torch.Tensor:
        """Values ``[batch]`` from logits at ``self.resolve(seq)`` only (``[batch, k, vocab]``, that
        order; ``vocab_selected``: ``[batch, k, len(token_ids)]``, only the metric's vocabulary entries)."""
        if self.token_ids is not None and not vocab_selected:
            logits = logits[..., list(self.token_ids)]
        needed = self.resolve(seq)
        if self.positions is not None:
            where = {q: i for i, q in enumerate(needed)}
            order = [where[p + seq if p < 0 else p] for p in self.positions]
            if order != list(range(len(needed))):
                logits = logits[:, order]
        return _rows(self.fn(logits.float()), logits.shape[0], self.name)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Values ``[batch]`` from full logits ``[batch, seq, vocab]``."""
        if logits.dim() == 2:
            logits = logits[None]
        if self.token_ids is not None:
            logits = logits[..., list(self.token_ids)]
        if self.positions is None:
            return _rows(self.fn(logits.float()), logits.shape[0], self.name)
        return _rows(self.fn(logits[:, list(self.positions)].float()), logits.shape[0], self.name)

    def __repr__(self) -> str:
        return f"Metric({self.name}, positions={self.positions})"


def _rows(value: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    value = torch.as_tensor(value)
    if value.dim() == 0 and batch == 1:
        return value.reshape(1)
    if value.dim() > 1:
        value = value.reshape(value.shape[0], -1).mean(-1)
    if value.shape != (batch,):
        raise ValueError(f"metric {name!r} must return one value per batch row ({batch}), got shape "
                         f"{tuple(value.shape)}")
    return value


def as_metric(metric: Metric | Callable[[torch.Tensor], torch.Tensor]) -> Metric:
    """A :class:`Metric` as is; a plain ``fn(full logits [batch, seq, vocab]) -> [batch]`` wrapped
    to read every position (correct, but logits are then computed everywhere)."""
    if isinstance(metric, Metric):
        return metric
    if not callable(metric):
        raise TypeError(f"a metric is a Metric or a callable on logits, got {type(metric).__name__}")
    return Metric(metric, positions=None, name=getattr(metric, "__name__", "metric"))


def logit_diff(correct_id: int, wrong_id: int, position: Positions = -1) -> Metric:
    """``logit[correct] - logit[wrong]`` at ``position`` (averaged over positions if several).

    >>> l = torch.zeros(1, 2, 4); l[0, 1, 2] = 3.0
    >>> logit_diff(2, 0)(l)
    tensor([3.])
    """
    c, w = int(correct_id), int(wrong_id)
    return Metric(lambda l: (l[..., 0] - l[..., 1]).mean(-1), position, f"logit_diff({c}, {w})", token_ids=(c, w))


def prob(token_id: int, position: Positions = -1) -> Metric:
    """Probability of ``token_id`` at ``position`` (averaged over positions if several).

    >>> prob(0)(torch.zeros(1, 1, 4))
    tensor([0.2500])
    """
    t = int(token_id)
    return Metric(lambda l: l.softmax(-1)[..., t].mean(-1), position, f"prob({t})")


def kl(reference_logits: torch.Tensor, position: Positions = -1) -> Metric:
    """``KL(softmax(reference) || softmax(logits))`` at ``position`` (averaged if several).

    ``reference_logits`` are the logits of a reference run (usually the clean one): full
    ``[1, seq, vocab]`` or ``[seq, vocab]`` (``position`` picks from them), or ``[vocab]`` for
    one position. With the clean run as reference, normalised patching scores are
    ``1 - KL / KL(clean || corrupt)``: 0 for the corrupt run, 1 for the clean one.

    >>> kl(torch.zeros(4))(torch.zeros(1, 3, 4))
    tensor([0.])
    """
    positions = _positions(position)
    ref = reference_logits.detach().float()
    if ref.dim() == 3:
        ref = ref[0]
    if ref.dim() == 2:
        ref = ref[list(positions)]
    elif ref.dim() == 1:
        ref = ref.expand(len(positions), -1)
    else:
        raise ValueError(f"reference_logits must be [vocab], [seq, vocab] or [1, seq, vocab], got {tuple(ref.shape)}")
    ref_logp = ref.log_softmax(-1)

    def fn(l: torch.Tensor) -> torch.Tensor:
        r = ref_logp.to(l.device)
        return (r.exp() * (r - l.log_softmax(-1))).sum(-1).mean(-1)

    return Metric(fn, positions, "kl")


__all__ = ["Metric", "as_metric", "logit_diff", "prob", "kl"]

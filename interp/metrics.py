"""Patching metrics: functions of logits that give one value per batch row.

A :class:`Metric` knows which sequence positions it reads, so a sweep computes the final norm
and the unembedding only there (``model(..., logits_at=metric.positions)``), and, when it reads
only a few vocabulary entries (``token_ids``, e.g. the two of a logit difference), only those
columns of the unembedding. It evaluates a whole batch of patched runs at once. Call it on full
logits ``[batch, seq, vocab]``; sweeps call :meth:`Metric.from_selected` on logits of its
positions only ``[batch, k, vocab]`` (or ``[batch, k, len(token_ids)]``).

Targets may be given as text (``logit_diff(" Paris", " Rome")``): an analysis binds the metric
to its model (:meth:`Metric.bind`), which turns them into token ids and names the metric by its
tokens (``logit_diff(' Paris', ' Rome')``, as plot titles show it). Ids work without a model.

>>> import torch
>>> logits = torch.zeros(2, 3, 5); logits[:, -1, 4] = 2.0
>>> logit_diff(4, 1)(logits)
tensor([2., 2.])
>>> logit_diff(4, 1).positions
(-1,)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .hooks import resolve_positions
from .hooks.positions import Positions
from .model import Gemma3
from .tokens import Target, str_tokens, token_id

Factory = Callable[[tuple[int, ...]], Callable[[torch.Tensor], torch.Tensor]]


def _positions(positions: Positions) -> tuple[int, ...]:
    if isinstance(positions, bool):
        raise TypeError("a metric's positions are an int or a list of ints, not a bool")
    if isinstance(positions, slice):
        raise TypeError(f"a metric reads fixed positions, not a slice ({positions}): list them, e.g. [-2, -1]")
    if isinstance(positions, torch.Tensor):
        positions = positions.flatten().tolist()
    out = (positions,) if isinstance(positions, int) else tuple(int(p) for p in positions)
    if not out:
        raise ValueError("a metric needs at least one position")
    return out


class Metric:
    """``fn(logits [batch, k, vocab]) -> [batch]`` on the logits of ``positions`` (k of them).

    ``positions`` are sequence indices (negative counts from the end), or None for every
    position (then ``fn`` gets full logits). ``token_ids``, when given, are the only vocabulary
    entries ``fn`` reads: it then gets ``[batch, k, len(token_ids)]``, in that order (and a sweep
    computes only those logits). Values are computed in float32.

    A metric built from text targets (``targets`` plus a ``factory`` that makes ``fn`` from
    their ids) must be bound to a model before it is called: :meth:`bind`.

    >>> m = Metric(lambda l: l[:, 0, 1] - l[:, 1, 1], positions=[0, -1], name="drift")
    >>> m(torch.arange(6.0).view(1, 3, 2))
    tensor([-4.])
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] | None, positions: Positions | None = (-1,),
                 name: str = "metric", token_ids: Sequence[int] | None = None, *,
                 targets: Sequence[Target] = (), factory: Factory | None = None, reads_targets: bool = False):
        self.positions = None if positions is None else _positions(positions)
        self.name = name
        self.targets = tuple(targets)
        self.factory = factory
        self.reads_targets = reads_targets  # fn reads only the targets' logits (they become token_ids)
        self.fn = fn
        self.token_ids = None if token_ids is None else tuple(int(t) for t in token_ids)
        if fn is None:
            if factory is None:
                raise TypeError("a Metric needs fn, or targets and a factory")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in self.targets):
                self._set_ids(tuple(int(t) for t in self.targets))

    def _set_ids(self, ids: tuple[int, ...]) -> None:
        assert self.factory is not None
        self.fn = self.factory(ids)
        if self.reads_targets:
            self.token_ids = ids

    @property
    def bound(self) -> bool:
        """True when the metric can be called (its text targets, if any, are token ids)."""
        return self.fn is not None

    def bind(self, model: Gemma3) -> Metric:
        """This metric with text targets turned into ``model``'s token ids and its name written
        with the tokens (a metric of ids is renamed the same way).

        >>> logit_diff(3, 4).bind(None).name
        "logit_diff('3', '4')"
        """
        vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
        if isinstance(vocab, int):
            self._check_vocab(vocab)
        if self.factory is None or not self.targets:
            return self
        ids = tuple(token_id(model, t) if isinstance(t, str) else int(t) for t in self.targets)
        base = self.name.split("(", 1)[0]
        shown = ", ".join(repr(t) for t in str_tokens(model, ids))
        out = Metric(None, self.positions, f"{base}({shown})", targets=ids, factory=self.factory,
                     reads_targets=self.reads_targets)
        return out

    def _check_vocab(self, vocab: int) -> None:
        """Refuse target ids outside a vocabulary of ``vocab`` tokens, naming the metric."""
        ids = [t for t in (*self.targets, *(self.token_ids or ())) if isinstance(t, int) and not isinstance(t, bool)]
        bad = sorted({t for t in ids if not 0 <= t < vocab})
        if bad:
            raise IndexError(f"metric {self.name}: token id(s) {bad} are outside the vocabulary of {vocab:,} tokens "
                             f"(ids 0..{vocab - 1}); pass ids the model knows, or text targets")

    def _fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.fn is None:
            raise ValueError(f"metric {self.name} has text targets {self.targets}; bind it to a model first: "
                             "metric.bind(model) (analyses do this for you)")
        return self.fn

    def resolve(self, seq: int) -> list[int]:
        """The absolute sequence indices this metric reads in a sequence of ``seq`` tokens, sorted.

        >>> logit_diff(1, 2, positions=[-1, 0]).resolve(4)
        [0, 3]
        """
        if self.positions is None:
            return list(range(seq))
        try:
            return sorted(set(resolve_positions(list(self.positions), seq).tolist()))
        except IndexError as e:
            raise IndexError(f"metric {self.name}: {e}") from None

    def from_selected(self, logits: torch.Tensor, seq: int, vocab_selected: bool = False) -> torch.Tensor:
        """Values ``[batch]`` from logits at ``self.resolve(seq)`` only (``[batch, k, vocab]``, that
        order; ``vocab_selected``: ``[batch, k, len(token_ids)]``, only the metric's vocabulary entries)."""
        fn = self._fn()
        if not vocab_selected:
            self._check_vocab(logits.shape[-1])
        if self.token_ids is not None and not vocab_selected:
            logits = logits[..., list(self.token_ids)]
        needed = self.resolve(seq)
        if self.positions is not None:
            where = {q: i for i, q in enumerate(needed)}
            order = [where[p + seq if p < 0 else p] for p in self.positions]
            if order != list(range(len(needed))):
                logits = logits[:, order]
        return _rows(fn(logits.float()), logits.shape[0], self.name)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Values ``[batch]`` from full logits ``[batch, seq, vocab]``."""
        fn = self._fn()
        if logits.dim() == 2:
            logits = logits[None]
        self._check_vocab(logits.shape[-1])
        if self.token_ids is not None:
            logits = logits[..., list(self.token_ids)]
        if self.positions is None:
            return _rows(fn(logits.float()), logits.shape[0], self.name)
        return _rows(fn(logits[:, list(self.positions)].float()), logits.shape[0], self.name)

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


def as_metric(metric: Metric | Callable[[torch.Tensor], torch.Tensor], model: Gemma3 | None = None) -> Metric:
    """A :class:`Metric` (bound to ``model`` when given); a plain ``fn(full logits [batch, seq,
    vocab]) -> [batch]`` is wrapped to read every position (correct, but logits are then
    computed everywhere)."""
    if isinstance(metric, Metric):
        return metric.bind(model) if model is not None else metric
    if not callable(metric):
        raise TypeError(f"a metric is a Metric or a callable on logits, got {type(metric).__name__}")
    return Metric(metric, positions=None, name=getattr(metric, "__name__", "metric"))


def logit_diff(correct: Target, wrong: Target, positions: Positions = -1) -> Metric:
    """``logit[correct] - logit[wrong]`` at ``positions`` (averaged if several);
    targets are token ids or text (``" Paris"``).

    >>> l = torch.zeros(1, 2, 4); l[0, 1, 2] = 3.0
    >>> logit_diff(2, 0)(l)
    tensor([3.])
    """
    def factory(ids: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda logits: (logits[..., 0] - logits[..., 1]).mean(-1)

    return Metric(None, positions, f"logit_diff({correct!r}, {wrong!r})", targets=(correct, wrong), factory=factory,
                  reads_targets=True)


def prob(target: Target, positions: Positions = -1) -> Metric:
    """Probability of ``target`` (a token id or text) at ``positions`` (averaged if several).

    >>> prob(0)(torch.zeros(1, 1, 4))
    tensor([0.2500])
    """
    def factory(ids: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        t = ids[0]
        return lambda logits: logits.softmax(-1)[..., t].mean(-1)

    return Metric(None, positions, f"prob({target!r})", targets=(target,), factory=factory)


def kl(reference_logits: torch.Tensor, positions: Positions = -1) -> Metric:
    """``KL(softmax(reference) || softmax(logits))`` at ``positions`` (averaged if several).

    ``reference_logits`` are the logits of a reference run (usually the clean one): full
    ``[1, seq, vocab]`` or ``[seq, vocab]`` (``positions`` picks from them), or ``[vocab]`` for
    one position. With the clean run as reference, normalised patching scores are
    ``1 - KL / KL(clean || corrupt)``: 0 for the corrupt run, 1 for the clean one.

    >>> kl(torch.zeros(4))(torch.zeros(1, 3, 4))
    tensor([0.])
    """
    picked = _positions(positions)
    ref = reference_logits.detach().float()
    if ref.dim() == 3:
        ref = ref[0]
    if ref.dim() == 2:
        ref = ref[list(picked)]
    elif ref.dim() == 1:
        ref = ref.expand(len(picked), -1)
    else:
        raise ValueError(f"reference_logits must be [vocab], [seq, vocab] or [1, seq, vocab], got {tuple(ref.shape)}")
    ref_logp = ref.log_softmax(-1)

    def fn(logits: torch.Tensor) -> torch.Tensor:
        r = ref_logp.to(logits.device)
        return (r.exp() * (r - logits.log_softmax(-1))).sum(-1).mean(-1)

    return Metric(fn, picked, "kl")


__all__ = ["Metric", "as_metric", "logit_diff", "prob", "kl"]

"""Choosing the next token: greedy, temperature, top-k, top-p (nucleus), min-p and a repetition
penalty, with one seed for the batch or one per row. Everything stays on the model's device.

>>> import torch
>>> s = Sampler(temperature=0.0)
>>> s.next(torch.tensor([[0.1, 2.0, 0.3]])).tolist()
[1]
>>> Sampler(temperature=1.0, top_k=1, seed=0).next(torch.tensor([[0.1, 2.0, 0.3]])).tolist()
[1]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..hooks.checks import is_int, is_number
from .inputs import InputError


def _check(name: str, value: float | None, low: float, high: float | None = None, *, closed_low: bool = True) -> None:
    if value is None:
        return
    if not is_number(value) or value != value:
        raise InputError(f"{name} must be a number, got {value!r}")
    ok = (value >= low if closed_low else value > low) and (high is None or value <= high)
    if not ok:
        bounds = f"{'[' if closed_low else '('}{low}, {high if high is not None else 'inf'}]"
        raise InputError(f"{name} must be in {bounds}, got {value!r}")


class Sampler:
    """The next-token rule of one generation.

    ``temperature`` 0 is greedy (the filters then change nothing). ``top_k`` keeps the k most
    likely tokens, ``top_p`` the smallest set whose probability reaches p, ``min_p`` the tokens at
    least ``min_p`` times as likely as the most likely one. ``repetition_penalty`` (> 1
    discourages) divides positive logits and multiplies negative ones of every token already in
    the context (the prompt and what was generated). The order is transformers': penalty,
    temperature, top-k, top-p, min-p. ``seed`` is one int
    for the batch or a list with one per row (each row then draws from its own generator).
    """

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0, seed: int | Sequence[int] | None = None,
                 batch: int = 1, device: str | torch.device = "cpu"):
        if not is_number(temperature) or not temperature >= 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        _check("top_p", top_p, 0.0, 1.0, closed_low=False)
        _check("min_p", min_p, 0.0, 1.0)
        _check("repetition_penalty", repetition_penalty, 0.0, closed_low=False)
        if top_k is not None and (not is_int(top_k) or top_k < 1):
            raise InputError(f"top_k must be a positive int (or None for the whole vocabulary), got {top_k!r}")
        self.temperature, self.top_k, self.top_p, self.min_p = float(temperature), top_k, top_p, min_p
        self.repetition_penalty = float(repetition_penalty)
        self.generators: list[torch.Generator] | None = None
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch:
                raise InputError(f"seed= has {len(seed)} entries for {batch} rows; give one per row (or one int)")
            self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
        elif isinstance(seed, int):
            self.generators = [torch.Generator(device=device).manual_seed(seed)]
        elif seed is not None:
            raise InputError(f"seed= is an int or a list of ints (one per row), got {seed!r}")
        self.seen: torch.Tensor | None = None  # [batch, vocab] tokens in the context, for the penalty

    def observe(self, ids: torch.Tensor, vocab: int, mask: torch.Tensor | None = None) -> None:
        """Add ``ids [batch, s]`` (where ``mask`` is 1) to the context the repetition penalty sees."""
        if self.repetition_penalty == 1.0:
            return
        if self.seen is None:
            self.seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        self.seen.scatter_(1, torch.where(keep, ids, ids.new_zeros(())), keep)

    def penalised(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with the repetition penalty applied to the tokens seen so far."""
        if self.seen is None:
            return logits
        penalised = torch.where(logits > 0, logits / self.repetition_penalty, logits * self.repetition_penalty)
        return torch.where(self.seen, penalised, logits)

    def next(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token ``[batch]`` from float logits ``[batch, vocab]``."""
        logits = self.penalised(logits)
        if self.temperature == 0.0:
            return logits.argmax(-1)
        probs = self.probabilities(logits, penalise=False)
        if self.generators is None or len(self.generators) == 1:
            gen = None if self.generators is None else self.generators[0]
            return torch.multinomial(probs, 1, generator=gen)[:, 0]
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[:, 0]
                          for i, g in enumerate(self.generators)])

    def probabilities(self, logits: torch.Tensor, penalise: bool = True) -> torch.Tensor:
        """The distribution ``[batch, vocab]`` sampling draws from (unnormalised after the
        top-p and min-p cuts; ``torch.multinomial`` normalises), for ``temperature > 0``."""
        if penalise:
            logits = self.penalised(logits)
        logits = logits / self.temperature
        if self.top_k is not None:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.top_p is not None:
            sorted_p, order = probs.sort(-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # probability of the tokens ranked above
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)  # the most likely always stays
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        if self.min_p is not None:
            probs = probs.masked_fill(probs < self.min_p * probs.max(-1, keepdim=True).values, 0.0)
        return probs

    def update(self, token: torch.Tensor) -> None:
        """Add the chosen tokens ``[batch]`` to the context."""
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)


__all__ = ["Sampler"]

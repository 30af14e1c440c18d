"""Checking what a forward pass is given: prompts, token ids, masks, residual streams, positions.

Everything the model would otherwise fail on obscurely (an empty prompt, ids outside the
vocabulary, a sequence longer than the model's positions, a mask of the wrong shape, layer
bounds out of range) is an :class:`InputError` that says what to pass instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..hooks.checks import is_int
from ..hooks.positions import resolve_positions
from .config import Gemma3Config

Prompt = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
"""Text, a batch of texts (padded for you), token ids ``[seq]`` or ``[batch, seq]``."""


class InputError(ValueError):
    """Input the model cannot run on (empty, ids out of range, too long, bad mask, bad layer bounds)."""


class UnreachableSiteError(InputError):
    """A hook or cache names a site that this run does not compute (it starts after or stops before it)."""


def is_resid(x: Any) -> bool:
    """A float ``[batch, seq, d]`` tensor: a residual stream, not token ids."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 3


def is_text(prompt: Any) -> bool:
    """Text or a non-empty list of texts."""
    return isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt)
                                       and all(isinstance(t, str) for t in prompt))


def to_ids(cfg: Gemma3Config, tokenizer: Any, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids [b, s] LongTensor on the CPU, attention_mask [b, s] | None)`` from a prompt."""
    mask = None
    if is_text(prompt):
        if tokenizer is None:
            raise InputError("this model has no tokenizer; pass token ids, or load one (model.tokenizer = ...)")
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("empty prompt: pass some text (or token ids such as [2] for BOS alone)")
            ids = torch.tensor([tokenizer.encode(prompt)])
        else:
            ids, mask = tokenizer.batch_encode(list(prompt))
    elif isinstance(prompt, torch.Tensor):
        ids = prompt
    elif isinstance(prompt, (list, tuple)):
        if not prompt or all(isinstance(t, (list, tuple)) and not t for t in prompt):
            raise InputError("empty input: pass at least one token id or a non-empty text")
        if all(isinstance(t, (list, tuple)) for t in prompt):
            lengths = {len(t) for t in prompt}
            if len(lengths) != 1:
                raise InputError(f"token rows have different lengths {sorted(lengths)}; pad them and pass an "
                                 "attention_mask, or pass a list of texts (padded for you)")
        try:
            ids = torch.tensor(prompt)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise InputError(f"cannot read {str(prompt)[:60]!r} as token ids ({e}); pass a list of ints, "
                             "a list of equal-length lists of ints, or a LongTensor") from None
    else:
        raise InputError(f"cannot run on {type(prompt).__name__}; pass text, a list of texts, or token ids")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise InputError(f"token ids must be integers, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise InputError(f"token ids must be [batch, seq] or [seq], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise InputError("empty input: pass at least one token id or a non-empty text")
    if ids.shape[1] > cfg.max_positions:
        raise InputError(f"sequence of {ids.shape[1]} tokens is longer than the model's {cfg.max_positions} "
                         "positions; truncate it or split it into windows")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); "
                         "check the tokenizer matches the model")
    return ids.to(torch.long), mask


@dataclass(frozen=True)
class PreparedInput:
    """One call's input, checked once and passed down instead of the prompt (``run_with_cache``
    and ``run_with_grads`` build it; ``forward`` takes it in place of a prompt): the prompt, its
    token ids and padding mask as :func:`to_ids` returns them (``None`` for a residual stream),
    the run's layer bounds, and the sites of the call that the run computes (already resolved
    and checked to be reached, so the forward neither tokenizes nor checks them again).

    >>> cfg = Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8, vocab_size=9)
    >>> ids, mask = to_ids(cfg, None, [2, 3])
    >>> PreparedInput([2, 3], ids, mask, 0, None, ("embed",)).ids
    tensor([[2, 3]])
    """

    prompt: Any
    ids: torch.Tensor | None
    text_mask: torch.Tensor | None
    start_at_layer: int
    stop_at_layer: int | None
    names: tuple[str, ...] = ()


def check_mask(mask: Any, shape: tuple[int, ...], offset: int, device: torch.device) -> torch.Tensor | None:
    """A 0/1 ``[batch, offset + seq]`` LongTensor, or None when every token is real."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if mask.dim() == 1:
        mask = mask[None]
    want = (shape[0], offset + shape[1])
    if tuple(mask.shape) != want:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)} but the tokens need {want}"
                         + (f" (a {offset}-token prefix plus {shape[1]} new tokens)" if offset else "")
                         + "; give one 0/1 per token")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token); got other values")
    if not bool((mask.sum(-1) > 0).all()):
        raise InputError("an attention_mask row is all zeros: every sequence needs at least one token")
    mask = mask.to(torch.long)
    return None if bool(mask.all()) else mask


def check_resid(cfg: Gemma3Config, x: Any, layer: int) -> None:
    """A residual stream entering ``layer``: ``[batch, seq, d_model]`` floats, at least one token."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != cfg.d_model:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"start_at_layer={layer} needs the residual stream [batch, seq, {cfg.d_model}] "
                         f"(e.g. cache['blocks.{layer}.resid_pre']), got {got}")
    if x.shape[1] == 0:
        raise InputError("empty input: the residual has no positions")


def check_layers(cfg: Gemma3Config, start_at_layer: int, stop_at_layer: int | None) -> int:
    """Check the bounds of a partial run; returns the layer it stops before."""
    n = cfg.n_layers
    for name, value in (("start_at_layer", start_at_layer), ("stop_at_layer", stop_at_layer)):
        if value is not None and (not is_int(value)):
            raise InputError(f"{name} must be an int, got {value!r}")
    if not 0 <= start_at_layer <= n:
        raise InputError(f"start_at_layer={start_at_layer} is outside 0..{n} (the model has {n} layers)")
    stop = n if stop_at_layer is None else stop_at_layer
    if not start_at_layer <= stop <= n:
        raise InputError(f"stop_at_layer={stop_at_layer} is outside {start_at_layer}..{n}: it is the layer the run "
                         f"stops before (0 = right after the embedding, {n} = after the last layer, no logits)")
    return stop


def select_positions(x: torch.Tensor, at: Any) -> torch.Tensor:
    """``x[:, at]`` keeping the sequence axis: ``at`` is a position selector (the rule of
    :mod:`interp.hooks.positions`) or a ``[batch, k]`` LongTensor of per-row indices. An index
    outside the sequence is an :class:`IndexError`.

    >>> select_positions(torch.arange(6).view(1, 3, 2), -1)
    tensor([[[4, 5]]])
    """
    seq = x.shape[1]
    if isinstance(at, torch.Tensor) and at.dim() == 2 and at.dtype != torch.bool:
        if at.shape[0] != x.shape[0]:
            raise InputError(f"per-row positions have {at.shape[0]} rows for a batch of {x.shape[0]}")
        idx = resolve_positions(at.flatten(), seq, what="logits_at").view(at.shape).to(x.device)
        return torch.gather(x, 1, idx[..., None].expand(-1, -1, *x.shape[2:]))
    idx = resolve_positions(at, seq, what="logits_at")
    if idx.numel() == 0:
        raise InputError(f"logits_at={at!r} selects no position of a sequence of {seq}")
    return x[:, idx.to(x.device)]


__all__ = ["Prompt", "InputError", "PreparedInput", "is_resid", "is_text", "to_ids", "check_mask", "check_resid",
           "check_layers", "select_positions"]

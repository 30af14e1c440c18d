"""A prompt pair prepared for patching: tokens checked, both runs cached, the metric scored.

Activation patching (:mod:`interp.patching.sweep`) and attribution patching
(:mod:`interp.attribution`) both start here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..hooks import NonFiniteError
from ..metrics import Metric, as_metric
from ..model import Gemma3, Gemma3Cache
from ..model.finite import check_finite
from ..tokens import str_tokens
from .experiments import SWEEPS
from .result import PatchingResult


@dataclass
class PromptPair:
    """A clean and a corrupt prompt of the same length, their metric values and caches."""

    clean_ids: torch.Tensor  # [1, seq]
    corrupt_ids: torch.Tensor
    metric: Metric
    needed: list[int]  # absolute positions the metric reads, sorted
    clean_logits: torch.Tensor  # [1, k, vocab] at needed ([1, k, len(token_ids)] when vocab_selected)
    corrupt_logits: torch.Tensor
    clean_value: float
    corrupt_value: float
    tokens: list[str]
    corrupt_tokens: list[str]
    clean_cache: Any = None
    corrupt_cache: Any = None
    corrupt_grads: Any = None
    vocab_selected: bool = False  # the logits hold only metric.token_ids (see unembed)

    @property
    def seq(self) -> int:
        """Tokens per prompt."""
        return self.clean_ids.shape[1]

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw metric values -> 0 at the corrupt run, 1 at the clean run."""
        return (raw - self.corrupt_value) / (self.clean_value - self.corrupt_value)


def prepare_pair(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable, clean_names: Sequence[str] = (),
                 corrupt_names: Sequence[str] = (), corrupt_grads: bool = False) -> PromptPair:
    """Tokenise and check a prompt pair, run both prompts (caching ``*_names``) and score them.

    With ``corrupt_grads`` the corrupt run is a forward-backward and ``pair.corrupt_grads``
    holds the metric's gradients at ``corrupt_names``.
    """
    clean_ids, mask_c = model.to_tokens_and_mask(clean)
    corrupt_ids, mask_k = model.to_tokens_and_mask(corrupt)
    if mask_c is not None or mask_k is not None or clean_ids.shape[0] != 1 or corrupt_ids.shape[0] != 1:
        raise ValueError("patching takes one clean and one corrupt prompt (a single sequence each, no padding); "
                         "loop over pairs for a dataset")
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"clean and corrupt prompts must have the same number of tokens to align positions; got "
                         f"{clean_ids.shape[1]} and {corrupt_ids.shape[1]}. Choose words that are one token each, "
                         "or pad the shorter prompt with a neutral token")
    metric = as_metric(metric, model)
    seq = clean_ids.shape[1]
    needed = metric.resolve(seq)
    # a metric of a few vocabulary entries gets only those logits (nothing hooked on the unembedding)
    few = metric.token_ids is not None and not any(model.registry.is_hooked(n) for n in ("final_norm", "logits"))
    if few:
        kwargs: dict[str, Any] = {"stop_at_layer": model.cfg.n_layers}

        def to_logits(out: torch.Tensor) -> torch.Tensor:
            return model.unembed(out[:, needed], metric.token_ids)
    else:
        kwargs = {"logits_at": needed} if metric.positions is not None else {}

        def to_logits(out: torch.Tensor) -> torch.Tensor:
            return out
    big = 1 << 62  # these caches are small (a few sites, batch 1); never refuse them

    def cached_run(ids: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, Gemma3Cache]:
        if not names:  # nothing to cache: a plain forward
            return model(ids, **kwargs), Gemma3Cache({})
        return model.run_with_cache(ids, list(names), max_bytes=big, **kwargs)

    with torch.no_grad():
        out, clean_cache = cached_run(clean_ids, clean_names)
        clean_logits = to_logits(out)
    corrupt_grad_cache = None
    if corrupt_grads:
        def scalar(out: torch.Tensor) -> torch.Tensor:
            return metric.from_selected(to_logits(out), seq, few).sum()

        out, corrupt_cache, corrupt_grad_cache = model.run_with_grads(
            corrupt_ids, scalar, list(corrupt_names), **kwargs)
    else:
        with torch.no_grad():
            out, corrupt_cache = cached_run(corrupt_ids, corrupt_names)
    with torch.no_grad():
        corrupt_logits = to_logits(out)
        for ids, logits, which in ((clean_ids, clean_logits, "clean"), (corrupt_ids, corrupt_logits, "corrupt")):
            check_finite(logits, f"the {which} run's logits",
                         partial(cached_run, ids, clean_names))
        clean_value = float(metric.from_selected(clean_logits, seq, few)[0])
        corrupt_value = float(metric.from_selected(corrupt_logits, seq, few)[0])
    if not (math.isfinite(clean_value) and math.isfinite(corrupt_value)):
        raise NonFiniteError(f"the metric {metric.name} gives {clean_value} (clean) and {corrupt_value} (corrupt) "
                             "from finite logits; check the metric (e.g. a log of 0)")
    if not abs(clean_value - corrupt_value) > 1e-12 * max(1.0, abs(clean_value)):
        raise ValueError(f"the metric is {clean_value:.6g} on both prompts, so scores cannot be normalised; choose a "
                         "metric that tells the clean run from the corrupt one")
    return PromptPair(clean_ids, corrupt_ids, metric, needed, clean_logits, corrupt_logits, clean_value,
                      corrupt_value, str_tokens(model, clean_ids[0]), str_tokens(model, corrupt_ids[0]),
                      clean_cache, corrupt_cache, corrupt_grad_cache, few)


def make_result(pair: PromptPair, kind: str, raw: torch.Tensor, method: str, skipped: int = 0) -> PatchingResult:
    """A :class:`PatchingResult` of sweep ``kind`` from raw metric values (normalised here)."""
    return PatchingResult(pair.normalise(raw), raw, kind, SWEEPS[kind], pair.tokens, pair.corrupt_tokens,
                          pair.clean_value, pair.corrupt_value, pair.metric.name, method, skipped)


__all__ = ["PromptPair", "prepare_pair", "make_result"]

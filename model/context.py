"""What one forward pass shares across its layers: positions, masks, RoPE tables, the key/value
cache of earlier tokens, and its own view of the hook registry. Nothing per-forward lives on the
model, so two threads can run one model at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..hooks import HookRun
from .config import GLOBAL

if TYPE_CHECKING:
    from .kvcache import KVCache


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares: its hook run, positions, masks, RoPE tables,
    the cache of earlier tokens' keys and values, and whether attention runs the explicit path
    everywhere (``eager``).

    ``key_mask`` is the ``[batch, held + seq]`` padding mask (None: no padding). The queries are
    sequence indices ``offset .. offset + seq - 1``; a layer attends to keys from
    ``key_start(layer type)`` on. Attention masks are built lazily per layer type and only when
    a layer needs one.
    """

    run: HookRun
    positions: torch.Tensor
    key_mask: torch.Tensor | None
    window: int
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    kv: KVCache | None = None
    eager: bool = False
    _masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def fire(self) -> Callable[..., torch.Tensor]:
        """The hook run's ``fire(name, x, layer)``: the one call at every site."""
        return self.run.fire

    @property
    def hooks(self) -> Any:
        """The hooks this forward sees (a snapshot taken when it started)."""
        return self.run.hooks

    @property
    def offset(self) -> int:
        """The whole-sequence index of the first new token (tokens held in the cache before it)."""
        return self.kv.length if self.kv is not None else 0

    def key_start(self, layer_type: str) -> int:
        """The whole-sequence position of the first key a layer of this type attends to."""
        return self.kv.key_start(layer_type) if self.kv is not None else 0

    def mask(self, layer_type: str, explicit: bool) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)``: a boolean ``[batch | 1, 1, seq_q, seq_k]`` (True = may attend),
        or None with ``is_causal`` saying whether plain causal attention is exact (no mask at all
        when it is False: every query sees every key, as one new token does)."""
        s_q = self.positions.shape[1]
        offset, start = self.offset, self.key_start(layer_type)
        s_k = offset + s_q
        if not explicit and self.key_mask is None:
            if offset == 0 and (layer_type == GLOBAL or s_k <= self.window):
                return None, True
            if s_q == 1:  # one query at the end: every held key of its window is visible
                return None, False
        if layer_type not in self._masks:
            dev = self.positions.device
            qi = torch.arange(offset, s_k, device=dev)[:, None]
            kj = torch.arange(start, s_k, device=dev)[None, :]
            allowed = kj <= qi
            if layer_type != GLOBAL:
                allowed = allowed & (qi - kj < self.window)
            allowed = allowed[None, None]
            if self.key_mask is not None:
                # a padding query would see no key at all; let it see itself (no NaN rows)
                allowed = (allowed & self.key_mask[:, None, None, start:].bool()) | (kj == qi)
            self._masks[layer_type] = allowed
        return self._masks[layer_type], False

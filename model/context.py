"""What one forward pass shares across its layers: positions, masks, RoPE tables, a key/value
prefix, and its own view of the hook registry. Nothing per-forward lives on the model, so two
threads can run one model at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..hooks import HookRun
from .config import GLOBAL

if TYPE_CHECKING:
    from ..hooks import ActivationCache


@dataclass
class KVPrefix:
    """Keys (after RoPE) and values of the first ``length`` tokens, per layer: lets a run
    compute only the tokens after a shared prefix (generation, prefix-reusing patching).

    ``keys[i]``/``values[i]`` are ``[batch, length, kv_heads, d_head]`` for each layer ``i``
    the run computes (a partial run needs only its layers).
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    length: int

    @classmethod
    def from_kv(cls, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], length: int | None = None) -> KVPrefix:
        """From a forward's ``kv_out`` dict, keeping the first ``length`` tokens (default: all)."""
        n = length if length is not None else next(iter(kv.values()))[0].shape[1]
        return cls({i: k[:, :n] for i, (k, _) in kv.items()}, {i: v[:, :n] for i, (_, v) in kv.items()}, n)

    @classmethod
    def from_cache(cls, cache: ActivationCache, length: int, layers: Any = None) -> KVPrefix:
        """From a run's cache of ``blocks.*.attn.k_rot`` and ``blocks.*.attn.v`` (first ``length`` tokens)."""
        layers = cache.layers("attn.k_rot") if layers is None else list(layers)
        return cls({i: cache[f"blocks.{i}.attn.k_rot"][:, :length] for i in layers},
                   {i: cache[f"blocks.{i}.attn.v"][:, :length] for i in layers}, length)

    def expand(self, batch: int) -> KVPrefix:
        """The same prefix for ``batch`` rows (from a prefix of batch 1)."""
        return KVPrefix({i: k.expand(batch, *k.shape[1:]) for i, k in self.keys.items()},
                        {i: v.expand(batch, *v.shape[1:]) for i, v in self.values.items()}, self.length)


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares: its hook run, positions, masks, RoPE tables,
    a prefix, and whether attention runs the explicit path everywhere (``eager``).

    ``key_mask`` is the ``[batch, prefix + seq]`` padding mask (None: no padding). The queries
    are sequence indices ``offset .. offset + seq - 1``. Attention masks are built lazily per
    layer type and only when a layer needs one (``mask`` returns None when plain causal
    attention is exact, which lets the fused kernel use ``is_causal``). ``kv_out``, when a
    dict, collects each layer's full keys and values (to build a :class:`KVPrefix`).
    """

    run: HookRun
    positions: torch.Tensor
    key_mask: torch.Tensor | None
    window: int
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    prefix: KVPrefix | None = None
    kv_out: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    eager: bool = False
    _masks: dict[str, torch.Tensor | None] = field(default_factory=dict)

    @property
    def fire(self) -> Any:
        """The hook run's ``fire(name, x, layer)``: the one call at every site."""
        return self.run.fire

    @property
    def hooks(self) -> Any:
        """The hooks this forward sees (a snapshot taken when it started)."""
        return self.run.hooks

    @property
    def offset(self) -> int:
        return self.prefix.length if self.prefix is not None else 0

    def mask(self, layer_type: str, explicit: bool) -> torch.Tensor | None:
        """Boolean ``[batch | 1, 1, seq_q, seq_k]`` (True = may attend), or None for plain causal."""
        s_q = self.positions.shape[1]
        offset = self.offset
        s_k = offset + s_q
        sliding_matters = layer_type != GLOBAL and s_k > self.window
        if not explicit and self.key_mask is None and not sliding_matters and offset == 0:
            return None
        if layer_type not in self._masks:
            dev = self.positions.device
            qi = torch.arange(offset, s_k, device=dev)[:, None]
            kj = torch.arange(s_k, device=dev)[None, :]
            allowed = kj <= qi
            if layer_type != GLOBAL:
                allowed = allowed & (qi - kj < self.window)
            allowed = allowed[None, None]
            if self.key_mask is not None:
                # a padding query would see no key at all; let it see itself (no NaN rows)
                allowed = (allowed & self.key_mask[:, None, None, :].bool()) | (kj == qi)
            self._masks[layer_type] = allowed
        return self._masks[layer_type]

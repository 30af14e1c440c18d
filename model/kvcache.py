"""The keys and values of earlier tokens: one concept for generation and for prefix reuse.

A :class:`KVCache` holds, per layer, the keys (after RoPE) and values of the tokens a run has
already seen, and the padding mask of those tokens. A forward given ``kv_cache=`` computes only
the new tokens and attends to the held ones. Two kinds:

- **growing** (``KVCache.empty(cfg, batch)``, what ``generate`` uses): every full forward
  appends its new tokens. Memory is preallocated: a sliding-window layer keeps a ring of the
  last ``window`` positions (its memory never grows past the window, as Gemma 3 was designed
  for), a global layer grows in chunks. Reading the keys to attend costs no copy.
- **frozen** (``KVCache.from_cache(cache, length)``, what patching sweeps use): the keys and
  values of the first ``length`` tokens of a cached run, read by many runs that share that
  prefix, never changed. A partial run needs only its own layers.

Either way, a sliding layer attends to at most the ``window - 1`` held positions before the new
tokens (the rest are outside every new query's window), a global layer to all of them. On
``attn.scores`` and ``attn.pattern`` the key axis then covers whole-sequence positions
``site.key_offset ..`` (0 for a run without a cache).

>>> from interp.model.config import Gemma3Config
>>> cfg = Gemma3Config(n_layers=2, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=4, vocab_size=9,
...                    window=3, layer_types=("sliding_attention", "full_attention"))
>>> kv = KVCache.empty(cfg, batch=1)
>>> k = torch.randn(1, 5, 1, 4)
>>> for layer in (0, 1):                         # what one forward of 5 tokens does at each layer
...     keys, _, start = kv.attend(layer, k, k)
>>> kv.commit(5, None)
>>> kv.length, kv.held(0), kv.held(1)            # the ring keeps the last 3 of 5; the global layer all 5
(5, 3, 5)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .config import GLOBAL, Gemma3Config
from .sites import block_site

if TYPE_CHECKING:
    from ..hooks import ActivationCache

GROW_CHUNK = 256  # positions a global layer's buffer grows by


class _Store:
    """Keys and values of one layer: a frozen pair of tensors, a growing buffer, or a ring."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, n: int, ring: int | None, growing: bool):
        self.keys, self.values, self.n, self.ring, self.growing = keys, values, n, ring, growing

    def view(self, last: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The held keys and values of the last ``last`` positions (all when None), oldest first."""
        take = self.n if last is None else min(last, self.n)
        if self.ring is None:
            return self.keys[:, self.n - take:self.n], self.values[:, self.n - take:self.n]
        # a mirrored ring of 2W slots: position p sits at p % W and p % W + W, so the last W
        # positions are one contiguous slice (no copy)
        end = self.n % self.ring + self.ring
        return self.keys[:, end - take:end], self.values[:, end - take:end]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        s = k.shape[1]
        if self.ring is None:
            if self.n + s > self.keys.shape[1]:
                grow = max(GROW_CHUNK, self.n + s - self.keys.shape[1])
                pad = self.keys.new_zeros(self.keys.shape[0], grow, *self.keys.shape[2:])
                self.keys = torch.cat((self.keys, pad), 1)
                self.values = torch.cat((self.values, pad.clone()), 1)
            self.keys[:, self.n:self.n + s] = k
            self.values[:, self.n:self.n + s] = v
        else:
            w = self.ring
            if s == 1:  # a generation step: two slices, no index tensors
                slot = self.n % w
                for at in (slot, slot + w):
                    self.keys[:, at] = k[:, 0]
                    self.values[:, at] = v[:, 0]
                self.n += 1
                return
            keep = min(s, w)
            pos = torch.arange(self.n + s - keep, self.n + s, device=k.device) % w
            for slots in (pos, pos + w):
                self.keys[:, slots] = k[:, s - keep:]
                self.values[:, slots] = v[:, s - keep:]
        self.n += s


class KVCache:
    """Keys (after RoPE) and values of earlier tokens, per layer, and their padding mask."""

    def __init__(self, stores: dict[int, _Store], length: int, window: int, layer_types: tuple[str, ...],
                 key_mask: torch.Tensor | None = None, growing: bool = False):
        self.stores, self.length, self.window = stores, length, window
        self.layer_types, self.key_mask, self.growing = layer_types, key_mask, growing
        self.broken = False  # a forward failed half-way through appending: the cache is inconsistent

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, cfg: Gemma3Config, batch: int, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", capacity: int = GROW_CHUNK) -> KVCache:
        """A growing cache for ``batch`` rows (generation): rings of ``2 * window`` slots on
        sliding layers, buffers that grow by chunks on global layers."""
        stores = {}
        for i, kind in enumerate(cfg.layer_types):
            ring = None if kind == GLOBAL else cfg.window
            size = capacity if ring is None else 2 * ring
            z = torch.zeros(batch, size, cfg.n_kv_heads, cfg.d_head, dtype=dtype, device=device)
            stores[i] = _Store(z, z.clone(), 0, ring, True)
        return cls(stores, 0, cfg.window, tuple(cfg.layer_types), None, growing=True)

    @classmethod
    def from_cache(cls, cache: ActivationCache, length: int, cfg: Gemma3Config, layers: Any = None,
                   key_mask: torch.Tensor | None = None) -> KVCache:
        """A frozen prefix: the first ``length`` tokens of a run's cache of ``blocks.*.attn.k_rot``
        and ``blocks.*.attn.v`` (the layers given, default every cached one)."""
        layers = cache.layers("attn.k_rot") if layers is None else list(layers)
        stores = {i: _Store(cache[block_site(i, "attn.k_rot")][:, :length], cache[block_site(i, "attn.v")][:, :length],
                            length, None, False) for i in layers}
        return cls(stores, length, cfg.window, tuple(cfg.layer_types), key_mask)

    # ------------------------------------------------------------------ facts
    @property
    def batch(self) -> int | None:
        """Rows held (None for a cache with no layers)."""
        store = next(iter(self.stores.values()), None)
        return None if store is None else store.keys.shape[0]

    def held(self, layer: int) -> int:
        """Positions layer ``layer`` holds (at most ``window`` on a sliding layer of a growing cache)."""
        store = self.stores[layer]
        return min(store.n, store.ring) if store.ring is not None else store.n

    def nbytes(self) -> int:
        """Bytes of the key and value buffers."""
        return sum(s.keys.numel() * s.keys.element_size() * 2 for s in self.stores.values())

    def key_start(self, layer_type: str) -> int:
        """The first whole-sequence position a layer of ``layer_type`` attends to among the held ones."""
        return 0 if layer_type == GLOBAL else max(0, self.length - (self.window - 1))

    def expand(self, batch: int) -> KVCache:
        """The same frozen prefix for ``batch`` rows (from a prefix of batch 1)."""
        if self.growing:
            raise ValueError("a growing cache (generation) cannot be expanded to more rows")
        stores = {i: _Store(s.keys.expand(batch, *s.keys.shape[1:]), s.values.expand(batch, *s.values.shape[1:]),
                            s.n, None, False) for i, s in self.stores.items()}
        mask = None if self.key_mask is None else self.key_mask.expand(batch, -1)
        return KVCache(stores, self.length, self.window, self.layer_types, mask)

    # ------------------------------------------------------------------ used by the forward
    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Keys and values to attend for the new tokens' ``k``/``v`` ``[batch, s, kv, hd]`` at
        ``layer``: the held ones the new queries can see, then the new ones; returns them and
        the whole-sequence position of the first. A growing cache stores the new tokens too."""
        if self.broken:
            raise RuntimeError("this KVCache was left half-updated by a forward that failed; start a new one "
                               "(KVCache.empty) and run the tokens again")
        if layer not in self.stores:
            raise KeyError(f"the key/value cache holds no layer {layer}; it was built for layers {sorted(self.stores)}")
        store = self.stores[layer]
        start = self.key_start(self.layer_types[layer])
        need = self.length - start
        s = k.shape[1]
        if store.growing and (store.ring is None or s == 1):
            store.append(k, v)  # then one view holds held + new, with no copy
            keys, values = store.view(need + s)
            return keys, values, start
        past_k, past_v = store.view(need)
        keys, values = torch.cat((past_k, k), 1), torch.cat((past_v, v), 1)  # before the ring is overwritten
        if store.growing:
            store.append(k, v)
        return keys, values, start

    def commit(self, new_tokens: int, new_mask: torch.Tensor | None) -> None:
        """After a full forward on a growing cache: ``new_tokens`` more are held (their padding
        mask ``[batch, new_tokens]`` or None for all real)."""
        if not self.growing:
            return
        if new_mask is not None or self.key_mask is not None:
            old = self.key_mask
            if old is None:
                old = torch.ones(new_mask.shape[0], self.length, dtype=torch.long, device=new_mask.device)  # type: ignore[union-attr]
            add = new_mask if new_mask is not None else torch.ones(old.shape[0], new_tokens, dtype=torch.long,
                                                                    device=old.device)
            self.key_mask = torch.cat((old, add), 1)
        self.length += new_tokens


__all__ = ["KVCache", "GROW_CHUNK"]

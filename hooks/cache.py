"""ActivationCache: a run's activations by site name; saved and loaded as safetensors.

>>> import torch
>>> cache = ActivationCache({"blocks.0.resid_post": torch.ones(1, 2, 3),
...                          "blocks.1.resid_post": torch.zeros(1, 2, 3)}, layer_format="blocks.{layer}.")
>>> cache.stack("resid_post").shape
torch.Size([2, 1, 2, 3])
>>> cache.nbytes
48
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .checks import is_int
from .names import SiteNames
from .positions import Positions, resolve_positions
from .registry import NonFiniteError, Site

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
FORMAT_VERSION = "1"


class CacheFileError(ValueError):
    """A file that is not an :class:`ActivationCache` written by :meth:`ActivationCache.save`."""


class ActivationCache(Mapping[str, torch.Tensor]):
    """A read-only mapping from site name to tensor (detached unless gradients were asked for).

    ``layer_format`` (e.g. ``"blocks.{layer}."``, set by the model that filled the cache) lets
    :meth:`layers` and :meth:`stack` find one kind of site across layers. ``aliases`` maps other
    spellings of a site name (Hugging Face or TransformerLens names) to the name it is stored
    under: ``cache[alias]`` finds the same tensor, while iteration and files keep the site names.

    >>> c = ActivationCache({"blocks.3.resid_post": torch.ones(1)}, aliases={"blocks.3.hook_resid_post":
    ...     "blocks.3.resid_post"})
    >>> c["blocks.3.hook_resid_post"] is c["blocks.3.resid_post"], list(c), "blocks.3.hook_resid_post" in c
    (True, ['blocks.3.resid_post'], True)
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, layer_format: str | None = None,
                 aliases: Mapping[str, str] | None = None):
        self._t: dict[str, torch.Tensor] = dict(tensors or {})
        self.layer_format = layer_format
        self._aliases = None if aliases is None else dict(aliases)
        clash = [a for a in self._aliases or () if a in self._t]
        if clash:
            raise ValueError(f"aliases {clash[:3]} are also stored names; an alias must be another spelling")
        self._names = SiteNames(self._t, layer_format=layer_format) if layer_format else None

    @property
    def aliases(self) -> dict[str, str]:
        """Other spellings of the stored names -> the stored name (built on first use)."""
        if self._aliases is None:
            self._aliases = self._default_aliases()
        return self._aliases

    def _default_aliases(self) -> dict[str, str]:
        """The aliases of a cache built without ``aliases=`` (a model's cache class derives them)."""
        return {}

    def __getitem__(self, name: str | tuple[str, int]) -> torch.Tensor:
        if isinstance(name, tuple):
            return self._by_layer(name)
        if name in self._t:
            return self._t[name]
        if name in self.aliases and self.aliases[name] in self._t:
            return self._t[self.aliases[name]]
        site = f" (an alias of {self.aliases[name]!r})" if name in self.aliases else ""
        raise KeyError(
            f"{name!r}{site} is not in this cache ({len(self._t)} sites cached); cache it with "
            f"run_with_cache(..., names={name!r}) or names=None for every site")

    def __contains__(self, name: object) -> bool:
        if isinstance(name, tuple):
            try:
                return self._layer_key(*name) in self._t
            except (KeyError, TypeError, ValueError):
                return False
        return name in self._t or self.aliases.get(name) in self._t  # type: ignore[call-overload]

    def _layer_key(self, kind: str, layer: int) -> str:
        """The site name a ``(kind, layer)`` key means (a model's cache class adds its own
        spellings, e.g. TransformerLens's short names); an unknown kind or a bad layer raises."""
        if self._names is None:
            raise KeyError(f"({kind!r}, {layer!r}): this cache has no per-layer naming (layer_format); index it "
                           "by full site name")
        if not is_int(layer) or layer < 0:
            raise KeyError(f"({kind!r}, {layer!r}): the layer must be an int >= 0")
        return self._names.join(layer, kind)

    def _by_layer(self, key: tuple[Any, ...]) -> torch.Tensor:
        """``cache[kind, layer]``, TransformerLens's indexing: ``cache["resid_post", 3]`` is
        ``cache["blocks.3.resid_post"]`` (for a cache with ``layer_format="blocks.{layer}."``).

        >>> c = ActivationCache({"blocks.3.resid_post": torch.ones(1)}, layer_format="blocks.{layer}.")
        >>> c["resid_post", 3]
        tensor([1.])
        """
        if len(key) != 2:
            raise KeyError(f"cache[{', '.join(map(repr, key))}]: a tuple key is (kind, layer), e.g. "
                           "cache['resid_post', 3]; TransformerLens's third element (layer type) is not taken")
        name = self._layer_key(*key)
        if name in self._t:
            return self._t[name]
        _, kind = self._names.split(name) if self._names is not None else (None, name)
        layers = self.layers(kind)
        held = f"{kind} is cached at layers {layers}" if layers else f"no layer's {kind} is cached"
        raise KeyError(f"cache[{key[0]!r}, {key[1]}] = {name!r} is not in this cache ({held}); cache it with "
                       f"run_with_cache(..., names={name!r})")

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} sites, {self.nbytes / 2**20:.1f} MiB)"

    def _new(self, tensors: Mapping[str, torch.Tensor]) -> ActivationCache:
        new = type(self)(tensors, layer_format=self.layer_format)
        if self._aliases is not None:
            new._aliases = dict(self._aliases)
        return new

    @property
    def nbytes(self) -> int:
        """Total bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self._t.values())

    def layers(self, kind: str) -> list[int]:
        """The layer indices for which ``kind`` (e.g. ``resid_post``) is cached, ascending."""
        if self._names is None:
            raise ValueError("this cache has no per-layer naming (layer_format); index it by full site name")
        return sorted(layer for name, layer in self._names.layer_of.items()
                      if layer is not None and self._names.split(name)[1] == kind)

    def stack(self, kind: str) -> torch.Tensor:
        """``kind`` at every cached layer, stacked: ``[layers, *site_shape]``.

        >>> ActivationCache({"blocks.0.mlp.out": torch.ones(2)}, layer_format="blocks.{layer}.").stack("mlp.out").shape
        torch.Size([1, 2])
        """
        layers = self.layers(kind)
        if not layers:
            assert self._names is not None
            raise KeyError(f"no {kind!r} at any layer in this cache; cache names={self._names.every_layer(kind)!r}")
        assert self._names is not None
        return torch.stack([self._t[self._names.join(i, kind)] for i in layers])

    def to(self, *args: Any, **kwargs: Any) -> ActivationCache:
        """A copy with every tensor moved/cast (``cache.to("cpu")``, ``cache.to(torch.bfloat16)``)."""
        return self._new({k: v.to(*args, **kwargs) for k, v in self._t.items()})

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], allow_non_finite: bool = False) -> None:
        """Write the cache to a safetensors file (no pickle; :meth:`load` reads it).

        A cache holding NaN or inf is refused (it usually means a broken run) unless
        ``allow_non_finite``.

        >>> import tempfile
        >>> f = os.path.join(tempfile.mkdtemp(), "c.safetensors")
        >>> ActivationCache({"embed": torch.ones(1, 2)}).save(f)
        >>> ActivationCache.load(f)["embed"]
        tensor([[1., 1.]])
        """
        from safetensors.torch import save_file

        if not allow_non_finite:
            bad = [k for k, v in self._t.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise NonFiniteError(f"the cache holds NaN or inf at {bad[:5]}; pass allow_non_finite=True to save "
                                     "it anyway")
        meta = {"format": "pt", "kind": "ActivationCache", "version": FORMAT_VERSION,
                "layer_format": json.dumps(self.layer_format)}
        save_file({k: v.detach().contiguous().cpu() for k, v in self._t.items()}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu",
             names: Iterable[str] | None = None) -> ActivationCache:
        """Read a cache written by :meth:`save`; ``names`` (e.g. ``model.site_names()``) checks
        that every key is a site of that model. Any other safetensors file (a model's weights,
        a file with keys that are not site names, tensors of different batch sizes) is a
        :class:`CacheFileError`."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                if meta.get("kind") != "ActivationCache":
                    raise CacheFileError(f"{path} is a safetensors file but not an ActivationCache (its metadata has "
                                         f"no kind='ActivationCache'; it holds {len(keys)} tensors such as "
                                         f"{keys[:3]}); write caches with cache.save()")
                bad = [k for k in keys if not _KEY.fullmatch(k)]
                if bad:
                    raise CacheFileError(f"{path}: {bad[0]!r} is not a site name")
                if names is not None:
                    valid = set(names)
                    foreign = [k for k in keys if k not in valid]
                    if foreign:
                        raise CacheFileError(f"{path}: {foreign[:3]} are not sites of this model")
                tensors = {k: f.get_tensor(k) for k in keys}
        except SafetensorError as e:
            raise CacheFileError(f"{path} is not a readable safetensors file ({e})") from None
        batches = {tuple(t.shape[:1]) for t in tensors.values() if t.dim() > 0}
        if len(batches) > 1:
            raise CacheFileError(f"{path}: the tensors have different batch sizes {sorted(batches)}; "
                                 "not one run's cache")
        try:
            layer_format = json.loads(meta.get("layer_format", "null"))
        except json.JSONDecodeError:
            raise CacheFileError(f"{path}: unreadable layer_format metadata") from None
        if layer_format is not None and (not isinstance(layer_format, str) or "{layer}" not in layer_format):
            raise CacheFileError(f"{path}: layer_format metadata {layer_format!r} has no '{{layer}}'")
        return cls(tensors, layer_format=layer_format)


def seq_indices(positions: Positions, site: Site, length: int) -> torch.Tensor:
    """Sequence ``positions`` (of the whole sequence, the rule of :mod:`interp.hooks.positions`)
    -> indices into a tensor of ``length`` tokens that covers ``site.offset .. site.offset +
    length - 1`` (or ``site.indices``). Selected positions the tensor does not hold (earlier
    tokens of a cached prefix) are simply not in it; an int outside the whole sequence raises.

    >>> seq_indices([0, 2, -1], Site("embed", None), 4)
    tensor([0, 2, 3])
    >>> seq_indices([3], Site("logits", None, indices=torch.tensor([1, 3]), length=4), 2)
    tensor([1])
    """
    total, held = site.whole_sequence(length)
    wanted = torch.zeros(total, dtype=torch.bool)
    wanted[resolve_positions(positions, total)] = True
    return wanted[held].nonzero().flatten()


def caching_hook(store: dict[str, torch.Tensor], *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, keep_grad: bool = False,
                 positions: Positions | None = None, copy: bool = True) -> Callable[[torch.Tensor, Site], None]:
    """A hook that stores what it sees in ``store[site.name]`` (detached unless ``keep_grad``),
    optionally moved/cast and cut to some sequence ``positions`` (query positions for scores and
    patterns). It stores a copy, never a view, so a later hook that writes into the activation in
    place cannot change what was cached; ``copy=False`` stores the run's own tensor when nothing
    else is hooked (the model itself never writes into a site's tensor after it fires).

    >>> store = {}
    >>> caching_hook(store, positions=[-1])(torch.arange(3.0)[None], Site("embed", None))
    >>> store["embed"]
    tensor([[2.]])
    """

    def hook(x: torch.Tensor, site: Site) -> None:
        t = x if keep_grad else x.detach()
        if positions is not None:
            idx = seq_indices(positions, site, t.shape[site.seq_axis]).to(t.device)
            t = t.index_select(site.seq_axis, idx)
        if device is not None or dtype is not None:
            t = t.to(device=device, dtype=dtype)
        if copy and not keep_grad and t.data_ptr() == x.data_ptr():
            t = t.clone()  # (with keep_grad the stored tensor must be the graph's own node)
        store[site.name] = t
        return None

    return hook


__all__ = ["ActivationCache", "CacheFileError", "caching_hook", "seq_indices"]

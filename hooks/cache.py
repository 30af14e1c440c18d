"""ActivationCache: a run's activations by site name, with the residual-stream algebra.

>>> import torch
>>> cache = ActivationCache({"blocks.0.resid_post": torch.ones(1, 2, 3),
...                          "blocks.1.resid_post": torch.zeros(1, 2, 3)})
>>> cache.stack("resid_post").shape
torch.Size([2, 1, 2, 3])
>>> cache.nbytes
48
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import torch

from .registry import Site

_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")


class ActivationCache(Mapping[str, torch.Tensor]):
    """A read-only mapping from site name to tensor (detached unless gradients were asked for)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None):
        self._t: dict[str, torch.Tensor] = dict(tensors or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._t[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not in this cache ({len(self._t)} sites cached); cache it with "
                f"run_with_cache(..., names={name!r}) or names=None for every site"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} sites, {self.nbytes / 2**20:.1f} MiB)"

    @property
    def nbytes(self) -> int:
        """Total bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self._t.values())

    def layers(self, kind: str) -> list[int]:
        """The layer indices for which ``blocks.{i}.{kind}`` is cached, ascending."""
        out = []
        for name in self._t:
            m = _LAYER.match(name)
            if m and m.group(2) == kind:
                out.append(int(m.group(1)))
        return sorted(out)

    def stack(self, kind: str) -> torch.Tensor:
        """``blocks.{i}.{kind}`` for every cached layer i, stacked: ``[layers, *site_shape]``.

        >>> ActivationCache({"blocks.0.mlp.out": torch.ones(2)}).stack("mlp.out").shape
        torch.Size([1, 2])
        """
        layers = self.layers(kind)
        if not layers:
            raise KeyError(f"no 'blocks.{{i}}.{kind}' in this cache; cache names='blocks.*.{kind}'")
        return torch.stack([self._t[f"blocks.{i}.{kind}"] for i in layers])

    def save(self, path) -> None:
        """Write the cache to a safetensors file (no pickle; ``ActivationCache.load`` reads it).

        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "c.safetensors")
        >>> ActivationCache({"embed": torch.ones(1, 2)}).save(f)
        >>> ActivationCache.load(f)["embed"]
        tensor([[1., 1.]])
        """
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self._t.items()}, str(path),
                  metadata={"format": "pt", "kind": "ActivationCache"})

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "ActivationCache":
        """Read a cache written by :meth:`save`."""
        from safetensors.torch import load_file

        return cls(load_file(str(path), device=str(device)))

    def to(self, *args, **kwargs) -> "ActivationCache":
        """A copy with every tensor moved/cast (``cache.to("cpu")``, ``cache.to(torch.bfloat16)``)."""
        return ActivationCache({k: v.to(*args, **kwargs) for k, v in self._t.items()})

    # ------------------------------------------------------------------ residual algebra
    def decompose_resid(self, layer: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """The residual stream entering ``layer`` (default: after the last layer) as its parts.

        Returns ``(parts [n_parts, batch, seq, d], labels)``: ``embed``, then each earlier
        layer's ``post_attn_norm`` and ``post_mlp_norm`` (what Gemma adds to the residual).
        The parts sum to ``resid_pre`` of ``layer`` (to rounding; exactly in fp32 order).
        Needs ``embed``, ``blocks.*.post_attn_norm`` and ``blocks.*.post_mlp_norm`` cached.

        >>> c = ActivationCache({"embed": torch.ones(1, 1, 2),
        ...     "blocks.0.post_attn_norm": torch.ones(1, 1, 2), "blocks.0.post_mlp_norm": torch.ones(1, 1, 2)})
        >>> parts, labels = c.decompose_resid()
        >>> labels, parts.sum(0)
        (['embed', 'blocks.0.post_attn_norm', 'blocks.0.post_mlp_norm'], tensor([[[3., 3.]]]))
        """
        n = len(self.layers("post_attn_norm")) if layer is None else layer
        labels = ["embed"]
        for i in range(n):
            labels += [f"blocks.{i}.post_attn_norm", f"blocks.{i}.post_mlp_norm"]
        return torch.stack([self[name] for name in labels]), labels

    def accumulated_resid(self) -> tuple[torch.Tensor, list[str]]:
        """The residual stream after each stage: ``resid_pre`` of layer 0, then ``resid_post`` of each
        layer, stacked ``[layers + 1, batch, seq, d]`` with labels (the logit lens's input)."""
        posts = self.layers("resid_post")
        labels = ["blocks.0.resid_pre"] + [f"blocks.{i}.resid_post" for i in posts]
        return torch.stack([self[name] for name in labels]), labels


def seq_indices(positions, site: Site, length: int) -> torch.Tensor | slice:
    """Sequence indices (in the whole sequence) -> indices into a tensor of ``length`` tokens
    covering ``site.offset .. site.offset + length - 1`` (or ``site.indices``); positions
    outside are dropped.

    ``positions`` is an int, a list, a slice, or a bool/long tensor. Negative ints count from
    the end of the whole sequence.

    >>> seq_indices([0, 2, -1], Site("embed", None), 4)
    tensor([0, 2, 3])
    >>> seq_indices([3], Site("logits", None, indices=torch.tensor([1, 3]), length=4), 2)
    tensor([1])
    """
    total, held = site.whole_sequence(length)
    if isinstance(positions, slice):
        idx = torch.arange(total)[positions]
    elif isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        idx = positions.nonzero().flatten().cpu()
    else:
        idx = torch.as_tensor(positions, dtype=torch.long).flatten().cpu()
        idx = torch.where(idx < 0, idx + total, idx)
    wanted = torch.zeros(total + 1, dtype=torch.bool)
    wanted[idx[(idx >= 0) & (idx < total)]] = True
    return wanted[held].nonzero().flatten()


def caching_hook(store: dict[str, torch.Tensor], *, device=None, dtype=None,
                 keep_grad: bool = False, positions=None) -> Callable[[torch.Tensor, Site], None]:
    """A hook that stores what it sees in ``store[site.name]`` (detached unless ``keep_grad``),
    optionally moved/cast and cut to some sequence ``positions`` (query positions for
    scores and patterns).

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
        store[site.name] = t
        return None

    return hook

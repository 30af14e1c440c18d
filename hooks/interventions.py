"""Interventions: hooks that patch, ablate or steer an activation, on a selection of it.

Each constructor returns a hook ``fn(x, site) -> Tensor`` for ``model.run_with_hooks``,
``with model.hooks(...)`` or ``model.run_with_cache(..., hooks=...)``:

- :func:`patch` - replace with a tensor or another run's cache,
- :func:`zero_ablate`, :func:`mean_ablate`, :func:`resample_ablate` - ablations,
- :func:`add` - steering, ``x + scale * vector``.

Every constructor takes the same keyword selectors, which combine as an intersection
(rows x positions x heads x neurons); elements outside the selection come back
bit-identical, and ``x`` itself is never modified (the result is a new tensor with ``x``'s
dtype and device; sources are cast to them):

- ``rows=`` batch rows (int, list, slice, LongTensor or bool tensor ``[batch]``).
- ``positions=`` sequence indices in the *full* sequence (int, list, slice, LongTensor, bool
  ``[seq]``, or bool ``[batch, seq]`` for a different choice per row), by the one rule of
  :mod:`interp.hooks.positions`: negative ints count from the end of the whole sequence seen so
  far, an int outside it raises, slices clip (``slice(p, None)``: from ``p`` on, also during
  generation). The tensor at a site covers indices ``site.offset .. site.offset +
  x.shape[site.seq_axis] - 1`` (the offset is non-zero when a run reuses a cached prefix or
  generates); selected positions it does not hold are not touched by that call. On
  ``attn.scores`` / ``attn.pattern`` they select query positions. With left padding these
  are indices into the padded row, not the position ids of ``site.positions``.
- ``heads=`` query-head indices, on sites with a head axis (``site.head_axis``); a
  ``ValueError`` elsewhere. On key/value sites under grouped-query attention
  (``site.kv_group > 1``) query head ``h`` maps to kv head ``h // site.kv_group``, so the
  intervention touches the whole group of query heads that share it.
- ``neurons=`` indices on the *last* axis: MLP neurons on ``[b, s, f]`` sites, residual
  dimensions on ``[b, s, d]`` sites, head dimensions on ``[b, s, h, hd]`` sites, and key
  positions on ``attn.scores`` / ``attn.pattern``.

Composition: several hooks on one site run in the order given (pass a list of
``(name, hook)`` pairs), each seeing the previous one's output. Add, then zero part of it:

>>> import torch
>>> from interp.hooks import HookRegistry, SiteNames
>>> reg = HookRegistry(SiteNames(["blocks.0.mlp.out"]))
>>> steps = [("blocks.0.mlp.out", add(torch.ones(2))),
...          ("blocks.0.mlp.out", zero_ablate(positions=[0]))]
>>> with reg.scope(steps):
...     reg.run().fire("blocks.0.mlp.out", torch.zeros(1, 2, 2), 0)
tensor([[[0., 0.],
         [1., 1.]]])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .positions import Positions, positions_mask
from .registry import Site

Selector = Positions  # an index along any axis (rows, positions, heads, neurons): the forms positions take
Index = Selector | None
Source = torch.Tensor | Mapping[str, torch.Tensor]
Intervention = Callable[[torch.Tensor, Site], torch.Tensor]

__all__ = ["patch", "zero_ablate", "mean_ablate", "resample_ablate", "add", "selection_mask"]


# ---------------------------------------------------------------------- selection
def _check_index(index: Index, what: str) -> Index:
    """Reject selector types early (at construction), so mistakes surface before a run."""
    if isinstance(index, bool):
        raise TypeError(f"{what}= must be an int, list, slice or tensor, not a bool")
    if index is None or isinstance(index, (int, slice, torch.Tensor)):
        return index
    if isinstance(index, (list, tuple, range)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in index):
            raise TypeError(f"{what}= must hold ints, got {list(index)!r}")
        return list(index)
    raise TypeError(f"{what}= must be an int, list, slice or tensor, got {type(index).__name__}")


def _axis_mask(index: Selector, size: int, what: str, site: Site) -> torch.Tensor:
    """A bool ``[size]`` mask for ``index`` over ``range(size)`` (out of range raises)."""
    try:
        return positions_mask(index, size, what=what)
    except (IndexError, ValueError) as e:
        raise type(e)(f"{e} (at {site.name!r}, which has {size} along the {what} axis)") from None


def _seq_mask(positions: Selector, site: Site, local: int, batch: int) -> torch.Tensor:
    """Bool ``[local]`` or ``[batch, local]``: which of the tensor's tokens are selected.

    Positions are indices of the whole sequence (:mod:`interp.hooks.positions`); the tensor
    holds ``site.whole_sequence(local)`` of them."""
    total, held = site.whole_sequence(local)
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool and positions.dim() == 2:
        if tuple(positions.shape) != (batch, total):
            raise ValueError(f"positions= mask has shape {tuple(positions.shape)} but {site.name!r} needs "
                             f"[batch, whole sequence] = ({batch}, {total})")
        return positions.cpu()[:, held]
    return _axis_mask(positions, total, "positions", site)[held]


def selection_mask(x: torch.Tensor, site: Site, *, rows: Index = None, positions: Index = None,
                   heads: Index = None, neurons: Index = None) -> torch.Tensor | None:
    """The bool mask (broadcastable to ``x``) of the selected elements, or None for all of them.

    >>> selection_mask(torch.zeros(2, 3, 4), Site("blocks.0.mlp.out", 0), rows=[1], positions=2).shape
    torch.Size([2, 3, 1])
    >>> selection_mask(torch.zeros(2, 3, 4), Site("blocks.0.mlp.out", 0)) is None
    True
    """
    nd = x.dim()
    mask: torch.Tensor | None = None

    def combine(axis_mask: torch.Tensor, axes: tuple[int, ...]) -> None:
        nonlocal mask
        shape = [1] * nd
        for a, n in zip(axes, axis_mask.shape):
            shape[a] = n
        m = axis_mask.reshape(shape)
        mask = m if mask is None else mask & m

    if rows is not None:
        combine(_axis_mask(rows, x.shape[0], "rows", site), (0,))
    if positions is not None:
        ax = site.seq_axis % nd
        sm = _seq_mask(positions, site, x.shape[ax], x.shape[0])
        combine(sm, (0, ax) if sm.dim() == 2 else (ax,))
    if heads is not None:
        if site.head_axis is None:
            raise ValueError(f"heads= was given for {site.name!r}, which has no head axis; select heads on "
                             "attention sites such as attn.q, attn.z, attn.head_out, attn.pattern")
        ax = site.head_axis % nd
        group = max(int(site.kv_group), 1)
        query = _axis_mask(heads, x.shape[ax] * group, "heads", site)
        combine(query.view(-1, group).any(dim=1), (ax,))  # kv head j serves queries j*g .. j*g+g-1
    if neurons is not None:
        combine(_axis_mask(neurons, x.shape[-1], "neurons", site), (nd - 1,))
    return None if mask is None else mask.to(x.device)


# ---------------------------------------------------------------------- sources
def _lookup(source: Source, site: Site, what: str) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    try:
        return source[site.name]
    except KeyError:
        raise KeyError(f"{what}: the source has no {site.name!r} ({len(source)} sites in it); cache that "
                       "site in the source run, e.g. run_with_cache(..., names=None)") from None


def _fit(src: torch.Tensor, x: torch.Tensor, site: Site, what: str, *, full: bool) -> torch.Tensor:
    """Cast ``src`` to ``x``'s dtype/device and cut a whole-sequence source to the tensor's tokens.

    ``full``: ``src`` must have ``x``'s shape (batch may be 1); else it must broadcast to ``x``.
    Along the sequence axis the source holds 1 token (broadcast), the tensor's tokens, or the
    whole sequence (cut by ``site.offset``); any other length, longer ones included, is an
    error: a source of another prompt's length is not silently cut.
    """
    nd, sd = x.dim(), src.dim()
    if full and sd != nd:
        raise ValueError(f"{what}: source for {site.name!r} has shape {tuple(src.shape)} but the site has "
                         f"{tuple(x.shape)}; give the site's full tensor (batch may be 1)")
    seq_ax = site.seq_axis % nd
    j = seq_ax - (nd - sd)  # the source axis that lines up with the sequence axis
    local = x.shape[seq_ax]
    total, held = site.whole_sequence(local)
    if 0 <= j < sd and src.shape[j] not in (1, local):
        if src.shape[j] != total:
            raise ValueError(
                f"{what}: the source for {site.name!r} covers {src.shape[j]} tokens, but this run has {total} "
                f"(the site holds {local} of them); a source must cover the same tokens. Run the source on a "
                "prompt of the same length, or slice it yourself (e.g. source[:, :n]) if you mean to align "
                "its first tokens")
        if site.indices is not None:
            src = src.index_select(j, held.to(src.device))
        else:
            src = src.narrow(j, site.offset, local)
    ok = sd <= nd and all(s in (1, t) for s, t in zip(src.shape[::-1], x.shape[::-1]))
    if full:
        ok = ok and all(s == t for s, t in zip(src.shape[1:], x.shape[1:]))
    if not ok:
        raise ValueError(f"{what}: source for {site.name!r} has shape {tuple(src.shape)}, which does not fit "
                         f"the site's {tuple(x.shape)} (offset {site.offset})")
    return src.to(device=x.device, dtype=x.dtype)  # after the cut: moves only what is used


def _apply(x: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``new`` where ``mask``, else ``x``: a fresh tensor of ``x``'s shape, dtype and device."""
    if mask is None:
        return new.expand_as(x).clone(memory_format=torch.contiguous_format)
    return torch.where(mask, new, x)


class _Selection:
    """The selectors of one hook; builds the mask once per (shape, site layout, device)."""

    def __init__(self, rows: Index, positions: Index, heads: Index, neurons: Index):
        self.sel = {"rows": _check_index(rows, "rows"), "positions": _check_index(positions, "positions"),
                    "heads": _check_index(heads, "heads"), "neurons": _check_index(neurons, "neurons")}
        self.everything = all(v is None for v in self.sel.values())
        self._memo: dict[tuple[Any, ...], torch.Tensor | None] = {}

    def __call__(self, x: torch.Tensor, site: Site) -> torch.Tensor | None:
        if self.everything:
            return None
        held = None if site.indices is None else (tuple(site.indices.shape), tuple(site.indices.flatten().tolist()))
        key = (site.name, tuple(x.shape), x.device, site.offset, held, site.length, site.seq_axis, site.head_axis,
               site.kv_group)
        if key not in self._memo:
            if len(self._memo) >= 256:
                self._memo.clear()
            self._memo[key] = selection_mask(x, site, **self.sel)
        return self._memo[key]


# ---------------------------------------------------------------------- interventions
def patch(source: Source, *, rows: Index = None, positions: Index = None, heads: Index = None,
          neurons: Index = None) -> Intervention:
    """Replace the activation with ``source`` on the selection.

    ``source`` is a tensor shaped like the site's tensor (batch may be 1, to patch one run
    into every row; the sequence axis may cover the full sequence, cut by ``site.offset``),
    or an :class:`ActivationCache` / mapping, looked up by ``site.name`` (KeyError if absent).
    Row ``i`` takes source row ``i``.

    >>> hook = patch(torch.ones(1, 3, 2), positions=[1])
    >>> hook(torch.zeros(1, 3, 2), Site("blocks.0.mlp.out", 0))
    tensor([[[0., 0.],
             [1., 1.],
             [0., 0.]]])
    """
    sel = _Selection(rows, positions, heads, neurons)

    def hook(x: torch.Tensor, site: Site) -> torch.Tensor:
        src = _fit(_lookup(source, site, "patch"), x, site, "patch", full=True)
        return _apply(x, src, sel(x, site))

    return hook


def zero_ablate(*, rows: Index = None, positions: Index = None, heads: Index = None,
                neurons: Index = None) -> Intervention:
    """Set the selection to zero.

    >>> zero_ablate(neurons=[0])(torch.ones(1, 1, 3), Site("blocks.0.mlp.hidden", 0))
    tensor([[[0., 1., 1.]]])
    """
    sel = _Selection(rows, positions, heads, neurons)

    def hook(x: torch.Tensor, site: Site) -> torch.Tensor:
        return _apply(x, x.new_zeros(()), sel(x, site))

    return hook


def mean_ablate(mean: Source, *, rows: Index = None, positions: Index = None, heads: Index = None,
                neurons: Index = None) -> Intervention:
    """Set the selection to a mean activation.

    ``mean`` is a tensor broadcastable to the site (``[d]``, ``[s, d]``, ``[1, s, d]``; a
    sequence axis covering the full sequence is cut by ``site.offset``), or an
    :class:`ActivationCache` / mapping whose tensor for ``site.name`` is averaged over the
    batch (axis 0), e.g. a cache of a reference dataset of equal-length prompts.

    >>> ref = {"blocks.0.mlp.out": torch.tensor([[[1., 2.]], [[3., 4.]]])}
    >>> mean_ablate(ref)(torch.zeros(1, 1, 2), Site("blocks.0.mlp.out", 0))
    tensor([[[2., 3.]]])
    """
    sel = _Selection(rows, positions, heads, neurons)
    from_batch = not isinstance(mean, torch.Tensor)
    memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(x: torch.Tensor, site: Site) -> torch.Tensor:
        src = _lookup(mean, site, "mean_ablate")
        if from_batch:
            hit = memo.get(site.name)
            if hit is None or hit[0] is not src:
                hit = memo[site.name] = (src, src.float().mean(dim=0, keepdim=True))
            src = hit[1]
        return _apply(x, _fit(src, x, site, "mean_ablate", full=False), sel(x, site))

    return hook


def resample_ablate(cache: Source, seed: int = 0, *, perm: Index = None, rows: Index = None,
                    positions: Index = None, heads: Index = None, neurons: Index = None) -> Intervention:
    """Give each selected row the activation of a row of another run (``cache``).

    Row ``i`` takes source row ``perm[i]`` when ``perm`` (a list/LongTensor of length batch,
    not necessarily a permutation) is given, else a row drawn uniformly with a
    ``torch.Generator`` seeded by ``seed``. The draw is the same at every site and every call
    (deterministic; on a glob of sites each row takes all of them from one source row); use
    one hook per site with different seeds for independent draws. ``cache`` is an
    :class:`ActivationCache` / mapping (by ``site.name``) or a tensor ``[b_src, ...]``.

    >>> other = torch.arange(3.0).view(3, 1, 1)
    >>> resample_ablate(other, perm=[2, 0])(torch.zeros(2, 1, 1), Site("blocks.0.mlp.out", 0)).flatten()
    tensor([2., 0.])
    """
    sel = _Selection(rows, positions, heads, neurons)
    fixed = None if perm is None else torch.as_tensor(_check_index(perm, "perm"), dtype=torch.long).reshape(-1)

    def hook(x: torch.Tensor, site: Site) -> torch.Tensor:
        src = _lookup(cache, site, "resample_ablate")
        n_src, batch = src.shape[0], x.shape[0]
        if fixed is None:
            idx = torch.randint(0, n_src, (batch,), generator=torch.Generator().manual_seed(seed))
        else:
            if fixed.numel() != batch or bool(((fixed < -n_src) | (fixed >= n_src)).any()):
                raise ValueError(f"resample_ablate: perm={fixed.tolist()} must give one source row in "
                                 f"[0, {n_src}) for each of the {batch} rows at {site.name!r}")
            idx = fixed
        src = src.index_select(0, idx.remainder(n_src).to(src.device))
        return _apply(x, _fit(src, x, site, "resample_ablate", full=True), sel(x, site))

    return hook


def add(vector: Source, scale: float = 1.0, *, rows: Index = None, positions: Index = None,
        heads: Index = None, neurons: Index = None) -> Intervention:
    """Steer: ``x + scale * vector`` on the selection.

    ``vector`` broadcasts to the site (``[d]`` for a residual direction, or a fuller shape) or
    is a mapping by ``site.name``. ``scale=0`` leaves the activation unchanged.

    >>> add(torch.tensor([1., 0.]), scale=2.0, rows=[0])(torch.zeros(2, 1, 2), Site("blocks.0.resid_post", 0))
    tensor([[[2., 0.]],
    <BLANKLINE>
            [[0., 0.]]])
    """
    sel = _Selection(rows, positions, heads, neurons)

    def hook(x: torch.Tensor, site: Site) -> torch.Tensor:
        v = _fit(_lookup(vector, site, "add"), x, site, "add", full=False)
        mask = sel(x, site)
        new = (x + scale * v).to(x.dtype)
        return new if mask is None else torch.where(mask, new, x)

    return hook

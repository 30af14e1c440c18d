"""The plan of a patching sweep: which experiments it runs, which it can skip, how they are grouped.

An experiment patches one site (a layer's residual, attention or MLP output at one position,
or one head's output) with its clean value. Experiments that change nothing the metric reads
are not run; the others are grouped by the first position they change (:func:`effective`,
:func:`merge_starts`), which :mod:`interp.patching.sweep` then runs as wavefronts.

>>> len(plan(["resid_pre", "attn.z"], n_layers=2, n_heads=4, seq=3))
14
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..model import Gemma3
from ..model.memory import available_memory
from ..model.sites import block_site

if TYPE_CHECKING:
    from .pair import PromptPair

POSITION_SITES = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out")
SWEEPS: dict[str, tuple[str, ...]] = {
    **{s: ("layer", "pos") for s in POSITION_SITES},
    "attn.z": ("layer", "head"),
    "attn.z_by_pos": ("layer", "head", "pos"),
}


def check_kinds(kinds: str | Sequence[str]) -> list[str]:
    """The sweeps ``kinds`` (one or a list), checked and de-duplicated."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for k in kinds:
        if k not in SWEEPS:
            raise ValueError(f"unknown sweep kind {k!r}; choose from {', '.join(SWEEPS)}")
    if not kinds:
        raise ValueError("no kinds to sweep: pass e.g. kinds=['resid_pre', 'attn.out']")
    return list(dict.fromkeys(kinds))


def site_of(kind: str) -> str:
    """The site kind a sweep patches (``attn.z_by_pos`` -> ``attn.z``)."""
    return "attn.z" if kind.startswith("attn.z") else kind


# ---------------------------------------------------------------------- experiments
@dataclass(frozen=True)
class Experiment:
    """One patched run: ``kind`` at ``layer``, from position ``start`` (one position, or every
    position when ``all_positions``), on ``head`` for per-head sweeps; ``cell`` indexes the result."""

    kind: str
    cell: tuple[int, ...]
    layer: int
    start: int
    head: int | None = None
    all_positions: bool = False


def plan(kinds: Iterable[str], n_layers: int, n_heads: int, seq: int) -> list[Experiment]:
    """Every experiment of the sweeps ``kinds``.

    >>> len(plan(["resid_pre", "attn.z"], n_layers=2, n_heads=4, seq=3))
    14
    """
    out = []
    for kind in kinds:
        for layer in range(n_layers):
            if kind in POSITION_SITES:
                out += [Experiment(kind, (layer, p), layer, p) for p in range(seq)]
            elif kind == "attn.z":
                out += [Experiment(kind, (layer, h), layer, 0, h, True) for h in range(n_heads)]
            else:
                out += [Experiment(kind, (layer, h, p), layer, p, h) for h in range(n_heads) for p in range(seq)]
    return out


def row_bytes(model: Gemma3, tokens: int, keys: int, n_logits: int) -> int:
    """Estimated peak bytes one row of a patching batch needs (``tokens`` computed, ``keys`` attended)."""
    c = model.cfg
    elem = torch.empty((), dtype=model.dtype).element_size()
    per_token = (14 * c.d_model + 4 * c.d_mlp + 6 * c.n_heads * c.d_head + 8 * c.n_kv_heads * c.d_head
                 + 2 * c.n_heads * keys)
    return elem * tokens * per_token + 4 * 3 * n_logits * c.vocab_size


def default_max_bytes(model: Gemma3) -> int:
    """Half the memory free on the model's device (2 GiB when unknown)."""
    free = available_memory(model.device)
    return free // 2 if free else 2 << 30


def effective(pair: PromptPair, e: Experiment) -> Experiment | None:
    """``e`` with its first position where the patch changes anything, or None when it changes
    nothing the metric reads: a patch after the last metric position, or of a clean value equal
    to the corrupt one (every site before the first token where the prompts differ). Positions
    where the values are equal need no patch, so an all-position patch starts at the first
    position that differs (and reuses the prefix before it)."""
    last = pair.needed[-1]
    if e.start > last:
        return None
    name = block_site(e.layer, site_of(e.kind))
    clean, corrupt = pair.clean_cache[name][0], pair.corrupt_cache[name][0]
    if e.all_positions:
        differs = (clean[:last + 1, e.head] != corrupt[:last + 1, e.head]).flatten(1).any(-1)
        if not bool(differs.any()):
            return None
        first = int(differs.to(torch.uint8).argmax())
        return e if first == e.start else replace(e, start=first)
    if e.head is not None:
        return None if torch.equal(clean[e.start, e.head], corrupt[e.start, e.head]) else e
    return None if torch.equal(clean[e.start], corrupt[e.start]) else e


# One pass of a group over the layers reads every weight once, whatever its batch: merging the
# group of a later start into an earlier one saves that read and costs (gap x rows) extra token
# rows of compute (positions the later group would have taken from the prefix). Worth it below
# about 2 x FLOP/s / memory bandwidth token rows on a CPU; on an accelerator the per-call overhead
# dominates small groups, so merge much more. Exactness does not depend on it.
MERGE_TOKEN_ROWS = {"cpu": 16, "other": 1024}


def merge_starts(groups: dict[int, list[Experiment]], token_rows: int) -> dict[int, list[Experiment]]:
    """Merge the experiment groups of nearby starts, latest first, while the extra token rows a
    merge computes (``gap x rows`` of the later group) stay under ``token_rows``.

    >>> g = {5: ["a", "b"], 6: ["c"], 7: ["d"]}
    >>> merge_starts(g, 3), merge_starts(g, 0)
    ({5: ['a', 'b', 'c', 'd']}, {5: ['a', 'b'], 6: ['c'], 7: ['d']})
    """
    out: dict[int, list[Experiment]] = {}
    current: int | None = None
    for start in sorted(groups, reverse=True):
        if current is not None and (current - start) * len(out[current]) < token_rows:
            out[start] = groups[start] + out.pop(current)
        else:
            out[start] = list(groups[start])
        current = start
    return dict(sorted(out.items()))


__all__ = ["POSITION_SITES", "SWEEPS", "Experiment", "plan", "effective", "merge_starts", "site_of", "check_kinds",
           "row_bytes", "default_max_bytes", "MERGE_TOKEN_ROWS"]

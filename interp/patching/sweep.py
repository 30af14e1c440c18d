"""Running a patching sweep: experiments grouped by start position, each group one wavefront.

See :mod:`interp.patching` for what a sweep measures and why this is fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..hooks import NonFiniteError, Site, partial_run
from ..metrics import Metric
from ..model import Gemma3, KVCache
from ..model.sites import block_site
from ..progress import progress_bar
from .experiments import (
    MERGE_TOKEN_ROWS,
    POSITION_SITES,
    SWEEPS,
    Experiment,
    check_kinds,
    default_max_bytes,
    effective,
    merge_starts,
    plan,
    row_bytes,
    site_of,
)
from .pair import PromptPair, make_result, prepare_pair
from .result import PatchingResult


class _RowPatch:
    """A hook that writes clean values into some rows of a batch: row ``rows[i]`` at local
    position ``local[i]`` (every position when ``local`` is None), on head ``heads[i]`` if given."""

    def __init__(self, rows: torch.Tensor, local: torch.Tensor | None, heads: torch.Tensor | None,
                 values: torch.Tensor):
        self.rows, self.local, self.heads, self.values = rows, local, heads, values

    def __call__(self, x: torch.Tensor, site: Site) -> torch.Tensor:
        x = x.clone()
        v = self.values.to(x.dtype)
        if self.heads is None:
            x[self.rows, self.local] = v
        elif self.local is None:
            x[self.rows, :, self.heads] = v
        else:
            x[self.rows, self.local, self.heads] = v
        return x


def _patch_hooks(pair: PromptPair, layer: int, start: int, end: int,
                 joining: list[tuple[int, Experiment]]) -> list[tuple[str, _RowPatch]]:
    """Hooks on ``blocks.{layer}.*`` that patch each joining row (index, experiment) at its site."""
    by_site: dict[tuple[str, bool], list[tuple[int, Experiment]]] = {}
    for row, e in joining:
        by_site.setdefault((site_of(e.kind), e.all_positions), []).append((row, e))
    hooks = []
    for (site, every), items in by_site.items():
        name = block_site(layer, site)
        clean = pair.clean_cache[name][0]  # [seq, d] or [seq, heads, hd]
        dev = clean.device
        rows = torch.tensor([r for r, _ in items], device=dev)
        local = torch.tensor([e.start - start for _, e in items], device=dev)
        starts = torch.tensor([e.start for _, e in items], device=dev)
        if site != "attn.z":
            hooks.append((name, _RowPatch(rows, local, None, clean[starts])))  # values [m, d]
            continue
        heads = torch.tensor([e.head for _, e in items], device=dev)
        if every:
            hooks.append((name, _RowPatch(rows, None, heads, clean[start:end][:, heads].transpose(0, 1))))
        else:
            hooks.append((name, _RowPatch(rows, local, heads, clean[starts, heads])))
    return hooks


def run_wavefront(model: Gemma3, pair: PromptPair, start: int, experiments: Sequence[Experiment]) -> torch.Tensor:
    """Raw metric values ``[len(experiments)]`` of experiments that all leave positions before
    ``start`` untouched, in one layer-by-layer pass (see :mod:`interp.patching`).

    ``experiments`` must be sorted by layer; row ``i`` of the batch is experiment ``i``.
    """
    n_layers = model.cfg.n_layers
    end = pair.needed[-1] + 1
    rs = pair.corrupt_cache
    h: torch.Tensor | None = None
    rows, i = 0, 0
    with partial_run():  # one layer at a time: hooks of enclosing scopes fire in the layer that has them
        for layer in range(experiments[0].layer, n_layers):
            joining: list[tuple[int, Experiment]] = []
            while i < len(experiments) and experiments[i].layer == layer:
                joining.append((rows + len(joining), experiments[i]))
                i += 1
            prefix = KVCache.from_cache(rs, start, model.cfg, layers=[layer]) if start > 0 else None
            hooks = _patch_hooks(pair, layer, start, end, joining) if joining else []
            if joining and layer > 0:
                new = rs[block_site(layer, "resid_pre")][:, start:end].expand(len(joining), -1, -1)
                h = new if h is None else torch.cat((h, new), dim=0)
            rows += len(joining)
            with model.hooks(hooks):
                if layer == 0:  # the residual entering layer 0 is the embedding: run from tokens
                    ids = pair.corrupt_ids[:, start:end].expand(rows, -1)
                    h = model(ids, stop_at_layer=1, kv_cache=prefix)
                else:
                    h = model(h, start_at_layer=layer, stop_at_layer=layer + 1, kv_cache=prefix)
        assert h is not None
        computed = [q - start for q in pair.needed if q >= start]
        if pair.vocab_selected:
            logits = model.unembed(h[:, computed], pair.metric.token_ids)
        else:
            logits = model(h, start_at_layer=n_layers, logits_at=computed)
    before = [j for j, q in enumerate(pair.needed) if q < start]
    if before:  # positions before the patch keep their corrupt logits
        logits = torch.cat((pair.corrupt_logits[:, before].expand(rows, -1, -1).to(logits.dtype), logits), dim=1)
    return pair.metric.from_selected(logits, pair.seq, vocab_selected=pair.vocab_selected)


def _sweep(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable, kinds: list[str],
           batch_size: int | None, max_bytes: int | None, progress: bool) -> dict[str, PatchingResult]:
    cfg = model.cfg
    clean_names = sorted({block_site("*", site_of(k)) for k in kinds})
    corrupt_names = sorted(set(clean_names) | {"blocks.*.resid_pre", "blocks.*.attn.k_rot", "blocks.*.attn.v"})
    pair = prepare_pair(model, clean, corrupt, metric, clean_names, corrupt_names)
    seq, last = pair.seq, pair.needed[-1]
    raw = {k: torch.full(tuple({"layer": cfg.n_layers, "head": cfg.n_heads, "pos": seq}[a] for a in SWEEPS[k]),
                         float("nan")) for k in kinds}
    groups: dict[int, list[Experiment]] = {}
    skipped = {k: 0 for k in kinds}
    for e in plan(kinds, cfg.n_layers, cfg.n_heads, seq):
        run = effective(pair, e)
        if run is None:  # changes nothing the metric reads: the corrupt run's value, exactly
            raw[e.kind][e.cell] = pair.corrupt_value
            skipped[e.kind] += 1
        else:
            groups.setdefault(run.start, []).append(run)
    limit = max_bytes if max_bytes is not None else default_max_bytes(model)
    order = {k: i for i, k in enumerate(POSITION_SITES + ("attn.z", "attn.z_by_pos"))}
    bar = progress_bar(sum(len(g) for g in groups.values()) + sum(skipped.values()),
                       "patching " + ", ".join(kinds), "exp", progress)
    bar.update(sum(skipped.values()))
    try:
        with torch.no_grad():
            merged = merge_starts(groups, MERGE_TOKEN_ROWS.get(model.device.type, MERGE_TOKEN_ROWS["other"]))
            for start in sorted(merged):
                exps = sorted(merged[start], key=lambda e: (e.layer, order[e.kind], e.head or 0))
                cap = max(1, limit // row_bytes(model, last + 1 - start, last + 1, len(pair.needed)))
                if batch_size is not None:
                    cap = min(cap, batch_size)
                for j in range(0, len(exps), cap):
                    chunk = exps[j:j + cap]
                    values = run_wavefront(model, pair, start, chunk).float().cpu()
                    for e, v in zip(chunk, values):
                        if not bool(torch.isfinite(v)):
                            raise NonFiniteError(
                                f"patching {e.kind} at layer {e.layer}" + (f", head {e.head}" if e.head is not None
                                                                           else "") + f", from position {e.start} "
                                f"gave a non-finite metric ({float(v)}) although both runs were finite; a hook "
                                "active during the sweep, or the metric, produced it")
                        raw[e.kind][e.cell] = v
                    bar.update(len(chunk))
    finally:
        bar.close()
    return {k: make_result(pair, k, raw[k], "activation patching", skipped[k]) for k in kinds}


def patch_sweep(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable, kind: str = "resid_pre", *,
                batch_size: int | None = None, max_bytes: int | None = None, progress: bool = True) -> PatchingResult:
    """Activation patching (clean into corrupt) of one sweep over every layer and position or head.

    ``clean``/``corrupt`` are texts or token ids of the same length; ``metric`` a
    :class:`~interp.metrics.Metric` (``logit_diff``, ``prob``, ``kl``; targets as text or ids)
    or a callable on full logits. ``kind`` is the sweep (see :mod:`interp.patching`);
    :func:`patch_sweeps` runs several in the same batches. ``batch_size`` caps the rows of one
    batch; ``max_bytes`` caps its estimated memory (default: half the free memory).
    ``progress`` shows a progress bar.

    >>> r = patch_sweep(model, "The capital of France is", "The capital of Italy is",
    ...                 logit_diff(" Paris", " Rome"))  # doctest: +SKIP
    >>> r.plot()  # doctest: +SKIP
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind= takes one sweep; for several use patch_sweeps(..., kinds={kind!r})")
    kinds = check_kinds(kind)
    return _sweep(model, clean, corrupt, metric, kinds, batch_size, max_bytes, progress)[kinds[0]]


def patch_sweeps(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable,
                 kinds: Sequence[str] = ("resid_pre", "attn.out", "mlp.out"), *, batch_size: int | None = None,
                 max_bytes: int | None = None, progress: bool = True) -> dict[str, PatchingResult]:
    """:func:`patch_sweep` of several sweeps at once (computed in the same batches):
    ``{kind: PatchingResult}``.

    >>> rs = patch_sweeps(model, clean, corrupt, logit_diff(" Paris", " Rome"),
    ...                   ["resid_pre", "attn.z"])  # doctest: +SKIP
    >>> rs["attn.z"].plot()  # doctest: +SKIP
    """
    if isinstance(kinds, str):
        raise TypeError(f"kinds= takes a list of sweeps; for one use patch_sweep(..., kind={kinds!r})")
    return _sweep(model, clean, corrupt, metric, check_kinds(kinds), batch_size, max_bytes, progress)


__all__ = ["patch_sweep", "patch_sweeps", "run_wavefront"]

"""Harvesting activations from a corpus to disk: sharded, resumable, on one process or many.

``harvest(model, corpus, names, out_dir)`` tokenizes the corpus into rows, runs the model over
them in batches (only up to the last harvested layer; no logits unless asked), and writes the
activations as safetensors shards (256 MiB by default). Writing happens in a background
thread, so the disk never stalls the forward passes. Safe to kill at any moment:

- ``plan.json`` (the settings) and ``rows.safetensors`` (the token ids of every row, and where
  each token came from) are written first; each shard goes to a temporary name and is renamed
  when complete; ``manifest.json`` is written last. A half-written file is never read as data.
- Rerunning the same command resumes: finished shards are kept, the rest are computed. The
  result is identical, shard for shard, to an uninterrupted run. A rerun with other settings
  (model, sites, corpus, context, dtype, ...) into the same directory is refused.

Many processes: under ``torchrun`` (or with ``torch.distributed`` initialised) each rank writes
the shards ``k`` with ``k % world_size == rank``; rank 0 writes the manifest once every rank is
done. The store is the same as a single process's.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..hooks import NameSpec, positions_mask
from ..hooks.checks import is_int
from ..model import Gemma3
from ..model.memory import format_bytes
from ..model.sites import kind_of
from ..progress import progress_bar
from .corpus import PAD_DOC, Corpus, Rows
from .distributed import Group
from .store import DTYPES, FORMAT, MANIFEST, PLAN, ROWS, ActivationStore, shard_name

SHARD_BYTES = 256 << 20
"""Default shard size in bytes (all sites together): rows per shard = SHARD_BYTES // bytes per row."""


class HarvestError(ValueError):
    """A harvest that cannot start: other settings in the directory, not enough disk, bad sites."""


def model_fingerprint(model: Gemma3) -> str:
    """A sha256 of the configuration and a sample of every weight (cheap; tells two models apart)."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _sites(model: Gemma3, names: NameSpec) -> tuple[list[str], int | None]:
    """Harvestable sites and the layer the run can stop before (None: it needs the logits)."""
    sites = model.registry.resolve(names)
    per_pair = [s for s in sites if kind_of(s).seq_axis != 1]
    if per_pair:
        raise HarvestError(f"{per_pair[:3]} hold one value per pair of tokens; a harvest stores per-token "
                           "activations (cache patterns with run_with_cache instead)")
    layers = [model.registry.names.layer_of[s] for s in sites]
    if any(s in ("final_norm", "logits") for s in sites):
        return sites, None
    return sites, max((x for x in layers if x is not None), default=-1) + 1


def _dims(model: Gemma3, site: str) -> list[int]:
    return list(model.site_shape(site, 1, 1)[2:])


def harvest(model: Gemma3, corpus: Corpus | Any, names: NameSpec, out_dir: str | os.PathLike, *,
            context: int = 128, batch_size: int = 8, dtype: torch.dtype = torch.bfloat16, positions: Any = None,
            max_tokens: int | None = None, pack: bool = True, shard_tokens: int | None = None,
            model_source: str | None = None, progress: bool = True) -> ActivationStore:
    """Run ``model`` over ``corpus`` and store the activations of ``names`` in ``out_dir``.

    ``corpus`` is a :class:`~interp.data.corpus.Corpus` or anything it takes (texts, a path).
    Rows hold ``context`` tokens (see the corpus's ``pack``); ``positions`` (the position rule
    of :mod:`interp.hooks.positions`, e.g. ``-1`` or ``slice(1, None)``) harvests only those
    positions of each row; ``max_tokens`` stops after that many tokens. Activations are stored in
    ``dtype`` (bfloat16 by default: half the disk of float32). The free disk space is checked
    against an estimate first. ``model_source`` (default: ``model.source``, what
    :meth:`~interp.model.Gemma3.from_pretrained` loaded, e.g. ``"demo"``) is recorded so that
    ``store.texts`` finds the tokenizer again. Returns the :class:`~interp.data.store.ActivationStore`.

    A shard holds ``shard_tokens`` tokens' rows, by default as many rows as fit in
    :data:`SHARD_BYTES` (256 MiB), or, when ``out_dir`` already holds this harvest, the shard size
    it was started with. Memory stays bounded whatever the corpus size: each shard is
    filled in place in one preallocated buffer per site, at most two finished shards wait for
    the writer, and freed memory goes back to the system after each write (about three shards,
    plus the model's own working memory).

    >>> store = interp.harvest(m, interp.data.stdlib_corpus(max_docs=200), "blocks.*.resid_post",
    ...                        "harvest/", context=64, max_tokens=20_000)          # doctest: +SKIP
    """
    if dtype not in DTYPES.values():
        raise HarvestError(f"dtype {dtype} cannot be stored; use torch.bfloat16, float16 or float32")
    if not isinstance(corpus, Corpus):
        corpus = Corpus(corpus)
    if model.tokenizer is None:
        raise HarvestError("harvesting text needs the model's tokenizer")
    for name, value in (("batch_size", batch_size), ("shard_tokens", shard_tokens)):
        if name == "shard_tokens" and value is None:
            continue
        if not is_int(value) or value < 1:
            raise HarvestError(f"{name} must be a positive int, got {value!r}")
    sites, stop = _sites(model, names)
    group = Group.current(model.device)
    out = Path(out_dir)
    rows = corpus.rows(model.tokenizer, context, pack=pack, bos_id=model.cfg.bos_token_id,
                       pad_id=model.cfg.pad_token_id, max_tokens=max_tokens)
    keep = positions_mask(positions, context) if positions is not None else torch.ones(context, dtype=torch.bool)
    kept = keep.nonzero().flatten().tolist()
    if not kept:
        raise HarvestError(f"positions={positions!r} selects no position of a {context}-token row")
    dims = {s: _dims(model, s) for s in sites}
    per_row = len(kept) * sum(torch.Size(dims[s]).numel() for s in sites) * dtype.itemsize
    if shard_tokens is not None:
        shard_rows = max(1, shard_tokens // context)
    else:  # the shard size is a storage detail: a harvest already in out_dir keeps its own
        shard_rows = _planned_shard_rows(out) or max(1, SHARD_BYTES // per_row)
    plan: dict[str, Any] = {
        "format": FORMAT,
        "model": {"fingerprint": model_fingerprint(model), "config": model.cfg.to_dict(),
                  "source": model_source or model.source or "", "dtype": str(model.dtype).removeprefix("torch.")},
        "sites": {s: {"dims": _dims(model, s)} for s in sites},
        "dtype": str(dtype).removeprefix("torch."), "context": context, "positions": kept, "pack": pack,
        "max_tokens": max_tokens, "shard_rows": shard_rows, "n_rows": rows.n_rows,
        "corpus": corpus.describe(), "n_docs": rows.n_docs,
    }
    n_shards = -(-rows.n_rows // shard_rows)
    if group.rank == 0:
        _prepare(out, plan, rows, per_row * rows.n_rows)
    group.barrier()
    mine = [k for k in range(n_shards) if k % group.world == group.rank]
    todo = [k for k in mine if not (out / shard_name(k)).is_file()]
    if progress and len(todo) < len(mine):
        kept_shards = len(mine) - len(todo)
        state = "already complete; nothing to do" if not todo else f"resuming after {kept_shards} whole shards"
        print(f"harvest: {out} holds {kept_shards} of {len(mine)} shards: {state}", file=sys.stderr)
    writer = _Writer(out)
    bar = progress_bar(sum(_shard_tokens(rows, k, shard_rows, kept) for k in todo), "harvest", "tok",
                       progress and bool(todo), unit_scale=True)
    try:
        with torch.no_grad():
            for k in todo:
                lo, hi = k * shard_rows, min((k + 1) * shard_rows, rows.n_rows)
                bufs = {s: torch.empty(hi - lo, len(kept), *dims[s], dtype=dtype) for s in sites}
                for a in range(lo, hi, batch_size):
                    b = min(a + batch_size, hi)
                    ids = rows.ids[a:b]
                    mask = rows.mask[a:b]
                    kwargs: dict[str, Any] = {"stop_at_layer": stop} if stop is not None else {}
                    _, cache = model.run_with_cache(
                        ids, sites, positions=kept, dtype=dtype, device="cpu", max_bytes=1 << 62,
                        attention_mask=None if bool(mask.all()) else mask, **kwargs)
                    for s in sites:
                        bufs[s][a - lo:b - lo] = cache[s]
                    del cache
                    bar.update(int(rows.mask[a:b][:, kept].sum()))
                writer.submit(k, bufs)
                del bufs
            writer.close()
    finally:
        writer.close(wait=False)
        bar.close()
    group.barrier()
    if group.rank == 0:
        _write_manifest(out, plan, n_shards, rows, kept)
    group.barrier()
    return ActivationStore(out)


def _planned_shard_rows(out: Path) -> int | None:
    """The shard size of the harvest plan already in ``out``, if there is a readable one (a rerun
    that leaves ``shard_tokens`` unset resumes or returns it whatever today's default)."""
    try:
        rows = json.loads((out / PLAN).read_text(encoding="utf-8")).get("shard_rows")
    except (OSError, ValueError, AttributeError):
        return None  # no plan, or a damaged one: _prepare says which
    return rows if isinstance(rows, int) and not isinstance(rows, bool) and rows >= 1 else None


def _shard_tokens(rows: Rows, k: int, shard_rows: int, kept: list[int]) -> int:
    lo, hi = k * shard_rows, min((k + 1) * shard_rows, rows.n_rows)
    return int((rows.doc[lo:hi][:, kept] != PAD_DOC).sum())


def _prepare(out: Path, plan: dict[str, Any], rows: Rows, need: int) -> None:
    """Check the directory (empty, or a harvest with the same plan) and the disk; write the plan
    and the rows when they are not there yet."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    existing = out / PLAN
    if existing.is_file():
        try:
            old = json.loads(existing.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise HarvestError(f"{existing} is damaged; delete {out} to start again") from None
        new = json.loads(json.dumps(plan))
        for p in (old, new):  # where the weights came from is not a setting (the fingerprint checks the weights)
            p.get("model", {}).pop("source", None)
        if old != new:
            diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            raise HarvestError(f"{out} holds a harvest with other settings ({', '.join(diffs)} differ); rerun with "
                               "the same settings to resume it, or choose another directory")
    else:
        # rows.safetensors alone: a run killed between writing the rows and the plan; start afresh
        stray = [p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != ROWS]
        if stray:
            raise HarvestError(f"{out} is not empty ({stray[:3]}...) and holds no harvest plan; choose an empty "
                               "or new directory")
    done = sum(p.stat().st_size for p in out.glob("shard_*.safetensors"))
    free = shutil.disk_usage(out).free
    if need - done > free:
        raise HarvestError(f"the harvest needs about {format_bytes(need)} ({format_bytes(need - done)} still to "
                           f"write) but {out} has {format_bytes(free)} free; harvest fewer sites or tokens "
                           "(max_tokens=, positions=) or store in bfloat16")
    for tmp in out.glob(".*.tmp-*"):  # left by a killed run: never read, removed
        tmp.unlink(missing_ok=True)
    if not existing.is_file():
        atomic_write(out / ROWS, lambda p: save_file({"ids": rows.ids, "doc": rows.doc, "pos": rows.pos}, str(p),
                                                 metadata={"format": FORMAT}))
        atomic_write(existing, lambda p: p.write_text(json.dumps(plan, indent=1), encoding="utf-8"))


def _write_manifest(out: Path, plan: dict[str, Any], n_shards: int, rows: Rows, kept: list[int]) -> None:
    shards = []
    for k in range(n_shards):
        path = out / shard_name(k)
        if not path.is_file():
            raise HarvestError(f"{path.name} was not written (a rank failed?); rerun the same command to finish")
        shards.append({"file": path.name, "bytes": path.stat().st_size})
    manifest = dict(plan, shards=shards, n_tokens=int((rows.doc[:, kept] != PAD_DOC).sum()))
    atomic_write(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1), encoding="utf-8"))


def _give_back_memory() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim), so a long harvest's resident
    memory follows what it holds, not what it once held; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Writer:
    """Writes shards in a background thread, at most two queued (memory stays bounded)."""

    def __init__(self, out: Path):
        self.out = out
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harvest-writer")
        self.pending: list[Future] = []

    def submit(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        while len(self.pending) >= 2:
            self.pending.pop(0).result()
        meta = {"format": FORMAT}  # one key: safetensors writes several in no fixed order (shards byte-stable)

        def write() -> None:
            atomic_write(self.out / shard_name(k), lambda p: save_file(tensors, str(p), metadata=meta))
            tensors.clear()
            _give_back_memory()

        self.pending.append(self.pool.submit(write))

    def close(self, wait: bool = True) -> None:
        if wait:
            for f in self.pending:
                f.result()
        self.pending = []
        self.pool.shutdown(wait=wait)


__all__ = ["harvest", "HarvestError", "model_fingerprint", "SHARD_BYTES"]

"""Reading a harvest back: memory-mapped shards, lazy views per site, shuffled training batches,
and the text of any row.

A harvest directory holds ``manifest.json`` (written last), ``rows.safetensors`` (the token ids
of every row and where each token came from) and ``shard_NNNNN.safetensors`` files, each holding
``[rows, positions, *site dims]`` per site. Nothing is read into memory until it is asked for.

>>> store = ActivationStore("harvest/")                                  # doctest: +SKIP
>>> store["blocks.6.resid_post"].shape                                   # doctest: +SKIP
(1024, 128, 640)
>>> for x in store.batches("blocks.6.resid_post", 4096, seed=0):         # doctest: +SKIP
...     ...                                                               # [4096, 640] each
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .corpus import PAD_DOC

MANIFEST, ROWS, PLAN = "manifest.json", "rows.safetensors", "plan.json"
FORMAT = "interp-harvest-1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class StoreError(ValueError):
    """A harvest directory that is incomplete, damaged or does not match its manifest."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _open(path: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise StoreError(f"{path} is not a readable shard ({e}); it may be truncated: rerun the harvest to rewrite "
                         "it (delete the file first)") from None


class SiteView:
    """One site of a store, read lazily: ``view[rows]`` (an int, slice or list of rows) reads only
    the shards that hold them. ``shape`` is ``(rows, positions, *dims)``, ``dtype`` the stored one."""

    def __init__(self, store: ActivationStore, site: str):
        self.store, self.site = store, site
        info = store.manifest["sites"][site]
        self.shape = (store.n_rows, len(store.positions), *info["dims"])
        self.dtype: torch.dtype = store.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SiteView({self.site!r}, shape={self.shape}, dtype={self.store.dtype})"

    def __getitem__(self, rows: int | slice | Sequence[int]) -> torch.Tensor:
        if isinstance(rows, int):
            return self[[rows]][0]
        idx = list(range(self.shape[0]))[rows] if isinstance(rows, slice) else [int(r) for r in rows]
        bad = [r for r in idx if not -self.shape[0] <= r < self.shape[0]]
        if bad:
            raise IndexError(f"row {bad[0]} is outside the store's {self.shape[0]} rows")
        idx = [r % self.shape[0] for r in idx]
        out = torch.empty(len(idx), *self.shape[1:], dtype=self.store.dtype)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for i, r in enumerate(idx):
            by_shard.setdefault(r // self.store.shard_rows, []).append((i, r))
        for shard, items in by_shard.items():
            start = shard * self.store.shard_rows
            lo, hi = min(r for _, r in items) - start, max(r for _, r in items) - start + 1
            block = self.store.shard_slice(shard, self.site, lo, hi)
            for i, r in items:
                out[i] = block[r - start - lo]
        return out


class ActivationStore:
    """A finished harvest, opened memory-mapped. Opening checks that the manifest and every shard
    agree (names, shapes, dtypes, row counts) and raises :class:`StoreError` naming what does not."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            partial = (self.path / PLAN).is_file()
            raise StoreError(f"no {MANIFEST} in {self.path}: " + (
                "the harvest has not finished; rerun the same command to resume it" if partial
                else "not a harvest directory"))
        try:
            self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{manifest} is not valid JSON ({e})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest} is not a harvest manifest (format {FORMAT!r})")
        m = self.manifest
        self.sites: list[str] = list(m["sites"])
        self.dtype = DTYPES[m["dtype"]]
        self.n_rows: int = m["n_rows"]
        self.shard_rows: int = m["shard_rows"]
        self.context: int = m["context"]
        self.positions: list[int] = m["positions"]
        self._handles: dict[int, Any] = {}
        self._check()
        with _open(self.path / ROWS) as f:
            self.ids, self.doc, self.pos = f.get_tensor("ids"), f.get_tensor("doc"), f.get_tensor("pos")
        if tuple(self.ids.shape) != (self.n_rows, self.context):
            raise StoreError(f"{ROWS} holds {tuple(self.ids.shape)} token ids; the manifest says "
                             f"{(self.n_rows, self.context)}")

    def _check(self) -> None:
        n_shards = -(-self.n_rows // self.shard_rows)
        if len(self.manifest["shards"]) != n_shards:
            raise StoreError(f"the manifest lists {len(self.manifest['shards'])} shards; {self.n_rows} rows in shards "
                             f"of {self.shard_rows} need {n_shards}")
        for k in range(n_shards):
            path = self.path / shard_name(k)
            if not path.is_file():
                raise StoreError(f"{path.name} is missing from {self.path}")
            size = self.manifest["shards"][k]["bytes"]
            if path.stat().st_size != size:
                raise StoreError(f"{path.name} has {path.stat().st_size} bytes; the manifest says {size} (truncated or "
                                 "rewritten): the store does not match its manifest")
            rows = min(self.shard_rows, self.n_rows - k * self.shard_rows)
            with _open(path) as f:
                keys = set(f.keys())
                for site in self.sites:
                    if site not in keys:
                        raise StoreError(f"{path.name} has no {site!r}")
                    shape = tuple(f.get_slice(site).get_shape())
                    want = (rows, len(self.positions), *self.manifest["sites"][site]["dims"])
                    if shape != want:
                        raise StoreError(f"{path.name}: {site} is {shape}, the manifest says {want}")

    # ------------------------------------------------------------------ reading
    def __getitem__(self, site: str) -> SiteView:
        if site not in self.manifest["sites"]:
            raise KeyError(f"{site!r} was not harvested; this store has {self.sites}")
        return SiteView(self, site)

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}: {len(self.sites)} sites, {self.n_rows} rows x "
                f"{len(self.positions)} positions, {self.manifest['n_tokens']} tokens, {self.manifest['dtype']})")

    def shard_slice(self, shard: int, site: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` of one shard's tensor for ``site`` (read from the memory map)."""
        if shard not in self._handles:
            self._handles[shard] = _open(self.path / shard_name(shard))
        return self._handles[shard].get_slice(site)[lo:hi]

    def valid(self, rows: slice | None = None) -> torch.Tensor:
        """Bool ``[rows, positions]``: True where the harvested position holds a token (not padding)."""
        doc = self.doc[rows if rows is not None else slice(None)]
        return doc[:, self.positions] != PAD_DOC

    def batches(self, site: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                buffer_shards: int = 4) -> Iterator[torch.Tensor]:
        """Training batches ``[batch_size, *dims]`` of ``site``, one vector per harvested token
        (padding left out), read ``buffer_shards`` shards at a time: shards in a seeded random
        order, vectors shuffled within the buffer. A fixed ``seed`` gives a fixed order; the last
        batch may be smaller. Memory stays at the buffer, whatever the store's size."""
        view = self[site]
        n_shards = -(-self.n_rows // self.shard_rows)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n_shards, generator=gen).tolist() if shuffle else list(range(n_shards))
        carry: torch.Tensor | None = None
        for i in range(0, n_shards, max(1, buffer_shards)):
            parts = []
            for shard in order[i:i + buffer_shards]:
                start = shard * self.shard_rows
                stop = min(start + self.shard_rows, self.n_rows)
                block = self.shard_slice(shard, site, 0, stop - start)
                parts.append(block[self.valid(slice(start, stop))])  # [tokens, *dims]
            buf = torch.cat(([carry] if carry is not None else []) + parts)
            if shuffle:
                buf = buf[torch.randperm(buf.shape[0], generator=gen)]
            full = buf.shape[0] // batch_size * batch_size
            for j in range(0, full, batch_size):
                yield buf[j:j + batch_size].to(device=device, dtype=dtype or self.dtype)
            carry = buf[full:]
        del view
        if carry is not None and carry.shape[0]:
            yield carry.to(device=device, dtype=dtype or self.dtype)

    def texts(self, rows: int | Sequence[int], tokenizer: Any = None) -> list[str]:
        """The text of each row (the model's tokenizer by default, when the manifest names a
        local model or ``"demo"``)."""
        tok = tokenizer or self._tokenizer()
        rows = [rows] if isinstance(rows, int) else list(rows)
        return [tok.decode(self.ids[r][self.doc[r] != PAD_DOC].tolist()) for r in rows]

    def token_strings(self, row: int, tokenizer: Any = None) -> list[str]:
        """The tokens of one row as strings (padding left out)."""
        tok = tokenizer or self._tokenizer()
        return list(tok.to_str_tokens(self.ids[row][self.doc[row] != PAD_DOC].tolist()))

    def _tokenizer(self) -> Any:
        from ..model.tokenizer import Tokenizer

        source = self.manifest["model"]["source"]
        if source == "demo":
            from ..model.demo import demo_dir

            return Tokenizer.from_file(demo_dir())
        if source and Path(source).is_dir() and (Path(source) / "tokenizer.model").is_file():
            return Tokenizer.from_file(source)
        raise StoreError(f"the store's model {source!r} is not a local directory with a tokenizer.model; pass "
                         "tokenizer=model.tokenizer")


__all__ = ["ActivationStore", "SiteView", "StoreError", "shard_name", "MANIFEST", "ROWS", "PLAN", "FORMAT"]

"""Training data for :func:`interp.features.training.train`: a store (one site, or a transcoder's two
sites read in step) or tensors, shuffled per epoch by generators seeded from ``(seed, purpose, epoch)``."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from typing import Any

import torch

from ..hooks import NonFiniteError
from .clt_files import SITE_IN, SITE_OUT


class TrainingError(ValueError):
    """Training that cannot start: bad arguments, a source of the wrong shape, or a checkpoint
    written with other settings."""


# ---------------------------------------------------------------------- randomness
def derived_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed for one purpose (``"init"``, ``("data", epoch)``), derived from ``seed``."""
    h = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def seeded_generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, *parts))


# ---------------------------------------------------------------------- sources
def _where_non_finite(x: torch.Tensor, what: str) -> str:
    bad = ~torch.isfinite(x)
    first = bad.nonzero()[0].tolist()
    value = x[tuple(first)].item()
    at = f"row {first[0]}" + (f", column {first[1]}" if len(first) > 1 else "")
    return f"{what} holds {value} at {at} ({int(bad.sum())} non-finite values in all)"


class Source:
    """Full training batches ``(x, y)`` (``y`` None for an SAE), float32, on the device."""

    transcoder: bool
    d_in: int
    d_out: int
    n: int
    device: torch.device
    site: str | None = None
    site_out: str | None = None
    n_layers: int = 1  # a CLT's source: the layers it reads and writes

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def epoch(self, epoch: int, batch_size: int, seed: int, device: torch.device) -> Iterator[
            tuple[torch.Tensor, torch.Tensor | None]]:
        raise NotImplementedError


def _fingerprint(x: torch.Tensor) -> str:
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // (1 << 20))
    sample = flat[::step][: 1 << 20].to("cpu", torch.float64).numpy().tobytes()
    return hashlib.sha256(json.dumps([list(x.shape), str(x.dtype)]).encode() + sample).hexdigest()


class TensorSource(Source):
    def __init__(self, x: torch.Tensor, y: torch.Tensor | None):
        for name, t in (("x_in" if y is not None else "x", x), ("x_out", y)):
            if t is None:
                continue
            if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
                raise TrainingError(f"a tensor source must be [n, d] (n >= 1 vectors of width d >= 1); {name} has "
                                    f"shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TrainingError(f"{name} must hold floats, not {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(_where_non_finite(t, name))
        if y is not None and y.shape[0] != x.shape[0]:
            raise TrainingError(f"x_in has {x.shape[0]} rows and x_out {y.shape[0]}: a transcoder needs one output "
                                "row per input row")
        if y is not None and y.device != x.device:
            raise TrainingError(f"x_in is on {x.device} and x_out on {y.device}; put them on one device")
        self.x, self.y = x, y
        self.transcoder = y is not None
        self.n, self.d_in = x.shape
        self.d_out = y.shape[1] if y is not None else self.d_in
        self.device = x.device

    def describe(self) -> dict[str, Any]:
        out = {"type": "tensor", "x": _fingerprint(self.x), "shape": list(self.x.shape)}
        if self.y is not None:
            out.update(y=_fingerprint(self.y), shape_out=list(self.y.shape))
        return out

    def epoch(self, epoch, batch_size, seed, device):
        perm = torch.randperm(self.n, generator=seeded_generator(seed, "data", epoch)).to(self.x.device)
        for i in range(0, self.n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            x = self.x[idx].to(device=device, dtype=torch.float32)
            yield x, (None if self.y is None else self.y[idx].to(device=device, dtype=torch.float32))


class StoreSource(Source):
    def __init__(self, store: Any, sites: list[Any]):
        for s in sites:
            if not isinstance(s, str):
                raise TypeError(f"a site is a name like 'blocks.2.resid_post', got {s!r}")
            if s not in store.manifest["sites"]:
                raise TrainingError(f"{s!r} was not harvested; this store has {store.sites}")
        self.store, self.sites = store, sites
        self.transcoder = len(sites) == 2
        self.site = sites[0]
        self.site_out = sites[1] if self.transcoder else None
        dims = [math.prod(store.manifest["sites"][s]["dims"]) for s in sites]
        self.d_in, self.d_out = dims[0], dims[-1]
        self.n = int(store.manifest["n_tokens"])
        if self.n < 1:
            raise TrainingError(f"the store at {store.path} holds no tokens")
        self.device = torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        manifest = hashlib.sha256(json.dumps(self.store.manifest, sort_keys=True).encode()).hexdigest()
        return {"type": "store", "sites": self.sites, "manifest": manifest, "n_tokens": self.n}

    def epoch(self, epoch, batch_size, seed, device):
        s = derived_seed(seed, "data", epoch)
        streams = [self.store.batches(site, batch_size, shuffle=True, seed=s, dtype=torch.float32)
                   for site in self.sites]
        for b, parts in enumerate(zip(*streams)):
            if parts[0].shape[0] != batch_size:
                return  # the epoch's last, partial batch is not used
            out = []
            for site, t in zip(self.sites, parts):
                t = t.reshape(t.shape[0], -1)
                if not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(_where_non_finite(t, f"{site}: batch {b} of epoch {epoch} (of {batch_size} "
                                                              "shuffled vectors)") + "; the store holds NaN or inf")
                out.append(t.to(device))
            yield out[0], (out[1] if self.transcoder else None)


def make_source(source: Any) -> Source:
    from ..data import ActivationStore

    if isinstance(source, torch.Tensor):
        return TensorSource(source, None)
    if isinstance(source, (tuple, list)) and source and isinstance(source[0], ActivationStore):
        if len(source) not in (2, 3):
            raise TrainingError(f"a store source is (store, site) or (store, site_in, site_out); got {len(source)} "
                                "items")
        return StoreSource(source[0], list(source[1:]))
    if isinstance(source, (tuple, list)) and source and all(isinstance(t, torch.Tensor) for t in source):
        if len(source) != 2:
            raise TrainingError(f"a tensor pair is (x_in, x_out) for a transcoder; got {len(source)} tensors")
        return TensorSource(source[0], source[1])
    raise TypeError("source must be (ActivationStore, site), (ActivationStore, site_in, site_out), a tensor "
                    f"[n, d_in] or a pair of tensors (x_in, x_out); got {type(source).__name__}")


# ---------------------------------------------------------------------- cross-layer transcoders


class CLTSource(Source):
    """Every layer's MLP input and output, read in step: batches ``(x [B, L, d], y [B, L, d])``."""

    def _check_widths(self, d_in: list[int], d_out: list[int], names_in: list[str], names_out: list[str]) -> None:
        if len(set(d_in + d_out)) != 1:
            shown = ", ".join(f"{name} {d}" for name, d in zip(names_in + names_out, d_in + d_out))
            raise TrainingError(f"a CLT reads and writes one width at every layer; the widths differ: {shown}. Pass "
                                "every layer's MLP input and output of one model")
        self.d_in = self.d_out = d_in[0]


class CLTTensorSource(CLTSource):
    def __init__(self, xs: list[torch.Tensor], ys: list[torch.Tensor]):
        if len(xs) != len(ys) or not xs:
            raise TrainingError(f"a CLT's tensor source is (inputs, outputs), one tensor per layer in each list; got "
                                f"{len(xs)} inputs and {len(ys)} outputs")
        for name, t in [(f"inputs[{i}]", x) for i, x in enumerate(xs)] + [(f"outputs[{i}]", y) for i, y in
                                                                          enumerate(ys)]:
            if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
                raise TrainingError(f"a CLT's per-layer tensors must be [n, d_model]; {name} has shape "
                                    f"{tuple(t.shape)}")
            if not t.is_floating_point():
                raise TrainingError(f"{name} must hold floats, not {t.dtype}")
            if t.shape[0] != xs[0].shape[0]:
                raise TrainingError(f"{name} has {t.shape[0]} rows and inputs[0] {xs[0].shape[0]}: every layer needs "
                                    "one row per token")
            if t.device != xs[0].device:
                raise TrainingError(f"{name} is on {t.device} and inputs[0] on {xs[0].device}; put them on one device")
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(_where_non_finite(t, name))
        self._check_widths([x.shape[1] for x in xs], [y.shape[1] for y in ys],
                           [f"inputs[{i}]" for i in range(len(xs))], [f"outputs[{i}]" for i in range(len(ys))])
        self.xs, self.ys = list(xs), list(ys)
        self.transcoder = True
        self.n_layers, self.n = len(xs), xs[0].shape[0]
        self.device = xs[0].device
        self.site, self.site_out = SITE_IN, SITE_OUT

    def describe(self) -> dict[str, Any]:
        return {"type": "clt tensors", "inputs": [_fingerprint(x) for x in self.xs],
                "outputs": [_fingerprint(y) for y in self.ys], "shape": [self.n, self.n_layers, self.d_in]}

    def epoch(self, epoch, batch_size, seed, device):
        perm = torch.randperm(self.n, generator=seeded_generator(seed, "data", epoch)).to(self.device)
        for i in range(0, self.n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield (torch.stack([x[idx] for x in self.xs], 1).to(device=device, dtype=torch.float32),
                   torch.stack([y[idx] for y in self.ys], 1).to(device=device, dtype=torch.float32))


class CLTStoreSource(CLTSource):
    def __init__(self, store: Any):
        sites = store.manifest["sites"]
        layers = sorted({int(n.split(".")[1]) for n in sites if n.startswith("blocks.") and n.split(".")[1].isdigit()
                         and n.endswith((".pre_mlp_norm", ".post_mlp_norm"))})
        config_layers = store.manifest.get("model", {}).get("config", {}).get("n_layers")
        n = int(config_layers) if isinstance(config_layers, int) else (max(layers) + 1 if layers else 0)
        self.sites_in = [SITE_IN.format(layer=i) for i in range(n)]
        self.sites_out = [SITE_OUT.format(layer=i) for i in range(n)]
        missing = [s for s in self.sites_in + self.sites_out if s not in sites]
        if not n or missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise TrainingError(f"a CLT trains on every layer's MLP input and output; the store at {store.path} lacks "
                                f"{shown or 'them all'}: harvest 'blocks.*.pre_mlp_norm' and "
                                "'blocks.*.post_mlp_norm' for every layer")
        dims = {s: math.prod(sites[s]["dims"]) for s in self.sites_in + self.sites_out}
        self._check_widths([dims[s] for s in self.sites_in], [dims[s] for s in self.sites_out], self.sites_in,
                           self.sites_out)
        self.store = store
        self.transcoder = True
        self.n_layers = n
        self.n = int(store.manifest["n_tokens"])
        if self.n < 1:
            raise TrainingError(f"the store at {store.path} holds no tokens")
        self.device = torch.device("cpu")
        self.site, self.site_out = SITE_IN, SITE_OUT

    def describe(self) -> dict[str, Any]:
        manifest = hashlib.sha256(json.dumps(self.store.manifest, sort_keys=True).encode()).hexdigest()
        return {"type": "clt store", "layers": self.n_layers, "manifest": manifest, "n_tokens": self.n}

    def epoch(self, epoch, batch_size, seed, device):
        s = derived_seed(seed, "data", epoch)
        sites = self.sites_in + self.sites_out
        streams = [self.store.batches(site, batch_size, shuffle=True, seed=s, dtype=torch.float32) for site in sites]
        for b, parts in enumerate(zip(*streams)):
            if parts[0].shape[0] != batch_size:
                return  # the epoch's last, partial batch is not used
            out = []
            for site, t in zip(sites, parts):
                t = t.reshape(t.shape[0], -1)
                if not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(_where_non_finite(t, f"{site}: batch {b} of epoch {epoch} (of {batch_size} "
                                                              "shuffled vectors)") + "; the store holds NaN or inf")
                out.append(t)
            L = self.n_layers
            yield torch.stack(out[:L], 1).to(device), torch.stack(out[L:], 1).to(device)


def make_clt_source(source: Any) -> CLTSource:
    from ..data import ActivationStore

    if isinstance(source, ActivationStore):
        return CLTStoreSource(source)
    if (isinstance(source, (tuple, list)) and len(source) == 2 and all(isinstance(s, (tuple, list)) for s in source)
            and all(isinstance(t, torch.Tensor) for s in source for t in s)):
        return CLTTensorSource(list(source[0]), list(source[1]))
    raise TypeError("a CLT's source is an ActivationStore holding every layer's blocks.L.pre_mlp_norm and "
                    "blocks.L.post_mlp_norm, or (inputs, outputs): two lists with one [n, d_model] tensor per layer; "
                    f"got {type(source).__name__}")

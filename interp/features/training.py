"""Training sparse dictionaries: JumpReLU SAEs (the Gemma Scope recipe), TopK SAEs (Gao et al.
2024), and transcoders of either kind, from an :class:`~interp.data.ActivationStore` or tensors.

``train(source, kind, d_sae=, steps=, seed=, **options)`` returns a dictionary of
:mod:`interp.features.dictionary` that works on the raw activations (whatever normalisation the
training used is folded back into the weights), with unit-norm decoder rows, ``site`` (and
``site_out``) set when the source names them, and a :class:`TrainingLog` as ``.training_log``.

Sources:

- ``(store, site)``: an SAE on one harvested site (``store.batches``, shuffled per epoch);
- ``(store, site_in, site_out)``: a :class:`~interp.features.dictionary.Transcoder` reading
  ``site_in`` and predicting ``site_out`` (e.g. ``blocks.L.pre_mlp_norm`` -> ``blocks.L.post_mlp_norm``);
- a tensor ``[n, d_in]`` (an SAE) or a pair of tensors ``(x_in [n, d_in], x_out [n, d_out])`` (a
  transcoder), shuffled per epoch.

Recipes (every term on the normalised data; see ``normalize``):

- ``"jumprelu"``: ``pre = x W_enc + b_enc``, ``acts = pre * H(pre - threshold)`` with
  ``threshold = exp(log_threshold)``; loss ``||y - y_hat||^2 + lambda * L0``, ``L0 = sum_f H(pre_f -
  threshold_f)``. The step function's derivative with respect to the threshold is the
  straight-through estimate of Rajamanoharan et al. (arXiv 2407.14435): a rectangle kernel of
  width ``bandwidth``. ``lambda`` rises linearly from 0 to ``sparsity_coefficient`` over
  ``warmup_steps``. Adam with ``betas=(0, 0.999)``.
- ``"topk"``: ``pre = (x - b_dec) W_enc + b_enc`` for an SAE (``x W_enc + b_enc`` for a
  transcoder), the ``k`` largest (after a ReLU) fire; loss ``||y - y_hat||^2 + aux_coefficient *
  AuxK``, where AuxK reconstructs the detached error ``e = y - y_hat`` from the ``k_aux`` largest
  pre-activations of the features that have not fired for ``dead_tokens`` tokens. Adam with
  ``betas=(0.9, 0.999)``.

Both: ``W_dec`` rows random unit vectors, ``W_enc = W_dec.T`` (a random matrix with unit columns when
``d_in != d_out``), ``b_dec`` the data mean (of the target), ``b_enc = 0``; after every step the
decoder rows go back to unit norm (their gradient's component along the row is removed first).
Squared errors are summed over the width and averaged over the batch.

Options (keywords): ``batch_size`` (4096), ``lr`` (2e-4), ``betas``, ``lr_warmup_steps`` (0),
``lr_decay_steps`` (0: the lr falls linearly to 0 over the last that many steps), ``normalize``
(True: scale the input, and separately a transcoder's output, by a scalar so that
``E||x||^2 = d``), ``init_rows`` (65536: rows for the normalisation factor and the mean),
``skip`` (a transcoder with a learned affine skip ``x W_skip``; False), ``dead_tokens`` (a feature
that has not fired for more tokens is dead: reported, and AuxK's), ``device`` (default: the
tensor's, or ``"cpu"`` for a store), ``progress`` (a progress bar with loss, L0 and explained
variance), ``log_every``; JumpReLU: ``sparsity_coefficient`` (1.0), ``warmup_steps`` (1000),
``bandwidth`` (0.001), ``initial_threshold`` (0.001); TopK: ``k`` (``min(32, d_sae)``),
``k_aux`` (``d_in // 2``), ``aux_coefficient`` (1/32).

Checkpoints: with ``checkpoint_dir=DIR`` (and ``checkpoint_every=N`` steps; default a tenth of
``steps``) the parameters, Adam's state, the dead-feature counters, the log and the position in
the data stream (the step: one batch per step) are written atomically (a temporary name, then
``os.replace``; tensors as safetensors, the rest as JSON, nothing pickled), and once more at the
end. Every random draw comes from generators seeded by ``(seed, purpose, epoch)``, so the data
stream's state is the step; a rerun with the same arguments and ``checkpoint_dir`` resumes from the
last checkpoint (skipping the batches already used) and returns a dictionary bit-identical to an
uninterrupted run. A checkpoint written with other settings is refused (:class:`TrainingError`).

>>> import torch
>>> x = torch.randn(512, 8)
>>> sae = train(x, "topk", d_sae=16, steps=20, k=2, batch_size=128, progress=False)
>>> sae.W_dec.norm(dim=1).allclose(torch.ones(16)), sae.training_log.step[-1]
(True, 20)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..hooks import NonFiniteError
from ..progress import progress_bar
from .dictionary import Dictionary, JumpReLUSAE, TopKSAE, Transcoder

FORMAT = "interp-train-1"
STATE_FILE = "train.json"
KINDS = ("jumprelu", "topk")

COMMON = {"batch_size": 4096, "lr": 2e-4, "betas": None, "lr_warmup_steps": 0, "lr_decay_steps": 0,
          "normalize": True, "init_rows": 65536, "skip": False, "dead_tokens": 1_000_000, "log_every": None}
PER_KIND: dict[str, dict[str, Any]] = {
    "jumprelu": {"sparsity_coefficient": 1.0, "warmup_steps": 1000, "bandwidth": 0.001, "initial_threshold": 0.001},
    "topk": {"k": None, "k_aux": None, "aux_coefficient": 1 / 32},
}
DEFAULT_BETAS = {"jumprelu": (0.0, 0.999), "topk": (0.9, 0.999)}


class TrainingError(ValueError):
    """Training that cannot start: bad arguments, a source of the wrong shape, or a checkpoint
    written with other settings."""


@dataclass
class TrainingLog:
    """What :func:`train` measured, one record every ``log_every`` steps (and at the last step),
    averaged over the steps since the previous record: ``loss``, ``mse`` (on the normalised data:
    ``E||y||^2 = d``), ``l0`` (features firing per token), ``explained_variance`` (``1 - sum of
    squared errors / sum of squared deviations from the batch mean``), ``dead`` (features that
    have not fired for ``dead_tokens`` tokens, at the record), ``lr``, and ``sparsity_coefficient``
    (JumpReLU) or ``aux_loss`` (TopK). Columns read as lists: ``log.l0``, ``log["l0"]``.
    ``settings`` are the resolved training settings; ``scale_in``/``scale_out`` the normalisation
    factors (already folded into the returned weights)."""

    kind: str
    settings: dict[str, Any]
    scale_in: float = 1.0
    scale_out: float = 1.0
    records: list[dict[str, float]] = field(default_factory=list)

    def __getitem__(self, column: str) -> list[float]:
        if not self.records or column not in self.records[0]:
            raise KeyError(f"no column {column!r}; the log has {list(self.records[0]) if self.records else []}")
        return [r[column] for r in self.records]

    def __getattr__(self, column: str) -> list[float]:
        if column.startswith("_") or column in ("kind", "settings", "scale_in", "scale_out", "records"):
            raise AttributeError(column)
        try:
            return self[column]
        except KeyError as e:
            raise AttributeError(str(e)) from None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def final(self) -> dict[str, float]:
        """The last record."""
        return self.records[-1]

    def __repr__(self) -> str:
        if not self.records:
            return f"TrainingLog({self.kind}, empty)"
        f = self.final
        return (f"TrainingLog({self.kind}, {len(self.records)} records, step {f['step']}: loss {f['loss']:.4g}, "
                f"L0 {f['l0']:.3g}, explained variance {f['explained_variance']:.3f}, dead {f['dead']})")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "settings": self.settings, "scale_in": self.scale_in, "scale_out": self.scale_out,
                "records": self.records}


# ---------------------------------------------------------------------- randomness
def _seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed for one purpose (``"init"``, ``("data", epoch)``), derived from ``seed``."""
    h = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, *parts))


# ---------------------------------------------------------------------- sources
def _where_non_finite(x: torch.Tensor, what: str) -> str:
    bad = ~torch.isfinite(x)
    first = bad.nonzero()[0].tolist()
    value = x[tuple(first)].item()
    at = f"row {first[0]}" + (f", column {first[1]}" if len(first) > 1 else "")
    return f"{what} holds {value} at {at} ({int(bad.sum())} non-finite values in all)"


class _Source:
    """Full training batches ``(x, y)`` (``y`` None for an SAE), float32, on the device."""

    transcoder: bool
    d_in: int
    d_out: int
    n: int
    device: torch.device
    site: str | None = None
    site_out: str | None = None

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


class _TensorSource(_Source):
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
        perm = torch.randperm(self.n, generator=_generator(seed, "data", epoch)).to(self.x.device)
        for i in range(0, self.n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            x = self.x[idx].to(device=device, dtype=torch.float32)
            yield x, (None if self.y is None else self.y[idx].to(device=device, dtype=torch.float32))


class _StoreSource(_Source):
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
        s = _seed(seed, "data", epoch)
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


def _source(source: Any) -> _Source:
    from ..data import ActivationStore

    if isinstance(source, torch.Tensor):
        return _TensorSource(source, None)
    if isinstance(source, (tuple, list)) and source and isinstance(source[0], ActivationStore):
        if len(source) not in (2, 3):
            raise TrainingError(f"a store source is (store, site) or (store, site_in, site_out); got {len(source)} "
                                "items")
        return _StoreSource(source[0], list(source[1:]))
    if isinstance(source, (tuple, list)) and source and all(isinstance(t, torch.Tensor) for t in source):
        if len(source) != 2:
            raise TrainingError(f"a tensor pair is (x_in, x_out) for a transcoder; got {len(source)} tensors")
        return _TensorSource(source[0], source[1])
    raise TypeError("source must be (ActivationStore, site), (ActivationStore, site_in, site_out), a tensor "
                    f"[n, d_in] or a pair of tensors (x_in, x_out); got {type(source).__name__}")


# ---------------------------------------------------------------------- the JumpReLU estimators
class _Step(torch.autograd.Function):
    """``H(pre - threshold)``; d/d threshold = -(1/bandwidth) rect((pre - threshold)/bandwidth), d/d pre = 0."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        kernel = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype) / ctx.bandwidth
        return None, -(grad * kernel).reshape(-1, pre.shape[-1]).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - threshold)``; d/d pre = H, d/d threshold = -(threshold/bandwidth) rect(...)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        on = (pre > threshold).to(pre.dtype)
        kernel = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype) / ctx.bandwidth
        g_threshold = -(threshold * kernel * grad).reshape(-1, pre.shape[-1]).sum(0)
        return grad * on, g_threshold, None


# ---------------------------------------------------------------------- settings
def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainingError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_float(name: str, value: Any, low: float, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value <= low if strict else value < low):
        raise TrainingError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _settings(kind: Any, d_sae: Any, steps: Any, seed: Any, src: _Source, options: dict[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise TrainingError(f"unknown kind {kind!r}; train knows {', '.join(repr(k) for k in KINDS)}")
    _check_int("d_sae", d_sae, 1)
    _check_int("steps", steps, 1)
    _check_int("seed", seed, 0)
    known = {**COMMON, **PER_KIND[kind]}
    unknown = [k for k in options if k not in known]
    if unknown:
        other = [k for k in unknown if any(k in PER_KIND[o] for o in KINDS)]
        hint = f" ({', '.join(other)} belong to another kind)" if other else ""
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for kind {kind!r}{hint}; the options are "
                        f"{', '.join(sorted(known))}")
    s: dict[str, Any] = {**known, **options}
    batch = _check_int("batch_size", s["batch_size"], 1)
    s["batch_size"] = min(batch, src.n)  # fewer vectors than a batch: one batch of them all
    _check_float("lr", s["lr"], 0.0)
    betas = s["betas"] if s["betas"] is not None else DEFAULT_BETAS[kind]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise TrainingError(f"betas must be two numbers in [0, 1), got {betas!r}")
    s["betas"] = [float(b) for b in betas]
    _check_int("lr_warmup_steps", s["lr_warmup_steps"], 0)
    _check_int("lr_decay_steps", s["lr_decay_steps"], 0)
    _check_int("init_rows", s["init_rows"], 1)
    _check_int("dead_tokens", s["dead_tokens"], 1)
    s["normalize"] = bool(s["normalize"])
    s["skip"] = bool(s["skip"])
    if s["skip"] and not src.transcoder:
        raise TrainingError("skip=True is for transcoders (a source with an input and an output)")
    s["log_every"] = _check_int("log_every", s["log_every"] if s["log_every"] is not None else max(1, steps // 100), 1)
    if kind == "jumprelu":
        _check_float("sparsity_coefficient", s["sparsity_coefficient"], 0.0, strict=False)
        _check_int("warmup_steps", s["warmup_steps"], 0)
        _check_float("bandwidth", s["bandwidth"], 0.0)
        _check_float("initial_threshold", s["initial_threshold"], 0.0)
    else:
        k = s["k"] if s["k"] is not None else min(32, d_sae)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
            raise TrainingError(f"k must be an int in 1..d_sae={d_sae}, got {k!r}")
        s["k"] = k
        k_aux = s["k_aux"] if s["k_aux"] is not None else max(1, min(d_sae, src.d_in // 2))
        if isinstance(k_aux, bool) or not isinstance(k_aux, int) or not 1 <= k_aux <= d_sae:
            raise TrainingError(f"k_aux must be an int in 1..d_sae={d_sae}, got {k_aux!r}")
        s["k_aux"] = k_aux
        _check_float("aux_coefficient", s["aux_coefficient"], 0.0, strict=False)
    for key in ("lr", "sparsity_coefficient", "bandwidth", "initial_threshold", "aux_coefficient"):
        if key in s:
            s[key] = float(s[key])
    return {"format": FORMAT, "kind": kind, "transcoder": src.transcoder, "d_sae": d_sae, "steps": steps,
            "seed": seed, **dict(sorted(s.items())), "source": src.describe()}


# ---------------------------------------------------------------------- the trainer
class _Trainer:
    """Parameters (on the normalised data), Adam, dead-feature counters and the log window."""

    NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")

    def __init__(self, s: dict[str, Any], src: _Source, device: torch.device):
        self.s, self.src, self.device = s, src, device
        self.kind, self.transcoder = s["kind"], src.transcoder
        self.names = list(self.NAMES) + (["log_threshold"] if self.kind == "jumprelu" else []) + (
            ["W_skip"] if s["skip"] else [])
        self.P: dict[str, torch.Tensor] = {}
        self.scale_in = torch.ones((), device=device)
        self.scale_out = torch.ones((), device=device)
        self.since_fired = torch.zeros(s["d_sae"], dtype=torch.int64, device=device)
        self.window = torch.zeros(6, dtype=torch.float64, device=device)  # loss mse l0 ev aux count
        self.records: list[dict[str, float]] = []
        self.opt: torch.optim.Adam | None = None

    # ------------------------------------------------------------ initialisation
    def initialise(self) -> None:
        s, src = self.s, self.src
        rows_x, rows_y, got = [], [], 0
        for x, y in src.epoch(0, s["batch_size"], s["seed"], self.device):  # the first batches of the stream
            rows_x.append(x)
            rows_y.append(x if y is None else y)
            got += x.shape[0]
            if got >= s["init_rows"]:
                break
        x, y = torch.cat(rows_x), torch.cat(rows_y)
        for name, t in (("the input", x), ("the output", y)):
            ms = t.pow(2).sum(-1).mean()
            if not bool(ms > 0):
                raise TrainingError(f"{name} is zero in every sampled row; there is nothing to train on")
        if s["normalize"]:
            self.scale_in = (src.d_in / x.pow(2).sum(-1).mean()).sqrt()
            self.scale_out = (src.d_out / y.pow(2).sum(-1).mean()).sqrt() if self.transcoder else self.scale_in
        gen = _generator(s["seed"], "init")
        d_sae, d_in, d_out = s["d_sae"], src.d_in, src.d_out
        w_dec = torch.randn(d_sae, d_out, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if d_in == d_out:
            w_enc = w_dec.T.clone()
        else:
            w_enc = torch.randn(d_in, d_sae, generator=gen)
            w_enc /= w_enc.norm(dim=0, keepdim=True)
        P = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": torch.zeros(d_sae),
             "b_dec": (y * self.scale_out).mean(0).cpu()}
        if self.kind == "jumprelu":
            P["log_threshold"] = torch.full((d_sae,), math.log(s["initial_threshold"]))
        if s["skip"]:
            P["W_skip"] = torch.zeros(d_in, d_out)
        self.P = {k: P[k].to(self.device, torch.float32).contiguous().requires_grad_(True) for k in self.names}
        self._optimizer()

    def _optimizer(self) -> None:
        self.opt = torch.optim.Adam([self.P[k] for k in self.names], lr=self.s["lr"], betas=tuple(self.s["betas"]))

    # ------------------------------------------------------------ one step
    def forward(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        P, s = self.P, self.s
        centred = x - P["b_dec"] if self.kind == "topk" and not self.transcoder else x
        pre = centred @ P["W_enc"] + P["b_enc"]
        out: dict[str, torch.Tensor] = {"pre": pre}
        if self.kind == "jumprelu":
            threshold = P["log_threshold"].exp()
            acts = _JumpReLU.apply(pre, threshold, s["bandwidth"])
            out["l0"] = _Step.apply(pre, threshold, s["bandwidth"]).sum(-1).mean()
        else:
            values, idx = pre.topk(s["k"], dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
            out["l0"] = (acts > 0).sum(-1).to(pre.dtype).mean()
            if dead is not None and bool(dead.any()):
                k_aux = min(s["k_aux"], int(dead.sum()))
                masked = pre.masked_fill(~dead, float("-inf"))
                values, idx = masked.topk(k_aux, dim=-1)
                out["aux_acts"] = torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
        recon = acts @ P["W_dec"] + P["b_dec"]
        if "W_skip" in P:
            recon = recon + x @ P["W_skip"]
        out["acts"], out["recon"] = acts, recon
        return out

    def lr_at(self, t: int) -> float:
        s = self.s
        lr = s["lr"]
        if s["lr_warmup_steps"]:
            lr *= min(1.0, (t + 1) / s["lr_warmup_steps"])
        if s["lr_decay_steps"] and t >= s["steps"] - s["lr_decay_steps"]:
            lr *= (s["steps"] - t) / s["lr_decay_steps"]
        return lr

    def lam_at(self, t: int) -> float:
        s = self.s
        return s["sparsity_coefficient"] * (min(1.0, (t + 1) / s["warmup_steps"]) if s["warmup_steps"] else 1.0)

    def step(self, t: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
        s = self.s
        x = x * self.scale_in
        target = x if y is None else y * self.scale_out
        dead = self.since_fired > s["dead_tokens"] if self.kind == "topk" and s["aux_coefficient"] > 0 else None
        f = self.forward(x, dead)
        err = target - f["recon"]
        mse = err.pow(2).sum(-1).mean()
        loss = mse
        aux = torch.zeros((), device=x.device)
        if self.kind == "jumprelu":
            loss = loss + self.lam_at(t) * f["l0"]
        elif "aux_acts" in f:
            e = err.detach()
            aux = (f["aux_acts"] @ self.P["W_dec"] - e).pow(2).sum(-1).mean()
            loss = loss + s["aux_coefficient"] * aux
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        W_dec = self.P["W_dec"]
        with torch.no_grad():
            if W_dec.grad is not None:  # keep the step tangent to the unit sphere of each row
                W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(t)
            self.opt.step()
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
            fired = (f["acts"] > 0).any(0)
            self.since_fired = torch.where(fired, 0, self.since_fired + x.shape[0])
            dev = target - target.mean(0)
            ev = 1 - err.pow(2).sum() / dev.pow(2).sum().clamp_min(1e-30)
            self.window += torch.stack([loss.detach(), mse.detach(), f["l0"].detach(), ev, aux.detach(),
                                        torch.ones((), device=x.device)]).to(torch.float64)

    def record(self, t: int) -> dict[str, float]:
        w = self.window.tolist()
        n = w[5]
        rec = {"step": t + 1, "loss": w[0] / n, "mse": w[1] / n, "l0": w[2] / n, "explained_variance": w[3] / n,
               "dead": int((self.since_fired > self.s["dead_tokens"]).sum()), "lr": self.lr_at(t)}
        if self.kind == "jumprelu":
            rec["sparsity_coefficient"] = self.lam_at(t)
        else:
            rec["aux_loss"] = w[4] / n
        if not all(math.isfinite(v) for v in rec.values()):
            raise NonFiniteError(f"training diverged by step {t + 1}: {rec} (lower lr, or check the data)")
        self.records.append(rec)
        self.window.zero_()
        return rec

    # ------------------------------------------------------------ state
    def tensors(self) -> dict[str, torch.Tensor]:
        assert self.opt is not None
        out = {f"param.{k}": self.P[k].detach() for k in self.names}
        for k in self.names:
            st = self.opt.state.get(self.P[k], {})
            for key in ("step", "exp_avg", "exp_avg_sq"):
                if key in st:
                    out[f"adam.{k}.{key}"] = st[key]
        out.update(since_fired=self.since_fired, window=self.window, scale_in=self.scale_in, scale_out=self.scale_out)
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}

    def load(self, tensors: dict[str, torch.Tensor], records: list[dict[str, float]]) -> None:
        want = {f"param.{k}" for k in self.names} | {"since_fired", "window", "scale_in", "scale_out"}
        missing = sorted(want - set(tensors))
        if missing:
            raise TrainingError(f"the checkpoint lacks {', '.join(missing)}")
        self.P = {k: tensors[f"param.{k}"].to(self.device).contiguous().requires_grad_(True) for k in self.names}
        self._optimizer()
        assert self.opt is not None
        for k in self.names:
            st = {key: tensors[f"adam.{k}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")
                  if f"adam.{k}.{key}" in tensors}
            if st:
                self.opt.state[self.P[k]] = {key: (v if key == "step" else v.to(self.device)) for key, v in st.items()}
        self.since_fired = tensors["since_fired"].to(self.device)
        self.window = tensors["window"].to(self.device)
        self.scale_in = tensors["scale_in"].to(self.device)
        self.scale_out = tensors["scale_out"].to(self.device)
        self.records = list(records)

    # ------------------------------------------------------------ the result
    @torch.no_grad()
    def dictionary(self) -> Dictionary:
        """The trained dictionary on raw activations: the normalisation folded into the weights,
        then the decoder rows rescaled to unit norm (the scale moved into the encoder)."""
        P = {k: v.detach().clone() for k, v in self.P.items()}
        a, b = self.scale_in, self.scale_out
        b_enc = P["b_enc"]
        if self.kind == "topk" and not self.transcoder:
            b_enc = b_enc - P["b_dec"] @ P["W_enc"]
        W_enc, W_dec, b_dec = P["W_enc"] * a, P["W_dec"] / b, P["b_dec"] / b
        sites = {"site": self.src.site, "site_out": self.src.site_out}
        threshold = P["log_threshold"].exp() if "log_threshold" in P else None
        k = self.s.get("k") if self.kind == "topk" else None
        if self.transcoder:
            W_skip = P["W_skip"] * a / b if "W_skip" in P else None
            d: Dictionary = Transcoder(W_enc, W_dec, b_enc, b_dec, threshold=threshold, W_skip=W_skip, k=k, **sites)
        elif self.kind == "jumprelu":
            d = JumpReLUSAE(W_enc, W_dec, b_enc, b_dec, threshold=threshold, site=self.src.site)
        else:
            assert k is not None
            d = TopKSAE(W_enc, W_dec, b_enc, b_dec, k=k, site=self.src.site)
        d.normalize_decoder()
        return d


# ---------------------------------------------------------------------- checkpoints
def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _tensor_file(step: int) -> str:
    return f"train-{step:09d}.safetensors"


def _save_checkpoint(folder: Path, settings: dict[str, Any], trainer: _Trainer, step: int) -> None:
    """Tensors first (a new file), then the JSON that points at them (replacing the old one), then
    the old tensor files: a kill at any moment leaves a complete, consistent checkpoint."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    name = _tensor_file(step)
    tensors = trainer.tensors()
    _atomic_write(folder / name, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT,
                                                                                 "step": str(step)}))
    per_epoch = trainer.src.n // settings["batch_size"]
    state = {"format": FORMAT, "settings": settings, "step": step, "batches_consumed": step,
             "stream": {"epoch": step // per_epoch, "batch": step % per_epoch, "batches_per_epoch": per_epoch,
                        "data_seed": _seed(settings["seed"], "data", step // per_epoch)},
             "tensors": name, "records": trainer.records}
    text = json.dumps(state, indent=1)
    _atomic_write(folder / STATE_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    for old in folder.glob("train-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} ({old!r} there, {new!r} now)"]


def _load_checkpoint(folder: Path, settings: dict[str, Any]) -> tuple[int, dict[str, torch.Tensor],
                                                                      list[dict[str, float]]] | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    for tmp in folder.glob(".*.tmp-*"):  # left by a killed run: never read, removed
        tmp.unlink(missing_ok=True)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path} is not valid JSON ({e}); delete {folder} to start again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a training checkpoint (format {FORMAT!r})")
    wanted = json.loads(json.dumps(settings))
    if state.get("settings") != wanted:
        diffs = _diff(state.get("settings"), wanted)
        raise TrainingError(f"the checkpoint in {folder} was written with other settings: {'; '.join(diffs)}. "
                            "Rerun with the same arguments to resume it, or use another checkpoint_dir")
    from safetensors import SafetensorError, safe_open

    tensor_path = folder / state["tensors"]
    try:
        with safe_open(str(tensor_path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise TrainingError(f"{tensor_path} cannot be read ({e}); delete {folder} to start again") from None
    if meta.get("step") != str(state["step"]):
        raise TrainingError(f"{tensor_path} holds step {meta.get('step')}, {path} says {state['step']}")
    return int(state["step"]), tensors, state["records"]


# ---------------------------------------------------------------------- train
@torch.enable_grad()  # works inside torch.no_grad() / set_grad_enabled(False), as notebooks often are
def train(source: Any, kind: str = "jumprelu", *, d_sae: int, steps: int, seed: int = 0,
          device: str | torch.device | None = None, progress: bool = True,
          checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
          **options: Any) -> Dictionary:
    """Train a ``kind`` dictionary (``"jumprelu"`` or ``"topk"``) of ``d_sae`` features for
    ``steps`` steps (one batch each) on ``source``; see the module docstring for the sources, the
    recipes and the options. Deterministic for a ``seed`` (on CPU). Returns a
    :class:`~interp.features.dictionary.JumpReLUSAE`, :class:`~interp.features.dictionary.TopKSAE`
    or :class:`~interp.features.dictionary.Transcoder` (frozen parameters, unit-norm decoder
    rows) whose ``training_log`` is a :class:`TrainingLog`.

    Raises :class:`TrainingError` (a ValueError) for bad arguments, a source of the wrong shape or
    a checkpoint written with other settings, ``TypeError`` for an unknown option or source type,
    and :class:`~interp.hooks.NonFiniteError` for NaN or inf in the data (naming where) or a
    diverging run.
    """
    src = _source(source)
    settings = _settings(kind, d_sae, steps, seed, src, options)
    dev = torch.device(device) if device is not None else src.device
    if checkpoint_every is not None:
        _check_int("checkpoint_every", checkpoint_every, 1)
        if checkpoint_dir is None:
            raise TrainingError("checkpoint_every needs checkpoint_dir")
    every = checkpoint_every or max(1, steps // 10)
    trainer = _Trainer(settings, src, dev)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    loaded = _load_checkpoint(folder, settings) if folder is not None else None
    start = 0
    if loaded is not None:
        start, tensors, records = loaded
        trainer.load(tensors, records)
    else:
        trainer.initialise()
    batch, log_every = settings["batch_size"], settings["log_every"]
    per_epoch = src.n // batch
    bar = progress_bar(steps, f"train {kind}{' transcoder' if src.transcoder else ''}", "step", progress,
                       initial=start)
    try:
        t = start
        epoch = start // per_epoch
        while t < steps:
            stream = src.epoch(epoch, batch, settings["seed"], dev)
            skip = t - epoch * per_epoch  # batches of this epoch used before a resume
            for i, (x, y) in enumerate(stream):
                if i < skip:
                    continue
                if t >= steps:
                    break
                trainer.step(t, x, y)
                if (t + 1) % log_every == 0 or t + 1 == steps:
                    rec = trainer.record(t)
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", l0=f"{rec['l0']:.3g}",
                                    ev=f"{rec['explained_variance']:.3f}", refresh=False)
                t += 1
                bar.update(1)
                if folder is not None and (t % every == 0 or t == steps):
                    _save_checkpoint(folder, settings, trainer, t)
            epoch += 1
    finally:
        bar.close()
    d = trainer.dictionary()
    log = TrainingLog(kind, settings, float(trainer.scale_in), float(trainer.scale_out), list(trainer.records))
    setattr(d, "training_log", log)  # noqa: B010 (a plain attribute; nn.Module's __setattr__ types say tensors)
    return d


__all__ = ["train", "TrainingLog", "TrainingError", "KINDS"]

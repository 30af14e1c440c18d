"""The training recipes of :func:`interp.features.training.train`: JumpReLU (straight-through
threshold estimators) and TopK with AuxK, on normalised data, with Adam; the log it keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..hooks import NonFiniteError
from .dictionary import Dictionary, JumpReLUSAE, TopKSAE, Transcoder
from .sources import Source, TrainingError, seeded_generator


@dataclass
class TrainingLog:
    """What :func:`train` measured, one record every ``log_every`` steps (and at the last step),
    averaged over the steps since the previous record: ``loss``, ``mse`` (on the normalised data:
    ``E||y||^2 = d``), ``l0`` (features firing per token), ``explained_variance`` (``1 - sum of
    squared errors / sum of squared deviations from the batch mean``), ``dead`` (features that
    have not fired for ``dead_tokens`` tokens, at the record), ``lr``, and ``sparsity_coefficient``
    (JumpReLU) or ``aux_loss`` (TopK). Columns read as lists: ``log.l0``, ``log["l0"]``.
    ``settings`` are the resolved training settings; ``scale_in``/``scale_out`` the normalisation
    factors (already folded into the returned weights; a list, one per layer, for a CLT);
    ``warnings`` the sentences :func:`train` warned at the end (most features dead, an L0 far from
    the target)."""

    kind: str
    settings: dict[str, Any]
    scale_in: float | list[float] = 1.0
    scale_out: float | list[float] = 1.0
    records: list[dict[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, column: str) -> list[float]:
        if not self.records or column not in self.records[0]:
            raise KeyError(f"no column {column!r}; the log has {list(self.records[0]) if self.records else []}")
        return [r[column] for r in self.records]

    def __getattr__(self, column: str) -> list[float]:
        if column.startswith("_") or column in ("kind", "settings", "scale_in", "scale_out", "records",
                                                                      "warnings"):
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
                "records": self.records,
                "warnings": self.warnings}


# ---------------------------------------------------------------------- the JumpReLU estimators
class StepFunction(torch.autograd.Function):
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


class JumpReLUFunction(torch.autograd.Function):
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


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Parameters (on the normalised data), Adam, dead-feature counters and the log window."""

    NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")

    def __init__(self, s: dict[str, Any], src: Source, device: torch.device):
        self.s, self.src, self.device = s, src, device
        self.kind, self.transcoder = s["kind"], src.transcoder
        self.names = list(self.NAMES) + (["log_threshold"] if self.kind == "jumprelu" else []) + (
            ["W_skip"] if s["skip"] else [])
        self.P: dict[str, torch.Tensor] = {}
        self.scale_in = torch.ones((), device=device)
        self.scale_out = torch.ones((), device=device)
        self.since_fired = torch.zeros(s["d_sae"], dtype=torch.int64, device=device)
        self.window = torch.zeros(6, dtype=torch.float64, device=device)  # loss mse l0 ev aux count
        self.log_mult = torch.zeros((), dtype=torch.float64)  # the l0 controller's log factor on lambda
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
        gen = seeded_generator(s["seed"], "init")
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
            acts = JumpReLUFunction.apply(pre, threshold, s["bandwidth"])
            out["l0"] = StepFunction.apply(pre, threshold, s["bandwidth"]).sum(-1).mean()
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
        ramp = min(1.0, (t + 1) / s["warmup_steps"]) if s["warmup_steps"] else 1.0
        return s["sparsity_coefficient"] * math.exp(float(self.log_mult)) * ramp

    CONTROL_RATE, CONTROL_CLIP = 0.01, 1.0

    def control(self, t: int, l0: float) -> None:
        """After the warm-up, move log(lambda) by 0.01 * log(L0 / target) (clipped to +-0.01)."""
        target = self.s.get("l0")
        if target is None or t + 1 < self.s["warmup_steps"]:
            return
        err = max(-self.CONTROL_CLIP, min(self.CONTROL_CLIP, math.log(max(l0, 1e-3) / target)))
        self.log_mult += self.CONTROL_RATE * err

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
        self.account(t, fired, target, err, loss, mse, f["l0"], aux)

    def account(self, t: int, fired: torch.Tensor, target: torch.Tensor, err: torch.Tensor, loss: torch.Tensor,
                mse: torch.Tensor, l0: torch.Tensor, extra: torch.Tensor) -> None:
        """After a step: the dead-feature counters (``fired [features]``), the log window (loss, MSE, L0,
        explained variance of ``target`` given the error ``err``, the ``extra`` loss term) and the L0
        controller."""
        with torch.no_grad():
            self.since_fired = torch.where(fired, 0, self.since_fired + target.shape[0])
            dev = target - target.mean(0)
            ev = 1 - err.pow(2).sum() / dev.pow(2).sum().clamp_min(1e-30)
            self.window += torch.stack([loss.detach(), mse.detach(), l0.detach(), ev, extra.detach(),
                                        torch.ones((), device=target.device)]).to(torch.float64)
        if self.kind == "jumprelu" and self.s["l0"] is not None:
            self.control(t, float(l0.detach()))

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
        out.update(since_fired=self.since_fired, window=self.window, scale_in=self.scale_in, scale_out=self.scale_out,
                   log_mult=self.log_mult)
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}

    def load(self, tensors: dict[str, torch.Tensor], records: list[dict[str, float]]) -> None:
        # no log_mult: a checkpoint written before the l0= controller existed, when the factor was
        # always 1 (log 0); it resumes exactly (a run with l0= has other settings and is refused earlier)
        want = {f"param.{k}" for k in self.names} | {"since_fired", "window", "scale_in", "scale_out"}
        missing = sorted(want - set(tensors))
        if missing:
            raise TrainingError(f"the checkpoint lacks {', '.join(missing)}: it is damaged or not a checkpoint of "
                                "this trainer; delete its folder to train from the start")
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
        self.log_mult = tensors.get("log_mult", torch.zeros((), dtype=torch.float64)).to(torch.float64)
        self.records = list(records)

    def warnings(self) -> list[str]:
        """The end-of-run checks: most features dead; an L0 more than 1.5x from the target."""
        out, s, f = [], self.s, self.records[-1]
        n_features = self.since_fired.numel()  # d_sae, or every layer's for a CLT
        if f["dead"] > n_features / 2:
            out.append(f"{f['dead']} of {n_features} features are dead (no firing in {s['dead_tokens']} tokens) at "
                       f"step {f['step']}: train longer, raise lr, or lower the sparsity (sparsity_coefficient, "
                       "l0, k)")
        target = s.get("l0")
        if target is not None and not target / 1.5 <= f["l0"] <= target * 1.5:
            out.append(f"the L0 ended at {f['l0']:.3g}, far from the target l0={target:g}: train longer "
                       "(more steps after the warm-up) or start from a closer sparsity_coefficient")
        return out

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

"""The cross-layer transcoder recipe of :func:`interp.features.training.train` (``kind="clt"``): the
trainer of :mod:`.trainer` with one encoder per layer and one decoder per (layer, later layer)
pair, on per-layer normalised data; its result is a
:class:`~interp.features.clt.CrossLayerTranscoder`.

The sparsity penalty of a JumpReLU CLT is the one Anthropic's "Circuit Tracing" (Ameisen et al.
2025) publishes: ``lambda * sum_layers sum_features tanh(c * ||W_dec_f|| * f)``, where ``||W_dec_f||``
is the Euclidean norm of feature ``f``'s decoder vectors to every output layer it writes,
*concatenated* (``sqrt(sum_o ||W_dec_f[o]||^2)``), and ``c`` is ``tanh_scale``. See
:mod:`.training` for why that form.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .clt import CrossLayerTranscoder
from .sources import CLTSource, TrainingError, seeded_generator
from .trainer import JumpReLUFunction, Trainer


class CLTTrainer(Trainer):
    """Parameters (normalised units): ``W_enc [L, d, w]``, ``b_enc [L, w]``, ``log_threshold [L, w]``
    (JumpReLU), ``W_dec.i [w, L - i, d]`` for each layer ``i``, ``b_dec [L, d]``, ``W_skip [L, d, d]``
    (``skip=True``); one input and one output scale per layer."""

    def __init__(self, s: dict[str, Any], src: CLTSource, device: torch.device):
        super().__init__(s, src, device)
        self.kind = s["activation"]  # the shared code's "jumprelu" / "topk" branches
        self.L, self.w, self.d = src.n_layers, s["d_sae"], src.d_in
        self.names = (["W_enc", "b_enc", "b_dec"] + [f"W_dec.{i}" for i in range(self.L)]
                      + (["log_threshold"] if self.kind == "jumprelu" else []) + (["W_skip"] if s["skip"] else []))
        self.scale_in = torch.ones(self.L, device=device)
        self.scale_out = torch.ones(self.L, device=device)
        self.since_fired = torch.zeros(self.L * self.w, dtype=torch.int64, device=device)

    # ------------------------------------------------------------ initialisation
    def initialise(self) -> None:
        s, src, L, w, d = self.s, self.src, self.L, self.w, self.d
        rows_x, rows_y, got = [], [], 0
        for x, y in src.epoch(0, s["batch_size"], s["seed"], self.device):
            assert y is not None
            rows_x.append(x)
            rows_y.append(y)
            got += x.shape[0]
            if got >= s["init_rows"]:
                break
        x, y = torch.cat(rows_x), torch.cat(rows_y)  # [n, L, d]
        ms_x, ms_y = x.pow(2).sum(-1).mean(0), y.pow(2).sum(-1).mean(0)  # [L]
        for name, ms in (("MLP input", ms_x), ("MLP output", ms_y)):
            zero = [i for i, v in enumerate(ms.tolist()) if not v > 0]
            if zero:
                raise TrainingError(f"layer {zero[0]}'s {name} is zero in every sampled row; there is nothing to "
                                    "train on (check what was harvested)")
        if s["normalize"]:
            self.scale_in, self.scale_out = (d / ms_x).sqrt(), (d / ms_y).sqrt()
        gen = seeded_generator(s["seed"], "init")
        w_enc = torch.randn(L, d, w, generator=gen)
        w_enc /= w_enc.norm(dim=1, keepdim=True)
        P: dict[str, torch.Tensor] = {"W_enc": w_enc, "b_enc": torch.zeros(L, w),
                                      "b_dec": (y * self.scale_out[:, None]).mean(0).cpu()}
        for i in range(L):
            dec = torch.randn(w, L - i, d, generator=gen)
            P[f"W_dec.{i}"] = dec / dec.flatten(1).norm(dim=1)[:, None, None]  # unit norm over every output
        if self.kind == "jumprelu":
            P["log_threshold"] = torch.full((L, w), math.log(s["initial_threshold"]))
        if s["skip"]:
            P["W_skip"] = torch.zeros(L, d, d)
        self.P = {k: P[k].to(self.device, torch.float32).contiguous().requires_grad_(True) for k in self.names}
        self._optimizer()

    # ------------------------------------------------------------ one step
    def decode(self, acts: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``[B, L, d]``: output ``o`` is ``sum_{i <= o} acts[:, i] @ W_dec.i[:, o - i]`` (+ ``b_dec[o]``)."""
        B, L, d = acts.shape[0], self.L, self.d
        flat = self.P["b_dec"].reshape(1, L * d).expand(B, L * d) if bias else acts.new_zeros(B, L * d)
        for i in range(L):
            z = acts[:, i] @ self.P[f"W_dec.{i}"].reshape(self.w, (L - i) * d)  # outputs i..L-1
            flat = flat + F.pad(z, (i * d, 0))
        return flat.reshape(B, L, d)

    def decoder_norms(self) -> torch.Tensor:
        """``[L, w]``: each feature's decoder norm, concatenated over the output layers it writes."""
        return torch.stack([self.P[f"W_dec.{i}"].pow(2).sum((1, 2)).sqrt() for i in range(self.L)])

    def forward(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        P, s, B = self.P, self.s, x.shape[0]
        pre = torch.einsum("bld,ldw->blw", x, P["W_enc"]) + P["b_enc"]
        out: dict[str, torch.Tensor] = {"pre": pre}
        if self.kind == "jumprelu":
            threshold = P["log_threshold"].exp()
            acts = JumpReLUFunction.apply(pre.reshape(B, -1), threshold.reshape(-1), s["bandwidth"]).reshape(pre.shape)
        else:
            values, idx = pre.topk(s["k"], dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
            if dead is not None and bool(dead.any()):
                k_aux = min(s["k_aux"], int(dead.sum(-1).max()))
                values, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
                out["aux_acts"] = torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
        out["l0"] = (acts > 0).sum(-1).to(pre.dtype).mean()  # per layer
        recon = self.decode(acts)
        if "W_skip" in P:
            recon = recon + torch.einsum("bld,lde->ble", x, P["W_skip"])
        out["acts"], out["recon"] = acts, recon
        return out

    def step(self, t: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
        s = self.s
        assert y is not None and self.opt is not None
        x = x * self.scale_in[:, None]
        target = y * self.scale_out[:, None]
        dead = None
        if self.kind == "topk" and s["aux_coefficient"] > 0:
            dead = (self.since_fired > s["dead_tokens"]).reshape(self.L, self.w)
        f = self.forward(x, dead)
        err = target - f["recon"]
        mse = err.pow(2).sum((-1, -2)).mean()  # summed over the width and the layers
        loss = mse
        extra = torch.zeros((), device=x.device)  # the sparsity penalty (JumpReLU) or AuxK's loss (TopK)
        if self.kind == "jumprelu":
            extra = torch.tanh(s["tanh_scale"] * self.decoder_norms() * f["acts"]).sum((-1, -2)).mean()
            loss = loss + self.lam_at(t) * extra
        elif "aux_acts" in f:
            extra = (self.decode(f["aux_acts"], bias=False) - err.detach()).pow(2).sum((-1, -2)).mean()
            loss = loss + s["aux_coefficient"] * extra
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        decoders = [self.P[f"W_dec.{i}"] for i in range(self.L)]
        with torch.no_grad():
            if self.kind == "topk":  # unit concatenated norm: step tangent to the sphere
                for W in decoders:
                    if W.grad is not None:
                        W.grad -= (W.grad * W).sum((1, 2), keepdim=True) * W
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(t)
            self.opt.step()
            if self.kind == "topk":
                for W in decoders:
                    W /= W.flatten(1).norm(dim=1)[:, None, None]
            fired = (f["acts"] > 0).any(0).reshape(-1)
        self.account(t, fired, target, err, loss, mse, f["l0"], extra)

    def record(self, t: int) -> dict[str, float]:
        penalty = float(self.window[4] / self.window[5])
        rec = super().record(t)
        if self.kind == "jumprelu":
            rec["sparsity_loss"] = penalty
        return rec

    # ------------------------------------------------------------ the result
    @torch.no_grad()
    def dictionary(self) -> CrossLayerTranscoder:  # type: ignore[override]
        """The CLT on raw activations. JumpReLU: each feature's concatenated decoder is first
        rescaled to unit norm (the factor moved into its encoder column, bias and threshold, which
        leaves every output unchanged); TopK keeps it at unit norm throughout. Then the per-layer
        normalisation is folded in: ``W_enc_i * a_i``, ``W_dec_i[:, o] / b_o``, ``b_dec_o / b_o``,
        ``W_skip_o * a_o / b_o`` (``a``: ``scale_in``, ``b``: ``scale_out``)."""
        P = {k: v.detach().clone() for k, v in self.P.items()}
        L, a, b = self.L, self.scale_in, self.scale_out
        W_enc, b_enc = P["W_enc"], P["b_enc"]
        threshold = P["log_threshold"].exp() if self.kind == "jumprelu" else torch.zeros_like(b_enc)
        decs = [P[f"W_dec.{i}"] for i in range(L)]
        if self.kind == "jumprelu":
            norms = self.decoder_norms().detach().clamp_min(1e-30)
            decs = [dec / norms[i][:, None, None] for i, dec in enumerate(decs)]
            W_enc, b_enc, threshold = W_enc * norms[:, None, :], b_enc * norms, threshold * norms
        skip = [P["W_skip"][o] * a[o] / b[o] for o in range(L)] if "W_skip" in P else None
        return CrossLayerTranscoder([W_enc[i] * a[i] for i in range(L)],
                                    [decs[i] / b[i:, None] for i in range(L)], [t.clone() for t in b_enc],
                                    [P["b_dec"][o] / b[o] for o in range(L)], [t.clone() for t in threshold], skip,
                                    site=self.src.site or "", site_out=self.src.site_out or "",
                                    k=self.s["k"] if self.kind == "topk" else None)

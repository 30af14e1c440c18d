"""The tuned lens: one learned affine translator per layer before the unembedding.

The logit lens reads the residual after layer ``l`` through the final norm and unembedding as
if it were the last layer's. The tuned lens (Belrose et al., 2023) first maps it with a
translator ``h + A_l h + b_l`` trained so that the result predicts the model's own final
distribution: it minimises ``KL(final || lens)`` over a corpus. ``A`` and ``b`` start at zero,
so an untrained lens *is* the logit lens; the last layer's translator stays zero, so the last
row is still the model's output.

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
...     n_kv_heads=1, d_head=8, vocab_size=50))
>>> lens = TunedLens.identity(m)
>>> resid = torch.randn(3, 1, 4, 16)                      # [stages = layers + 1, batch, seq, d]
>>> torch.equal(lens.translate(resid), resid)             # zero translators: the logit lens
True

Fit on a harvest of every layer's residual, compare with the logit lens on held-out text, and
read a prompt through it:

>>> store = interp.data.harvest(model, corpus, "blocks.*.resid_post", "out/")  # doctest: +SKIP
>>> tuned = TunedLens.fit(model, store, steps=250)                            # doctest: +SKIP
>>> tuned.kl_per_layer(model, held_out_texts).plot()                          # doctest: +SKIP
>>> interp.logit_lens(model, "The capital of France is", lens=tuned).plot()   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from torch import nn

from .hooks import NonFiniteError, partial_run
from .hooks.checks import is_int
from .model import Gemma3
from .model.sites import block_site
from .plots import escape_token, line
from .progress import progress_bar
from .tokens import layer_labels

KIND = "TunedLens"
FORMAT = "interp-tuned-lens-1"


class TunedLensError(ValueError):
    """A tuned lens that does not fit the model or the data, or a file that is not one."""


@dataclass
class LensKL:
    """What :meth:`TunedLens.kl_per_layer` returns: the mean ``KL(final || lens)`` in nats per
    layer (the residual after layer ``i``), ``tuned [layers]`` for the tuned lens and ``logit
    [layers]`` for the plain logit lens, over ``n_tokens`` tokens. The last layer's are 0."""

    tuned: torch.Tensor
    logit: torch.Tensor
    labels: list[str]
    n_tokens: int

    def __repr__(self) -> str:
        return (f"LensKL({len(self.labels)} layers, {self.n_tokens} tokens: mean KL tuned "
                f"{float(self.tuned.mean()):.4f} vs logit lens {float(self.logit.mean()):.4f} nats)")

    def table(self) -> list[tuple[str, float, float]]:
        """``(layer label, tuned KL, logit-lens KL)`` per layer."""
        return [(label, float(t), float(g)) for label, t, g in zip(self.labels, self.tuned, self.logit)]

    def plot(self, title: str | None = None) -> go.Figure:
        """Both lenses' KL per layer (log axis)."""
        return line({"tuned lens": self.tuned.clamp_min(1e-12), "logit lens": self.logit.clamp_min(1e-12)},
                    [escape_token(label) for label in self.labels],
                    title=title or f"KL(final ‖ lens) per layer, {self.n_tokens} held-out tokens",
                    x_title="layer", y_title="KL (nats)", log_y=True)


def _kl(target_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row from the target's log-probabilities and the lens's logits."""
    return (target_logp.exp() * (target_logp - logits.float().log_softmax(-1))).sum(-1)


class TunedLens(nn.Module):
    """Translators ``weight [layers, d, d]``, ``bias [layers, d]``: the residual ``h`` after layer
    ``l`` is read as ``h + h @ weight[l].T + bias[l]`` (float32). ``config`` is the model
    configuration (a dict) it was made for; ``history`` the mean training KL per step."""

    def __init__(self, n_layers: int, d_model: int, config: dict[str, Any] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))
        self.config = dict(config) if config is not None else None
        self.history: list[float] = []
        self.site_kind = "resid_post"

    @property
    def n_layers(self) -> int:
        """Layers (one translator each)."""
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        """Width of the residual stream it reads."""
        return self.weight.shape[1]

    def extra_repr(self) -> str:
        return f"layers={self.n_layers}, d_model={self.d_model}, trained steps={len(self.history)}"

    @classmethod
    def identity(cls, model: Gemma3) -> TunedLens:
        """An untrained lens for ``model`` (zero translators: exactly the logit lens)."""
        return cls(model.cfg.n_layers, model.cfg.d_model, model.cfg.to_dict()).to(model.device)

    def check_model(self, model: Gemma3) -> None:
        """Raise :class:`TunedLensError` unless the lens has ``model``'s layers and width."""
        cfg = model.cfg
        if (cfg.n_layers, cfg.d_model) != (self.n_layers, self.d_model):
            raise TunedLensError(f"this tuned lens has {self.n_layers} layers of width {self.d_model}, but the model "
                                 f"has {cfg.n_layers} layers of width {cfg.d_model}: it was fitted for another model")

    # ------------------------------------------------------------------ applying
    def translate_layer(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual after ``layer`` (``[..., d]``) mapped by that layer's translator (float32)."""
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"layer {layer} is outside the lens's {self.n_layers} layers")
        x = h.float()
        w, b = self.weight[layer].to(x.device), self.bias[layer].to(x.device)
        return x + (x @ w.T + b)

    def translate(self, resid: torch.Tensor) -> torch.Tensor:
        """Map a stacked residual ``[layers + 1, ..., d]`` (stage 0 the embedding, stage ``i + 1``
        after layer ``i``, as :meth:`Gemma3Cache.accumulated_resid` gives it): stage 0 unchanged,
        stage ``i + 1`` through translator ``i``. Same shape and dtype as ``resid``."""
        if resid.dim() < 2 or resid.shape[0] != self.n_layers + 1 or resid.shape[-1] != self.d_model:
            raise TunedLensError(f"translate() takes the residual after every stage, [{self.n_layers + 1}, ..., "
                                 f"{self.d_model}] for this lens; got {tuple(resid.shape)}")
        x = resid[1:].float().reshape(self.n_layers, -1, self.d_model)  # [L, N, d]
        w, b = self.weight.to(x.device), self.bias.to(x.device)
        out = x + torch.baddbmm(b[:, None, :], x, w.transpose(1, 2))
        return torch.cat([resid[:1], out.reshape(resid[1:].shape).to(resid.dtype)])

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, model: Gemma3, store: Any, site_kind: str = "resid_post", *, steps: int = 250, lr: float = 1e-3,
            batch_size: int = 256, seed: int = 0, progress: bool = True) -> TunedLens:
        """Train a lens on an :class:`~interp.data.ActivationStore` holding ``blocks.*.{site_kind}``
        (every layer; the last layer's residual gives the target, the model's own output
        distribution, through ``model.unembed``). Minimises the sum over layers of the mean
        ``KL(final || lens)`` with Adam for ``steps`` steps of ``batch_size`` tokens (the store is
        read again, in a new order, when it runs out). The bias is trained in units of each
        layer's typical residual norm (so one learning rate suits layers of any scale). The
        last layer's translator is not trained. Deterministic for a given ``seed``.
        """
        cfg = model.cfg
        if not is_int(steps) or steps < 1:
            raise TunedLensError(f"steps must be a positive int, got {steps!r}")
        if not is_int(batch_size) or batch_size < 1:
            raise TunedLensError(f"batch_size must be a positive int, got {batch_size!r}")
        sites = _check_store(model, store, site_kind)
        L = cfg.n_layers
        lens = cls.identity(model)
        lens.site_kind = site_kind
        device = model.device
        weight = torch.zeros(L - 1, cfg.d_model, cfg.d_model, device=device, requires_grad=True)
        bias = torch.zeros(L - 1, cfg.d_model, device=device, requires_grad=True)  # in units of `scale`
        opt = torch.optim.Adam([weight, bias], lr=lr)
        scale: torch.Tensor | None = None
        history: list[float] = []
        bar = progress_bar(steps, "tuned lens", "step", progress)
        try:
            with torch.enable_grad():
                for batch in _aligned_batches(store, sites, batch_size, seed, device, forever=True):
                    if scale is None:  # each layer's RMS residual norm, from the first batch
                        scale = torch.stack([h.norm(dim=-1).pow(2).mean().sqrt() for h in batch[:-1]]).clamp_min(1e-6)
                    with torch.no_grad():
                        target = model.unembed(batch[-1]).float().log_softmax(-1)
                        if not bool(torch.isfinite(target).all()):
                            raise NonFiniteError("TunedLens.fit: the store's final residual gives NaN or inf logits")
                    opt.zero_grad(set_to_none=False)
                    total = 0.0
                    for layer in range(L - 1):  # separable: one backward per layer bounds the memory
                        h = batch[layer]
                        mapped = h + h @ weight[layer].T + bias[layer] * scale[layer]
                        loss = _kl(target, model.unembed(mapped)).mean()
                        loss.backward()
                        total += float(loss.detach())
                    if total != total or total in (float("inf"), float("-inf")):
                        raise NonFiniteError(f"TunedLens.fit: the loss became {total} at step {len(history)}; "
                                             "lower lr=")
                    opt.step()
                    history.append(total / max(1, L - 1))
                    bar.update(1)
                    bar.set_postfix(kl=f"{history[-1]:.4f}")
                    if len(history) >= steps:
                        break
        finally:
            bar.close()
        assert scale is not None
        with torch.no_grad():
            lens.weight[:-1] = weight.detach()
            lens.bias[:-1] = bias.detach() * scale[:, None]
        lens.history = history
        return lens

    # ------------------------------------------------------------------ evaluating
    @torch.no_grad()
    def kl_per_layer(self, model: Gemma3, data: Any, *, batch_size: int = 256, max_tokens: int | None = None) -> LensKL:
        """Mean ``KL(final || lens)`` per layer for this lens and for the plain logit lens, on
        held-out ``data``: an :class:`~interp.data.ActivationStore` with ``blocks.*.{site_kind}``
        (every harvested token, read in order) or texts (every position of each, BOS included).
        ``max_tokens`` stops early."""
        from .data.store import ActivationStore

        self.check_model(model)
        L = model.cfg.n_layers
        tuned = torch.zeros(L, dtype=torch.float64)
        logit = torch.zeros(L, dtype=torch.float64)
        n = 0
        if isinstance(data, ActivationStore):
            sites = _check_store(model, data, self.site_kind)
            batches: Iterator[list[torch.Tensor]] = _aligned_batches(data, sites, batch_size, 0, model.device,
                                                                    forever=False, shuffle=False)
        else:
            texts = [data] if isinstance(data, str) else list(data)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise TunedLensError("data must be an ActivationStore or a non-empty list of texts")
            batches = _text_batches(model, texts, self.site_kind)
        for batch in batches:
            if max_tokens is not None:
                batch = [h[:max(0, max_tokens - n)] for h in batch]
            if not batch[0].shape[0]:
                break
            target = model.unembed(batch[-1]).float().log_softmax(-1)
            for layer in range(L):
                h = batch[layer]
                logit[layer] += _kl(target, model.unembed(h)).double().sum().cpu()
                tuned[layer] += _kl(target, model.unembed(self.translate_layer(h, layer))).double().sum().cpu()
            n += batch[0].shape[0]
            if max_tokens is not None and n >= max_tokens:
                break
        if n == 0:
            raise TunedLensError("no token to evaluate on")
        tuned, logit = (tuned / n).float(), (logit / n).float()
        if not bool(torch.isfinite(tuned).all() and torch.isfinite(logit).all()):
            raise NonFiniteError("kl_per_layer: NaN or inf in the KL (non-finite residuals or translators)")
        return LensKL(tuned=tuned, logit=logit, labels=layer_labels(model.cfg)[1:], n_tokens=n)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the translators to a safetensors file, with the model configuration, the number
        of layers and the width in its metadata."""
        from safetensors.torch import save_file

        meta = {"kind": KIND, "format": FORMAT, "n_layers": str(self.n_layers), "d_model": str(self.d_model),
                "site_kind": self.site_kind, "config": json.dumps(self.config), "steps": str(len(self.history))}
        save_file({"weight": self.weight.detach().float().cpu().contiguous(),
                   "bias": self.bias.detach().float().cpu().contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Gemma3 | None = None) -> TunedLens:
        """Read a lens written by :meth:`save`. With ``model``, refuse a lens of another shape
        (:class:`TunedLensError`), warn when the rest of its configuration differs, and put the
        lens on the model's device."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if meta.get("kind") != KIND:
                    raise TunedLensError(f"{path.name} is not a tuned lens file (its metadata has kind="
                                         f"{meta.get('kind')!r}, expected {KIND!r})")
                if keys != {"weight", "bias"}:
                    raise TunedLensError(f"{path.name} holds tensors {sorted(keys)}; a tuned lens has weight and bias")
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        except (SafetensorError, OSError) as e:
            raise TunedLensError(f"{path} is not a readable safetensors file ({e})") from None
        try:
            n_layers, d_model = int(meta["n_layers"]), int(meta["d_model"])
            config = json.loads(meta.get("config", "null"))
        except (KeyError, ValueError) as e:
            raise TunedLensError(f"{path.name} has damaged metadata ({e})") from None
        if tuple(weight.shape) != (n_layers, d_model, d_model) or tuple(bias.shape) != (n_layers, d_model):
            raise TunedLensError(f"{path.name}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not match "
                                 f"the {n_layers} layers of width {d_model} its metadata names")
        lens = cls(n_layers, d_model, config)
        lens.site_kind = meta.get("site_kind", "resid_post")
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias)
        if model is not None:
            lens.check_model(model)
            if config is not None and config != model.cfg.to_dict():
                diff = sorted(k for k in set(config) | set(model.cfg.to_dict())
                              if config.get(k) != model.cfg.to_dict().get(k))
                warnings.warn(f"{path.name} was fitted on a model whose configuration differs in {diff}",
                              UserWarning, stacklevel=2)
            lens = lens.to(model.device)
        return lens


# ---------------------------------------------------------------------- data
def _check_store(model: Gemma3, store: Any, site_kind: str) -> list[str]:
    """The store's sites for every layer's ``site_kind``, checked against the model."""
    from .data.harvest import model_fingerprint
    from .data.store import ActivationStore

    if not isinstance(store, ActivationStore):
        raise TunedLensError(f"a tuned lens is fitted on an ActivationStore, got {type(store).__name__}")
    sites = [block_site(i, site_kind) for i in range(model.cfg.n_layers)]
    missing = [s for s in sites if s not in store.sites]
    if missing:
        raise TunedLensError(f"the store lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: a tuned lens needs "
                             f"every layer's residual; harvest 'blocks.*.{site_kind}'")
    dims = {tuple(store.manifest["sites"][s]["dims"]) for s in sites}
    if dims != {(model.cfg.d_model,)}:
        raise TunedLensError(f"the store's {site_kind} has dims {sorted(dims)}, the model's residual is "
                             f"[{model.cfg.d_model}]: it was harvested from another model")
    fingerprint = store.manifest.get("model", {}).get("fingerprint")
    if fingerprint and fingerprint != model_fingerprint(model):
        warnings.warn("the store was harvested from a model with other weights (or another dtype) than this one; "
                      "the lens's targets come from the store", UserWarning, stacklevel=3)
    return sites


def _aligned_batches(store: Any, sites: Sequence[str], batch_size: int, seed: int, device: Any, *,
                     forever: bool, shuffle: bool = True) -> Iterator[list[torch.Tensor]]:
    """Batches ``[batch, d]`` of every site for the same tokens (float32 on ``device``).

    ``ActivationStore.batches`` draws its order from ``seed`` and the shards' sizes only, which
    every site shares, so one iterator per site yields the same tokens in step."""
    epoch = 0
    while True:
        streams = [store.batches(s, batch_size, shuffle=shuffle, seed=seed + epoch, device=device,
                                 dtype=torch.float32) for s in sites]
        empty = True
        for batch in zip(*streams):
            empty = False
            yield list(batch)
        if empty:
            raise TunedLensError("the store holds no token")
        if not forever:
            return
        epoch += 1


def _text_batches(model: Gemma3, texts: Sequence[str], site_kind: str) -> Iterator[list[torch.Tensor]]:
    """Every position of each text: the residual after each layer, ``[seq, d]`` per layer."""
    names = block_site("*", site_kind)
    for text in texts:
        with partial_run():  # no logits needed: stop after the last layer
            _, cache = model.run_with_cache(text, names=names, dtype=torch.float32, stop_at_layer=model.cfg.n_layers)
        yield [cache[block_site(i, site_kind)][0] for i in range(model.cfg.n_layers)]


__all__ = ["TunedLens", "TunedLensError", "LensKL"]

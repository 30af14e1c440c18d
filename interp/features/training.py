"""Training sparse dictionaries: JumpReLU SAEs (the Gemma Scope recipe), TopK SAEs (Gao et al.
2024), transcoders of either kind, and cross-layer transcoders (``kind="clt"``), from an
:class:`~interp.data.ActivationStore` or tensors.

``train(source, kind, d_sae=, steps=, seed=, **options)`` returns a dictionary of
:mod:`interp.features.dictionary` that works on the raw activations (whatever normalisation the
training used is folded back into the weights), with unit-norm decoder rows, ``site`` (and
``site_out``) set when the source names them, and a :class:`TrainingLog` as ``.training_log``.

Sources:

- ``(store, site)``: an SAE on one harvested site (``store.batches``, shuffled per epoch);
- ``(store, site_in, site_out)``: a :class:`~interp.features.dictionary.Transcoder` reading
  ``site_in`` and predicting ``site_out`` (e.g. ``blocks.L.pre_mlp_norm`` -> ``blocks.L.post_mlp_norm``);
- a tensor ``[n, d_in]`` (an SAE) or a pair of tensors ``(x_in [n, d_in], x_out [n, d_out])`` (a
  transcoder), shuffled per epoch;
- ``kind="clt"``: the store itself, holding ``blocks.L.pre_mlp_norm`` and ``blocks.L.post_mlp_norm``
  of every layer ``L`` of the harvested model (all read in step), or ``(inputs, outputs)``: two lists
  with one ``[n, d_model]`` tensor per layer. ``d_sae`` is then the features *per layer*.

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

- ``"clt"`` (a :class:`~interp.features.clt.CrossLayerTranscoder`): layer ``i``'s features read
  its MLP input ``x_i`` and write every MLP output ``o >= i``; the loss is the squared error of
  every layer's MLP output, summed over the layers (each layer normalised on its own, so each
  counts alike), plus a sparsity term. JumpReLU by default (the estimators above), with the
  sparsity penalty of Anthropic's "Circuit Tracing" (Ameisen et al. 2025):
  ``lambda * sum_i sum_f tanh(c * ||W_dec_{i,f}|| * f_{i,f})`` where ``||W_dec_{i,f}||`` is the norm
  of feature ``f``'s decoder vectors to all its output layers *concatenated*,
  ``sqrt(sum_{o >= i} ||W_dec_{i,f,o}||^2)``, and ``c`` is ``tanh_scale`` (4.0). Why that form: it
  is the one the paper writes down; it weighs a feature by the norm of everything it writes, so
  the penalty cannot be dodged by shrinking the decoder and growing the activation (the decoder
  is left free, no unit-norm constraint), and it does not depend on how the write is split over
  the layers. The summed form ``sum_o ||W_dec_{i,f,o}||`` (an L1 over output layers) would in
  addition push each feature to write to fewer layers, which is a different objective; we did
  not find the exact form of Gemma Scope 2's CLT penalty published, so this module does not
  claim to reproduce it. ``tanh`` makes the penalty count large activations about once (L0-like)
  and small ones in proportion (L1-like). At the end each feature's concatenated decoder is
  rescaled to unit norm, the factor moved into its encoder column, bias and threshold (the
  outputs do not change). With ``k=`` (an int) the CLT is TopK instead: the ``k`` largest
  pre-activations *of each layer* fire, AuxK as above (per layer), and each feature's
  concatenated decoder is kept at unit norm throughout; no sparsity penalty. ``skip=True`` adds
  an affine skip ``x_o W_skip_o`` per layer. Unit norms are in the normalised units of training
  (``training_log.scale_out[o]`` per output layer converts).

SAEs and transcoders: ``W_dec`` rows random unit vectors, ``W_enc = W_dec.T`` (a random matrix
with unit columns when ``d_in != d_out``), ``b_dec`` the data mean (of the target), ``b_enc = 0``; after every step the
decoder rows go back to unit norm (their gradient's component along the row is removed first).
Squared errors are summed over the width and averaged over the batch.

Options (keywords): ``batch_size`` (4096), ``lr`` (2e-3 JumpReLU, 2e-4 TopK), ``betas``,
``lr_warmup_steps`` (0), ``lr_decay_steps`` (0: the lr falls linearly to 0 over the last that many
steps), ``normalize`` (True: scale the input, and separately a transcoder's output, by a scalar so
that ``E||x||^2 = d``, as Gemma Scope does; the factor is folded into the returned weights, so the
dictionary reads raw activations), ``init_rows`` (65536: rows for the normalisation factor and the
mean), ``skip`` (a transcoder with a learned affine skip ``x W_skip``; False), ``dead_tokens`` (a
feature that has not fired for more tokens is dead: reported, and AuxK's), ``device`` (default: the
tensor's, or ``"cpu"`` for a store), ``progress`` (a progress bar with loss, L0 and explained
variance), ``log_every``; JumpReLU: ``sparsity_coefficient`` (1.0), ``l0`` (None: a target L0;
the coefficient then starts at ``sparsity_coefficient`` and, after the warm-up, a controller
multiplies it by ``exp(0.01 * log(L0_batch / l0))`` every step, so the L0 settles near the target),
``warmup_steps`` (a tenth of ``steps``), ``bandwidth`` (0.05) and ``initial_threshold`` (0.1), both
in the units of the normalised data, where a unit-norm encoder column's pre-activation has a
spread of about 1; TopK: ``k`` (``min(32, d_sae)``), ``k_aux`` (``d_in // 2``), ``aux_coefficient``
(1/32). A CLT takes JumpReLU's options and ``tanh_scale`` (4.0), or with ``k=`` TopK's; ``l0`` and
``k`` count features per layer (the log's ``l0`` too: the mean over layers), and its log also has
``sparsity_loss`` (the penalty before ``lambda``); ``scale_in``/``scale_out`` are per layer.

Memory: before allocating anything, the parameters, their gradients, Adam's two moments and one
batch's tensors are estimated and compared with the device's free memory; a run that would need
more than 80% of it is refused (:class:`TrainingError`) naming the largest ``d_sae`` that fits at
that ``batch_size``.

Warnings: when the run ends with more than half the features dead, or with an L0 more than 1.5x
away from ``l0`` (either way), :func:`train` warns (``UserWarning``) and adds the sentence to
``training_log.warnings``.

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

A CLT over three layers from per-layer tensors (an ``ActivationStore`` of a model's
``blocks.*.pre_mlp_norm`` and ``blocks.*.post_mlp_norm`` trains the same way: ``train(store, "clt", ...)``):

>>> xs, ys = [torch.randn(512, 8) for _ in range(3)], [torch.randn(512, 8) for _ in range(3)]
>>> clt = train((xs, ys), "clt", d_sae=16, steps=10, batch_size=128, skip=True, progress=False)
>>> clt.widths, clt.has_skip, len(clt.training_log.scale_out), [tuple(y.shape) for y in clt(xs)]
([16, 16, 16], True, 3, [(512, 8), (512, 8), (512, 8)])
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal, overload

import torch

from ..hooks.checks import is_int, is_number
from ..model.memory import available_memory, format_bytes
from ..progress import progress_bar
from .checkpoints import FORMAT, load_checkpoint, save_checkpoint
from .clt import CrossLayerTranscoder
from .dictionary import Dictionary
from .sources import Source, TrainingError, make_clt_source, make_source
from .trainer import Trainer, TrainingLog
from .trainer_clt import CLTTrainer

KINDS = ("jumprelu", "topk", "clt")

COMMON = {"batch_size": 4096, "lr": None, "betas": None, "lr_warmup_steps": 0, "lr_decay_steps": 0,
          "normalize": True, "init_rows": 65536, "skip": False, "dead_tokens": 1_000_000, "log_every": None}
PER_KIND: dict[str, dict[str, Any]] = {
    "jumprelu": {"sparsity_coefficient": 1.0, "l0": None, "warmup_steps": None, "bandwidth": 0.05,
                 "initial_threshold": 0.1},
    "topk": {"k": None, "k_aux": None, "aux_coefficient": 1 / 32},
}
# a CLT takes its activation's options; k= (an int) makes it TopK. tanh_scale is c in tanh(c ||W_dec|| f)
CLT_JUMPRELU = {"tanh_scale": 4.0}
# the largest share of the free memory a run may plan to use (the rest: the data, Python, the OS)
MEMORY_SHARE = 0.8
DEFAULT_BETAS = {"jumprelu": (0.0, 0.999), "topk": (0.9, 0.999)}
# JumpReLU learns log(threshold) with Adam, whose steps are about lr each: at 2e-4 the threshold can
# grow by e^(2e-4 * steps), 2.2x in 4,000 steps, far short of the pre-activations' scale (~1 on the
# normalised data), so short runs kept almost every feature on. 2e-3 lets it travel e^8 in 4,000 steps.
DEFAULT_LR = {"jumprelu": 2e-3, "topk": 2e-4}




# ---------------------------------------------------------------------- settings
def _check_int(name: str, value: Any, low: int) -> int:
    if not is_int(value) or value < low:
        raise TrainingError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_float(name: str, value: Any, low: float, strict: bool = True) -> float:
    if not is_number(value) or not math.isfinite(value) or (
            value <= low if strict else value < low):
        raise TrainingError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _activation(kind: str, options: dict[str, Any]) -> str:
    """The activation a kind trains: its own, or for a CLT TopK when ``k=`` is given, else JumpReLU."""
    if kind != "clt":
        return kind
    return "topk" if options.get("k") is not None else "jumprelu"


def _settings(kind: Any, d_sae: Any, steps: Any, seed: Any, src: Source, options: dict[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise TrainingError(f"unknown kind {kind!r}; train knows {', '.join(repr(k) for k in KINDS)}")
    _check_int("d_sae", d_sae, 1)
    _check_int("steps", steps, 1)
    _check_int("seed", seed, 0)
    act = _activation(kind, options)
    known = {**COMMON, **PER_KIND[act], **(CLT_JUMPRELU if kind == "clt" and act == "jumprelu" else {})}
    unknown = [k for k in options if k not in known]
    if unknown:
        other = [k for k in unknown if any(k in PER_KIND[o] for o in PER_KIND) or k in CLT_JUMPRELU]
        if kind == "clt":
            hint = (f" ({', '.join(other)} belong to a {'JumpReLU CLT (no k=)' if act == 'topk' else 'TopK CLT (k=)'})"
                    if other else "")
        else:
            hint = f" ({', '.join(other)} belong to another kind)" if other else ""
        if act == "topk" and "l0" in unknown:
            hint += f"; a TopK {'CLT' if kind == 'clt' else 'SAE'}'s L0 is k (k=...)"
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for kind {kind!r}{hint}; the options are "
                        f"{', '.join(sorted(known))}")
    s: dict[str, Any] = {**known, **options}
    batch = _check_int("batch_size", s["batch_size"], 1)
    s["batch_size"] = min(batch, src.n)  # fewer vectors than a batch: one batch of them all
    s["lr"] = s["lr"] if s["lr"] is not None else DEFAULT_LR[act]
    _check_float("lr", s["lr"], 0.0)
    betas = s["betas"] if s["betas"] is not None else DEFAULT_BETAS[act]
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
    if act == "jumprelu":
        if kind == "clt":
            _check_float("tanh_scale", s["tanh_scale"], 0.0)
        _check_float("sparsity_coefficient", s["sparsity_coefficient"], 0.0, strict=False)
        s["warmup_steps"] = _check_int("warmup_steps", s["warmup_steps"] if s["warmup_steps"] is not None
                                       else steps // 10, 0)
        if s["l0"] is not None:
            s["l0"] = _check_float("l0", s["l0"], 0.0)
            if s["l0"] >= d_sae:
                raise TrainingError(f"l0={s['l0']} must be below d_sae={d_sae} (features firing per token)")
        _check_float("bandwidth", s["bandwidth"], 0.0)
        _check_float("initial_threshold", s["initial_threshold"], 0.0)
    else:
        k = s["k"] if s["k"] is not None else min(32, d_sae)
        if not is_int(k) or not 1 <= k <= d_sae:
            raise TrainingError(f"k must be an int in 1..d_sae={d_sae}, got {k!r}")
        s["k"] = k
        k_aux = s["k_aux"] if s["k_aux"] is not None else max(1, min(d_sae, src.d_in // 2))
        if not is_int(k_aux) or not 1 <= k_aux <= d_sae:
            raise TrainingError(f"k_aux must be an int in 1..d_sae={d_sae}, got {k_aux!r}")
        s["k_aux"] = k_aux
        _check_float("aux_coefficient", s["aux_coefficient"], 0.0, strict=False)
    for key in ("lr", "sparsity_coefficient", "bandwidth", "initial_threshold", "aux_coefficient", "tanh_scale"):
        if key in s:
            s[key] = float(s[key])
    extra = {"activation": act, "n_layers": src.n_layers} if kind == "clt" else {}
    return {"format": FORMAT, "kind": kind, **extra, "transcoder": src.transcoder, "d_sae": d_sae, "steps": steps,
            "seed": seed, **dict(sorted(s.items())), "source": src.describe()}


# ---------------------------------------------------------------------- memory
def _memory_needed(settings: dict[str, Any], src: Source, d_sae: int) -> int:
    """Bytes a run plans to hold: every parameter four times (itself, its gradient, Adam's two
    moments; float32) and one batch's tensors (inputs, targets, reconstruction, errors; the
    pre-activations, activations and their gradients), per layer for a CLT."""
    d_in, d_out, batch = src.d_in, src.d_out, settings["batch_size"]
    if settings["kind"] == "clt":
        L = src.n_layers
        params = L * (d_in * d_sae + 2 * d_sae + d_out) + d_sae * d_out * L * (L + 1) // 2
        params += L * d_in * d_out if settings["skip"] else 0
        per_row = L * (3 * d_in + 4 * d_out + 8 * d_sae)
    else:
        params = d_in * d_sae + d_sae * d_out + 2 * d_sae + d_out + (d_in * d_out if settings["skip"] else 0)
        per_row = 3 * d_in + 4 * d_out + 8 * d_sae
    return 4 * (4 * params + batch * per_row)


def _check_memory(settings: dict[str, Any], src: Source, device: torch.device) -> None:
    """Refuse a run whose parameters, optimiser state and batch would not fit in the device's free
    memory, naming the largest ``d_sae`` that would (at this ``batch_size``)."""
    free = available_memory(device)
    if free is None:
        return
    budget = int(MEMORY_SHARE * free)
    need = _memory_needed(settings, src, settings["d_sae"])
    if need <= budget:
        return
    lo, hi = 0, settings["d_sae"]  # the largest d_sae that fits: need grows with d_sae
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _memory_needed(settings, src, mid) <= budget else (lo, mid - 1)
    what = f"a CLT of {settings['d_sae']:,} features per layer over {src.n_layers} layers" if settings[
        "kind"] == "clt" else f"{settings['d_sae']:,} features"
    fits = (f"d_sae={lo:,} fits at batch_size={settings['batch_size']:,}" if lo >= 1 else
            "not even d_sae=1 fits at this batch_size: lower batch_size")
    raise TrainingError(f"training {what} needs about {format_bytes(need)} on {device} (parameters, gradients, "
                        f"Adam's state and a batch), more than {MEMORY_SHARE:.0%} of the {format_bytes(free)} free: "
                        f"{fits}, or lower batch_size, or train on a device with more memory")


# ---------------------------------------------------------------------- train
@overload
def train(source: Any, kind: Literal["clt"], *, d_sae: int, steps: int, seed: int = 0,
          device: str | torch.device | None = None, progress: bool = True,
          checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
          **options: Any) -> CrossLayerTranscoder: ...


@overload
def train(source: Any, kind: Literal["jumprelu", "topk"] = "jumprelu", *, d_sae: int, steps: int, seed: int = 0,
          device: str | torch.device | None = None, progress: bool = True,
          checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
          **options: Any) -> Dictionary: ...


@torch.enable_grad()  # works inside torch.no_grad() / set_grad_enabled(False), as notebooks often are
def train(source: Any, kind: str = "jumprelu", *, d_sae: int, steps: int, seed: int = 0,
          device: str | torch.device | None = None, progress: bool = True,
          checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
          **options: Any) -> Dictionary | CrossLayerTranscoder:
    """Train a ``kind`` dictionary (``"jumprelu"``, ``"topk"`` or ``"clt"``) of ``d_sae`` features
    (per layer for a CLT) for ``steps`` steps (one batch each) on ``source``; see the module
    docstring for the sources, the recipes and the options. Deterministic for a ``seed`` (on CPU).
    Returns a :class:`~interp.features.dictionary.JumpReLUSAE`,
    :class:`~interp.features.dictionary.TopKSAE`, :class:`~interp.features.dictionary.Transcoder`
    (frozen parameters, unit-norm decoder rows) or
    :class:`~interp.features.clt.CrossLayerTranscoder` (``kind="clt"``: JumpReLU, or TopK with
    ``k=``) whose ``training_log`` is a :class:`TrainingLog`.

    Raises :class:`TrainingError` (a ValueError) for bad arguments, a source of the wrong shape (a
    CLT's store lacking a layer's site, layers of unequal widths), a run that would not fit in
    memory or a checkpoint written with other settings, ``TypeError`` for an unknown option or source type,
    and :class:`~interp.hooks.NonFiniteError` for NaN or inf in the data (naming where) or a
    diverging run.
    """
    src = make_clt_source(source) if kind == "clt" else make_source(source)
    settings = _settings(kind, d_sae, steps, seed, src, options)
    dev = torch.device(device) if device is not None else src.device
    _check_memory(settings, src, dev)
    if checkpoint_every is not None:
        _check_int("checkpoint_every", checkpoint_every, 1)
        if checkpoint_dir is None:
            raise TrainingError("checkpoint_every needs checkpoint_dir")
    every = checkpoint_every or max(1, steps // 10)
    trainer = CLTTrainer(settings, src, dev) if kind == "clt" else Trainer(settings, src, dev)  # type: ignore[arg-type]
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    loaded = load_checkpoint(folder, settings) if folder is not None else None
    start = 0
    if loaded is not None:
        start, tensors, records = loaded
        trainer.load(tensors, records)
    else:
        trainer.initialise()
    batch, log_every = settings["batch_size"], settings["log_every"]
    per_epoch = src.n // batch
    label = f"train {settings['activation']} CLT" if kind == "clt" else f"train {kind}{' transcoder' * src.transcoder}"
    bar = progress_bar(steps, label, "step", progress,
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
                    save_checkpoint(folder, settings, trainer, t)
            epoch += 1
    finally:
        bar.close()
    d = trainer.dictionary()
    log = TrainingLog(kind, settings, trainer.scale_in.tolist(), trainer.scale_out.tolist(), list(trainer.records),
                      trainer.warnings())
    for w in log.warnings:
        warnings.warn(w, stacklevel=2)
    setattr(d, "training_log", log)  # noqa: B010 (a plain attribute; nn.Module's __setattr__ types say tensors)
    return d


__all__ = ["train", "TrainingLog", "TrainingError", "KINDS"]

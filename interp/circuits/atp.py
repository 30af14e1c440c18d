"""The gradient runs behind attribution patching (:mod:`interp.attribution`): the metric of a
batch, gradients of it at many sites for a batch of inputs, and the estimates built from them.

- :func:`metric_run`: how a prepared pair's metric is computed from a forward (only the logits
  it reads), as one value per batch row.
- :func:`grad_rows`: gradients of the summed metric at named sites for a batch of inputs (token
  ids or embeddings), in chunks under a memory budget, with an optional *GradDrop* per row: row
  ``i`` gets its gradient through layer ``drop[i]``'s residual contributions (the outputs of
  ``post_attn_norm`` and ``post_mlp_norm``) set to zero.
- :func:`linear_estimates`: ``(clean - corrupt) . grad`` per sweep cell, one row per gradient row.
- :func:`ig_grads`: the integrated-gradients mean gradient (embeddings interpolated from the
  corrupt run, alpha 0, towards the clean run; left Riemann sum).

>>> from interp.model import Gemma3, Gemma3Config
>>> from interp.metrics import logit_diff
>>> from interp.patching import prepare_pair
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=16, n_heads=2, n_kv_heads=1,
...     d_head=8, vocab_size=20), seed=0)
>>> pair = prepare_pair(m, [2, 5, 7], [2, 6, 7], logit_diff(3, 4), ["embed"], ["embed"])
>>> g = grad_rows(m, pair, pair.corrupt_ids.expand(3, -1), ["blocks.1.resid_pre"], drop=[None, 0, 1])
>>> g["blocks.1.resid_pre"].shape, bool(torch.equal(g["blocks.1.resid_pre"][0], g["blocks.1.resid_pre"][1]))
(torch.Size([3, 3, 16]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from ..hooks.checks import is_int
from ..model import Gemma3
from ..model.layers import Block
from ..model.sites import block_site
from ..patching import PromptPair, site_of
from ..patching.experiments import default_max_bytes, row_bytes


def layer_block(model: Gemma3, layer: int) -> Block:
    """Decoder layer ``layer`` of ``model`` (typed)."""
    return cast(Block, model.blocks[layer])


def metric_run(model: Gemma3, pair: PromptPair) -> tuple[dict[str, Any], Callable[[torch.Tensor], torch.Tensor]]:
    """``(forward keywords, values)``: run the model with the keywords, then ``values(out)`` gives
    the metric per row ``[batch]`` (only the logits the metric reads are computed)."""
    metric, seq, needed = pair.metric, pair.seq, pair.needed
    if pair.vocab_selected:
        def values(out: torch.Tensor) -> torch.Tensor:
            return metric.from_selected(model.unembed(out[:, needed], metric.token_ids), seq, True)

        return {"stop_at_layer": model.cfg.n_layers}, values
    kwargs: dict[str, Any] = {"logits_at": needed} if metric.positions is not None else {}
    return kwargs, lambda out: metric.from_selected(out, seq, False)


def backward_row_bytes(model: Gemma3, seq: int, k: int) -> int:
    """Estimated peak bytes of one row of a forward-backward (every activation kept for backward)."""
    return 4 * row_bytes(model, seq, seq, k)


def grad_rows(model: Gemma3, pair: PromptPair, inputs: torch.Tensor, names: Sequence[str], *,
              drop: Sequence[int | None] | None = None, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the metric at ``names``, one row per row of ``inputs`` (token ids ``[R, seq]``
    or embeddings ``[R, seq, d]``): ``{name: [R, *site shape]}`` in float32. ``drop[i]`` (a layer,
    or None) zeroes row i's gradient through that layer's residual contributions (GradDrop)."""
    rows = inputs.shape[0]
    kwargs, values = metric_run(model, pair)
    limit = max_bytes if max_bytes is not None else default_max_bytes(model)
    cap = max(1, limit // backward_row_bytes(model, pair.seq, len(pair.needed)))
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, rows, cap):
        chunk = inputs[start:start + cap]
        hooks: dict[str, Callable] = {}
        if drop is not None:
            part = list(drop[start:start + cap])
            for layer in sorted({d for d in part if d is not None}):
                mask = torch.tensor([d != layer for d in part], device=model.device)
                hooks[block_site(layer, "post_attn_norm")] = _zero_rows(mask)
                hooks[block_site(layer, "post_mlp_norm")] = _zero_rows(mask)
        with model.backward_hooks(hooks):
            _, _, grads = model.run_with_grads(chunk, lambda o: values(o).sum(), list(names), **kwargs)
        for n in names:
            out[n].append(grads[n].float())
    return {n: torch.cat(v) for n, v in out.items()}


def _zero_rows(keep: torch.Tensor) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def fn(grad: torch.Tensor, site: Any) -> torch.Tensor:
        return grad * keep.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype)

    return fn


def ig_grads(model: Gemma3, pair: PromptPair, names: Sequence[str], steps: int,
             max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Integrated gradients: the mean over ``alpha = k / steps`` (``k = 0 .. steps - 1``) of the
    gradients at ``names`` when the embeddings are ``corrupt + alpha (clean - corrupt)``:
    ``{name: [1, *site shape]}``. ``steps=1`` is the gradient of the corrupt run (AtP).
    Needs ``embed`` in both of the pair's caches."""
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive integer (1 = plain attribution patching), got {steps!r}")
    lo = pair.corrupt_cache["embed"].float()
    hi = pair.clean_cache["embed"].float()
    total: dict[str, torch.Tensor] = {}
    limit = max_bytes if max_bytes is not None else default_max_bytes(model)
    cap = max(1, limit // backward_row_bytes(model, pair.seq, len(pair.needed)))
    for start in range(0, steps, cap):
        alphas = torch.arange(start, min(steps, start + cap), dtype=torch.float32, device=lo.device) / steps
        embeds = (lo + alphas.view(-1, 1, 1) * (hi - lo)).to(model.dtype)
        grads = grad_rows(model, pair, embeds, names, max_bytes=limit)
        for n, g in grads.items():
            s = g.sum(0, keepdim=True)
            total[n] = s if n not in total else total[n] + s
    return {n: g / steps for n, g in total.items()}


def linear_estimates(model: Gemma3, pair: PromptPair, kinds: Sequence[str],
                     grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``(clean - corrupt) . grad`` of every cell of each sweep: ``{kind: [R, *cell shape]}`` for
    gradients of ``R`` rows (summed over ``d`` at one position; over the head dimension, and
    positions for ``attn.z``)."""
    out = {}
    for kind in kinds:
        site = site_of(kind)
        per_layer = []
        for layer in range(model.cfg.n_layers):
            name = block_site(layer, site)
            delta = pair.clean_cache[name][0].float() - pair.corrupt_cache[name][0].float()
            prod = delta[None] * grads[name].float()  # [R, seq, (heads,) d]
            per_pos = prod.sum(-1)
            if site == "attn.z":  # [R, seq, heads]
                per_layer.append(per_pos.sum(1) if kind == "attn.z" else per_pos.transpose(1, 2))
            else:
                per_layer.append(per_pos)
        out[kind] = torch.stack(per_layer, 1).cpu()
    return out


def own_layer(kind: str) -> bool:
    """Whether a sweep's cells are a layer's component (its own layer is left out of GradDrop's mean)."""
    return kind in ("attn.z", "attn.z_by_pos", "attn.out", "mlp.out")


def graddrop_magnitudes(kind: str, per_drop: torch.Tensor) -> torch.Tensor:
    """GradDrop's score from estimates ``[L, layers, ...]`` (row ``l``: gradient through layer ``l``
    dropped): the mean of ``|estimate|`` over ``l``, leaving out a component's own layer (whose
    drop removes the component itself: the paper's ``1 / (L - 1)``)."""
    mags = per_drop.abs()
    n = mags.shape[0]
    if not own_layer(kind) or n < 2:
        return mags.mean(0)
    eye = torch.eye(n, dtype=torch.bool).view(n, n, *([1] * (mags.dim() - 2)))
    return mags.masked_fill(eye, 0.0).sum(0) / (n - 1)


__all__ = ["layer_block", "metric_run", "grad_rows", "ig_grads", "linear_estimates", "graddrop_magnitudes",
           "backward_row_bytes"]

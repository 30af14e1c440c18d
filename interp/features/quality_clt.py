"""How good is a cross-layer transcoder: per layer, and for the model as a whole.

:func:`evaluate_clt` (also reached through :func:`interp.features.evaluate`) reads every layer's
MLP input and output from an :class:`~interp.data.ActivationStore` and reports, per layer ``i``:
the L0 of layer ``i``'s features, and the FVU of MLP output ``i`` as the CLT reconstructs it from
the features of layers ``0..i`` (the metrics of :mod:`.quality`, layer by layer). The loss is
measured once for the whole model: clean, with every MLP output replaced by the CLT's
reconstruction, and with every MLP output zero-ablated, and **CE loss recovered** from these.

>>> result = evaluate(model, clt, store)                       # doctest: +SKIP
>>> result.layers[3].fvu, result.ce_recovered                  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..hooks import zero_ablate
from ..model import Gemma3
from ..progress import progress_bar
from .clt import CrossLayerTranscoder
from .interventions import clt_hooks
from .quality_base import FeatureEval, aligned_batches, lm_effect, recovered
from .quality_base import format_value as fmt


@dataclass
class CLTEval:
    """:func:`evaluate_clt`'s result: one :class:`FeatureEval` per layer (its ``l0`` and
    ``frequency`` are layer ``i``'s features, its ``fvu`` that of MLP output ``i``) and the
    whole-model loss (None when not evaluated)."""

    layers: list[FeatureEval]
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero: float | None = None
    ce_tokens: int = 0
    name: str = ""

    @property
    def l0(self) -> float:
        """Active features per token, all layers together."""
        return sum(e.l0 for e in self.layers)

    @property
    def ce_recovered(self) -> float | None:
        """``(CE_zero - CE_spliced) / (CE_zero - CE_clean)`` over the whole spliced model."""
        return recovered(self.ce_zero, self.ce_clean, self.ce_spliced)

    def table(self) -> list[tuple[Any, ...]]:
        """``[(layer, L0, FVU, dead features), ...]`` with a header row."""
        return [("layer", "L0", "FVU", "dead")] + [(i, e.l0, e.fvu, e.n_dead) for i, e in enumerate(self.layers)]

    def __repr__(self) -> str:
        lines = [f"CLTEval  {self.name}".rstrip(), f"  {'layer':>5} {'L0':>10} {'FVU':>10} {'dead':>8}"]
        lines += [f"  {i:>5} {fmt(e.l0):>10} {fmt(e.fvu):>10} {e.n_dead:>8,}" for i, e in enumerate(self.layers)]
        lines.append(f"  total L0 {fmt(self.l0)}")
        if self.ce_clean is not None:
            lines.append(f"  CE clean {fmt(self.ce_clean)}, spliced {fmt(self.ce_spliced)}, zero-ablated "
                         f"{fmt(self.ce_zero)}, recovered {fmt(self.ce_recovered)} ({self.ce_tokens:,} tokens)")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_clt(model: Gemma3, clt: CrossLayerTranscoder, store: Any, *, texts: Sequence[str] | None = None,
                 max_tokens: int | None = None, ce_tokens: int | None = 1 << 16, batch_size: int = 4096,
                 lm_batch_size: int = 8, dense_threshold: float = 0.1, ce: bool = True, progress: bool = True,
                 name: str = "") -> CLTEval:
    """Evaluate ``clt`` on ``store``, which must hold every layer's ``pre_mlp_norm`` and
    ``post_mlp_norm`` (keywords as :func:`interp.features.evaluate`)."""
    clt.check_fits(model)
    sites = [*clt.sites_in, *clt.sites_out]
    missing = [s for s in sites if s not in store.manifest["sites"]]
    if missing:
        raise KeyError(f"a CLT is evaluated on every layer's MLP input and output; this store lacks {missing[:4]}"
                       f"{'...' if len(missing) > 4 else ''}: harvest 'blocks.*.pre_mlp_norm' and "
                       "'blocks.*.post_mlp_norm'")
    n_layers = clt.n_layers
    device, acc = clt.device, torch.float64 if clt.device.type != "mps" else torch.float32
    limit = max_tokens if max_tokens is not None else store.manifest["n_tokens"]
    count = [torch.zeros(w, dtype=torch.long, device=device) for w in clt.widths]
    err = [0.0] * n_layers
    sum_x = [torch.zeros(clt.d_model, dtype=acc, device=device) for _ in range(n_layers)]
    sum_x2 = [0.0] * n_layers
    n = 0
    bar = progress_bar(limit, "evaluate CLT", "tok", progress)
    try:
        for batch in aligned_batches(store, sites, batch_size, device, clt.dtype):
            if n >= limit:
                break
            take = min(batch[0].shape[0], limit - n)
            xs = [b[:take].reshape(take, -1) for b in batch[:n_layers]]
            acts = [clt.encode(i, x) for i, x in enumerate(xs)]
            for o in range(n_layers):
                recon = clt.decode(acts, o)
                skip = clt.skip(o, xs[o])
                recon = recon if skip is None else recon + skip
                target = batch[n_layers + o][:take].reshape(take, -1).to(acc)
                err[o] += float((target - recon.to(acc)).pow(2).sum())
                sum_x[o] += target.sum(0)
                sum_x2[o] += float(target.pow(2).sum())
                count[o] += (acts[o] > 0).sum(0)
            n += take
            bar.update(take)
    finally:
        bar.close()
    if n == 0:
        raise ValueError("the store holds no tokens")
    layers = []
    for i in range(n_layers):
        variance = sum_x2[i] - float((sum_x[i] * sum_x[i]).sum()) / n
        layers.append(FeatureEval(clt.sites_in[i], clt.sites_out[i], n, clt.widths[i], float(count[i].sum()) / n,
                                  err[i] / variance if variance > 0 else math.nan, err[i] / n,
                                  (count[i].double() / n).float().cpu(), dense_threshold, name=f"layer {i}"))
    result = CLTEval(layers, name=name)
    if not ce:
        return result
    result.ce_clean, result.ce_spliced, result.ce_zero, result.ce_tokens = lm_effect(
        model, texts, store, ce_tokens, lm_batch_size, progress, clt_hooks(clt, splice=True),
        {s: zero_ablate() for s in clt.sites_out})
    return result


__all__ = ["CLTEval", "evaluate_clt"]

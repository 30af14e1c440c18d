"""Attribution patching: a linear estimate of every site's activation-patching effect.

From one clean forward (activations) and one corrupt forward-backward (activations and the
metric's gradients), the effect of patching a site with its clean value is estimated to first
order as ``(clean_act - corrupt_act) . d metric / d act`` at the corrupt run, summed over the
site's features (over ``d`` at one position; over the head dimension, and positions for
``attn.z``). Scores are normalised like actual patching, ``estimate / (m_clean - m_corrupt)``
(0 = corrupt, 1 = clean), and come back as the same :class:`~interp.patching.PatchingResult`,
so the two can be compared in one plot: ``compare(actual, estimate).plot()``.

The estimate is good for small activation differences and degrades for large ones (e.g. the
residual stream at the token that was changed, in early layers).

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> from interp.metrics import logit_diff
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=32, d_mlp=64, n_heads=2,
...     n_kv_heads=1, d_head=16, vocab_size=50), seed=0)
>>> est = attribution_patches(m, [2, 5, 7, 9], [2, 6, 7, 9], logit_diff(3, 4), ["resid_pre", "attn.z"])
>>> est["resid_pre"].values.shape, est["attn.z"].values.shape, est["resid_pre"].method
(torch.Size([2, 4]), torch.Size([2, 2]), 'attribution patching')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .metrics import Metric
from .model import Gemma3
from .patching import PatchingResult, check_sites, make_result, prepare_pair, site_of


def _estimate(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable,
              kinds: list[str]) -> dict[str, PatchingResult]:
    names = sorted({f"blocks.*.{site_of(k)}" for k in kinds})
    pair = prepare_pair(model, clean, corrupt, metric, names, names, corrupt_grads=True)
    clean_c, corrupt_c, grads = pair.clean_cache, pair.corrupt_cache, pair.corrupt_grads
    results = {}
    for kind in kinds:
        site = site_of(kind)
        per_layer = []
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.{site}"
            dt = torch.promote_types(clean_c[name].dtype, torch.float32)
            delta = (clean_c[name].to(dt) - corrupt_c[name].to(dt)) * grads[name].to(dt)
            if site == "attn.z":  # [1, seq, heads, hd]
                per_pos = delta[0].sum(-1)  # [seq, heads]
                per_layer.append(per_pos.sum(0) if kind == "attn.z" else per_pos.T)
            else:  # [1, seq, d]
                per_layer.append(delta[0].sum(-1))
        estimate = torch.stack(per_layer).cpu()
        results[kind] = make_result(pair, kind, pair.corrupt_value + estimate, "attribution patching")
    return results


def attribution_patch(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable,
                      site: str = "resid_pre") -> PatchingResult:
    """Estimated patching scores of one sweep (same names and shapes as
    :func:`~interp.patching.patch_sweep`).

    >>> est = attribution_patch(model, "The capital of France is", "The capital of Italy is",
    ...                         logit_diff(" Paris", " Rome"))  # doctest: +SKIP
    >>> compare(patch_sweep(...), est).plot()  # doctest: +SKIP
    """
    if not isinstance(site, str):
        raise TypeError(f"site= takes one sweep name; for several use attribution_patches(..., sites={site!r})")
    kinds = check_sites(site)
    return _estimate(model, clean, corrupt, metric, kinds)[kinds[0]]


def attribution_patches(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable,
                        sites: Sequence[str] = ("resid_pre", "attn.out", "mlp.out")) -> dict[str, PatchingResult]:
    """:func:`attribution_patch` of several sweeps from the same two runs: ``{name: PatchingResult}``."""
    if isinstance(sites, str):
        raise TypeError(f"sites= takes a list of sweep names; for one use attribution_patch(..., site={sites!r})")
    return _estimate(model, clean, corrupt, metric, check_sites(sites))


__all__ = ["attribution_patch", "attribution_patches"]

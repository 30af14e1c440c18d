"""Attribution patching: a gradient estimate of every site's activation-patching effect.

From one clean forward (activations) and one corrupt forward-backward (activations and the
metric's gradients), the effect of patching a site with its clean value is estimated to first
order as ``(clean_act - corrupt_act) . d metric / d act`` at the corrupt run, summed over the
site's features (over ``d`` at one position; over the head dimension, and positions for
``attn.z``). Scores are normalised like actual patching, ``estimate / (m_clean - m_corrupt)``
(0 = corrupt, 1 = clean), and come back as the same :class:`~interp.patching.PatchingResult`,
so the two can be compared in one plot: ``compare(actual, estimate).plot()``.

The estimate is good for small activation differences and degrades for large ones (e.g. the
residual stream at the token that was changed, in early layers). ``method=`` chooses a better one:

- ``"atp"`` (default): the plain linear estimate (``PatchingResult.method`` "attribution patching").
- ``"ig"``: integrated gradients along the clean-corrupt path. The *embeddings* are interpolated,
  ``corrupt + alpha (clean - corrupt)`` at ``alpha = k / steps``, ``k = 0 .. steps - 1`` (a left
  Riemann sum: ``steps=1`` is exactly AtP), run as one batch (chunked when large); each site's
  gradient is averaged over the alphas and the estimate is ``(clean - corrupt) . mean gradient``.
  Costs ``steps`` forward-backwards. Method "integrated gradients (N steps)".
- ``"atp*"``: AtP* (Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing
  LLM behaviour to components"). Its fix for attention saturation: the first attention layer that
  reads a patched activation is recomputed exactly, softmax included, and the metric is
  linearised only after it (see :mod:`interp.circuits.atp_star`). Signed values, method "atp*".
- ``graddrop=True`` (with ``"atp"`` or ``"atp*"``): AtP*'s fix for cancellation between direct
  and indirect effects. For each layer ``l`` one backward runs with the gradient through layer
  ``l``'s residual contributions (``post_attn_norm`` and ``post_mlp_norm``) set to zero; the
  score is the mean over ``l`` of ``|estimate_l|`` (leaving out a component's own layer, whose
  drop removes the component itself). These are *magnitudes* for ranking (all >= 0, not signed
  effects), method "atp* (graddrop)" / "attribution patching (graddrop)". The ``L`` backwards
  run as one batch of ``L`` corrupt rows (chunked).

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> from interp.metrics import logit_diff
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=32, d_mlp=64, n_heads=2,
...     n_kv_heads=1, d_head=16, vocab_size=50), seed=0)
>>> est = attribution_patches(m, [2, 5, 7, 9], [2, 6, 7, 9], logit_diff(3, 4), ["resid_pre", "attn.z"])
>>> est["resid_pre"].values.shape, est["attn.z"].values.shape, est["resid_pre"].method
(torch.Size([2, 4]), torch.Size([2, 2]), 'attribution patching')
>>> ig = attribution_patch(m, [2, 5, 7, 9], [2, 6, 7, 9], logit_diff(3, 4), method="ig", steps=4)
>>> ig.method, attribution_patch(m, [2, 5, 7, 9], [2, 6, 7, 9], logit_diff(3, 4), method="atp*").method
('integrated gradients (4 steps)', 'atp*')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .hooks.checks import is_int
from .metrics import Metric
from .model import Gemma3
from .model.sites import block_site
from .patching import PatchingResult, check_kinds, make_result, prepare_pair, site_of

METHODS = ("atp", "ig", "atp*")


def _label(method: str, steps: int, graddrop: bool) -> str:
    if method == "ig":
        return f"integrated gradients ({steps} step{'s' if steps != 1 else ''})"
    base = "attribution patching" if method == "atp" else "atp*"
    return f"{base} (graddrop)" if graddrop else base


def _check(method: str, steps: int | None, graddrop: bool) -> int:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(repr(m) for m in METHODS)}")
    if method != "ig" and steps is not None:
        raise ValueError(f"steps= is for method='ig' (integrated gradients), not {method!r}")
    if method == "ig" and graddrop:
        raise ValueError("graddrop=True goes with method='atp' or 'atp*', not 'ig'")
    n = 16 if steps is None else steps
    if not is_int(n) or n < 1:
        raise ValueError(f"steps must be a positive integer (1 = plain attribution patching), got {steps!r}")
    return n


def _estimate(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable, kinds: list[str],
              method: str = "atp", steps: int | None = None, graddrop: bool = False,
              max_bytes: int | None = None) -> dict[str, PatchingResult]:
    from .circuits import atp, atp_star

    n_steps = _check(method, steps, graddrop)
    n_layers = model.cfg.n_layers
    sites = sorted({site_of(k) for k in kinds})
    if method == "atp*":
        sites = sorted(set(sites) | set(atp_star.NEEDED_SITES))
    names = [block_site("*", s) for s in sites] + (["embed"] if method == "ig" else [])
    grad_names = [block_site(layer, s) for s in sites for layer in range(n_layers)]
    plain = not graddrop and method != "ig"
    pair = prepare_pair(model, clean, corrupt, metric, names, names, corrupt_grads=plain)
    if plain:
        grads = {n: pair.corrupt_grads[n].float() for n in grad_names}
    elif method == "ig":
        grads = atp.ig_grads(model, pair, grad_names, n_steps, max_bytes)
    else:
        rows = pair.corrupt_ids.expand(n_layers, -1)
        grads = atp.grad_rows(model, pair, rows, grad_names, drop=list(range(n_layers)), max_bytes=max_bytes)
    if method == "atp*":
        est = atp_star.qk_fixed_estimates(model, pair, kinds, grads, max_bytes)
    else:
        est = atp.linear_estimates(model, pair, kinds, grads)
    span = pair.clean_value - pair.corrupt_value
    label = _label(method, n_steps, graddrop)
    results = {}
    for kind in kinds:
        if graddrop:  # magnitudes, normalised: raw is set so that the result's values are them
            value = span * atp.graddrop_magnitudes(kind, est[kind] / span)
        else:
            value = est[kind][0]
        results[kind] = make_result(pair, kind, pair.corrupt_value + value, label)
    return results


def attribution_patch(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable,
                      kind: str = "resid_pre", *, method: str = "atp", steps: int | None = None,
                      graddrop: bool = False, max_bytes: int | None = None) -> PatchingResult:
    """Estimated patching scores of one sweep (same names and shapes as
    :func:`~interp.patching.patch_sweep`). ``method``: ``"atp"`` (plain), ``"ig"`` (integrated
    gradients, ``steps`` alphas, default 16) or ``"atp*"`` (exact attention softmax);
    ``graddrop=True`` returns GradDrop magnitudes (see the module docs). ``max_bytes`` caps the
    memory of one batch of the extra runs (default: half the free memory).

    >>> est = attribution_patch(model, "The capital of France is", "The capital of Italy is",
    ...                         logit_diff(" Paris", " Rome"), method="ig", steps=8)  # doctest: +SKIP
    >>> compare(patch_sweep(...), est).plot()  # doctest: +SKIP
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind= takes one sweep; for several use attribution_patches(..., kinds={kind!r})")
    kinds = check_kinds(kind)
    return _estimate(model, clean, corrupt, metric, kinds, method, steps, graddrop, max_bytes)[kinds[0]]


def attribution_patches(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable,
                        kinds: Sequence[str] = ("resid_pre", "attn.out", "mlp.out"), *, method: str = "atp",
                        steps: int | None = None, graddrop: bool = False,
                        max_bytes: int | None = None) -> dict[str, PatchingResult]:
    """:func:`attribution_patch` of several sweeps from the same runs: ``{kind: PatchingResult}``."""
    if isinstance(kinds, str):
        raise TypeError(f"kinds= takes a list of sweeps; for one use attribution_patch(..., kind={kinds!r})")
    return _estimate(model, clean, corrupt, metric, check_kinds(kinds), method, steps, graddrop, max_bytes)


__all__ = ["attribution_patch", "attribution_patches", "METHODS"]

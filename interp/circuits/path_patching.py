"""Path patching (Wang et al. 2022, the IOI paper): the effect of a sender only through chosen receivers.

A **sender** writes into the residual stream: an attention head ``(layer, head)`` (its ``attn.z``),
or a whole component, ``"blocks.L.attn.out"`` / ``"blocks.L.mlp.out"``. A **receiver** reads it:
a head's query, key or value input (``("blocks.L.attn.q", head)``, ``.k``, ``.v``; plain
``"blocks.L.attn.q"`` means every head of the layer; under grouped-query attention keys and values
are indexed by key/value head), an MLP's input (``"blocks.L.mlp"``), or the final residual
(``"logits"`` or ``"resid_final"``). Each experiment runs the corrupt prompt, normalised as in
activation patching: 0 = corrupt run, 1 = clean run.

The exact semantics, per sender ``s``:

1. *Sender run.* The corrupt prompt with ``s``'s output set to its clean value and every other
   attention head and MLP frozen at its corrupt output. In Gemma 3 a head reaches the residual
   through its layer's ``post_attn_norm``, an RMSNorm over the layer's whole ``attn.out``: that
   layer's ``attn.out`` and ``post_attn_norm`` are recomputed with the head's output changed (the
   sender's own path; for an MLP sender, its ``post_mlp_norm``). Every other component being
   frozen, the residual stream anywhere after ``s`` is the corrupt one plus ``delta_s`` (the
   change of ``s``'s norm output), and each receiver reads it through its own input norm,
   recomputed: a query receiver records ``q_proj(input_norm(resid_pre_corrupt + delta_s))``, an
   MLP receiver ``pre_mlp_norm(resid_mid_corrupt + delta_s)``, the final residual
   ``resid_final_corrupt + delta_s``. (This is computed directly: the frozen run is linear in
   the residual, so it needs no forward.)
2. *Receiver run.* The corrupt prompt with only the receivers' inputs set to what step 1
   recorded (``attn.q``/``attn.k``/``attn.v`` of the receiving heads, ``pre_mlp_norm`` of the
   receiving MLPs), everything else computed freely. A receiver after another receiver does not
   see that one's change (as in Wang et al., paths through two receivers are not counted). The
   final residual, as a receiver, gets ``delta_s`` added to the receiver run's own final residual
   (alone, that is exactly the recorded one; with other receivers it keeps their effects: the
   sender's direct path plus its paths through them). The metric of this run is the value.

So with receivers ``["logits"]`` a sender's value is its *direct* effect: for a head of the last
layer that differs from activation patching of the head only by the last MLP's response (frozen
here); with receivers ``["logits", "blocks.{last}.mlp"]`` it equals activation patching of that
head exactly (tested).

Batched: the experiments (one per sender) run as a batch of corrupt copies (chunked by a memory
budget, like the sweeps); step 2 starts at the earliest receiving layer from the cached corrupt
residual, and computes tokens only up to the last one the metric reads.

>>> from interp.model import Gemma3, Gemma3Config
>>> from interp.metrics import logit_diff
>>> m = Gemma3.from_config(Gemma3Config(n_layers=3, d_model=16, d_mlp=16, n_heads=2, n_kv_heads=1,
...     d_head=8, vocab_size=20), seed=0)
>>> r = path_patch(m, [2, 5, 7, 9], [2, 6, 7, 9], logit_diff(3, 4), "heads", [("blocks.2.attn.q", 1)])
>>> r.values.shape, r.axes
(torch.Size([2, 2]), ('layer', 'head'))
>>> r = path_patch(m, [2, 5, 7, 9], [2, 6, 7, 9], logit_diff(3, 4), [(0, 1), "blocks.1.mlp.out"], ["logits"])
>>> r.values.shape, r.labels
(torch.Size([2]), ['blocks.0.attn.z head 1', 'blocks.1.mlp.out'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..hooks import NonFiniteError, partial_run
from ..metrics import Metric
from ..model import Gemma3
from ..model.sites import block_site
from ..patching import prepare_pair
from ..patching.experiments import default_max_bytes, row_bytes
from ..progress import progress_bar
from .atp import layer_block
from .path_parse import Receiver, Sender, check_order, parse_receivers, parse_senders
from .path_result import PathPatchingResult


class _SetHeads:
    """A hook that writes ``values [B, s, n, hd]`` (or ``[B, s, d]``) into some heads (all if None)."""

    def __init__(self, values: torch.Tensor, heads: list[int] | None):
        self.values, self.heads = values, heads

    def __call__(self, x: torch.Tensor, site: Any) -> torch.Tensor:
        if self.heads is None:
            return self.values.to(x.dtype)
        x = x.clone()
        x[:, :, self.heads] = self.values[:, :, self.heads].to(x.dtype)
        return x


def _deltas(model: Gemma3, pair: Any, chunk: Sequence[Sender], end: int) -> torch.Tensor:
    """``[B, end, d]``: each sender's change of its residual contribution (step 1)."""
    c, k = pair.clean_cache, pair.corrupt_cache
    out = torch.empty(len(chunk), end, model.cfg.d_model, dtype=model.dtype, device=model.device)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(chunk):
        groups.setdefault((s.kind, s.layer), []).append(i)
    for (kind, layer), idx in groups.items():
        block = layer_block(model, layer)
        if kind == "head":
            zk = k[block_site(layer, "attn.z")][:, :end]
            z = zk.expand(len(idx), -1, -1, -1).clone()
            heads = torch.tensor([chunk[i].head for i in idx], device=z.device)
            rows = torch.arange(len(idx), device=z.device)
            z[rows, :, heads] = c[block_site(layer, "attn.z")][0, :end][:, heads].transpose(0, 1).to(z.dtype)
            new = block.post_attn_norm(block.attn.o_proj(z.reshape(len(idx), end, -1)))
            base = k[block_site(layer, "post_attn_norm")][:, :end]
        elif kind == "attn":
            new = block.post_attn_norm(c[block_site(layer, "attn.out")][:, :end])
            base = k[block_site(layer, "post_attn_norm")][:, :end]
        else:
            new = block.post_mlp_norm(c[block_site(layer, "mlp.out")][:, :end])
            base = k[block_site(layer, "post_mlp_norm")][:, :end]
        out[idx] = (new - base).to(model.dtype)
    return out


def _receiver_hooks(model: Gemma3, pair: Any, receivers: Sequence[Receiver], delta: torch.Tensor,
                    end: int) -> list[tuple[str, _SetHeads]]:
    """Hooks that set each receiver's input to what step 1 recorded (one per receiving site)."""
    k = pair.corrupt_cache
    sites: dict[tuple[int, str], set[int] | None] = {}
    for r in receivers:
        if r.layer is None:  # the final residual
            continue
        key = (r.layer, r.kind)
        if r.heads is None:
            sites[key] = None
        elif key not in sites:
            sites[key] = set(r.heads)
        elif (known := sites[key]) is not None:
            known.update(r.heads)
    hooks = []
    cfg = model.cfg
    for (layer, kind), heads in sorted(sites.items()):
        block, b = layer_block(model, layer), delta.shape[0]
        if kind == "mlp":
            values = block.pre_mlp_norm(k[block_site(layer, "resid_mid")][:, :end] + delta)
            hooks.append((block_site(layer, "pre_mlp_norm"), _SetHeads(values, None)))
            continue
        x = block.input_norm(k[block_site(layer, "resid_pre")][:, :end] + delta)
        proj = {"q": block.attn.q_proj, "k": block.attn.k_proj, "v": block.attn.v_proj}[kind]
        values = proj(x).view(b, end, -1, cfg.d_head)
        hooks.append((block_site(layer, f"attn.{kind}"), _SetHeads(values, None if heads is None else sorted(heads))))
    return hooks


def _receiver_run(model: Gemma3, pair: Any, receivers: Sequence[Receiver], delta: torch.Tensor,
                  end: int) -> torch.Tensor:
    """Step 2 for a batch of senders: raw metric values ``[B]``."""
    n = model.cfg.n_layers
    k = pair.corrupt_cache
    inside = [r.layer for r in receivers if r.layer is not None]
    final = any(r.kind == "final" for r in receivers)
    b = delta.shape[0]
    with partial_run():
        if inside:
            start = min(inside)
            h = k[block_site(start, "resid_pre")][:, :end].expand(b, -1, -1)
            with model.hooks(_receiver_hooks(model, pair, receivers, delta, end)):
                h = model(h, start_at_layer=start, stop_at_layer=n)
            if final:
                h = h + delta
        else:
            h = k[block_site(n - 1, "resid_post")][:, :end] + delta
        if pair.vocab_selected:
            logits = model.unembed(h[:, pair.needed], pair.metric.token_ids)
        else:
            logits = model(h, start_at_layer=n, logits_at=pair.needed)
    return pair.metric.from_selected(logits, pair.seq, vocab_selected=pair.vocab_selected)


def path_patch(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable,
               senders: str | Sequence[Any] = "heads", receivers: Sequence[Any] = ("logits",), *,
               batch_size: int | None = None, max_bytes: int | None = None,
               progress: bool = False) -> PathPatchingResult:
    """Path patching of each sender through ``receivers`` (module docs for the exact semantics).

    ``senders``: ``"heads"`` (every head in a layer before the earliest receiver: values
    ``[layers, heads]``, axes ``('layer', 'head')``, like an ``attn.z`` sweep), or a list of
    ``(layer, head)`` pairs (or :class:`~interp.tokens.Top` entries of a head result),
    ``"blocks.L.attn.out"`` and ``"blocks.L.mlp.out"`` (values ``[senders]`` in that order, axes
    ``('sender',)``, ``result.labels`` naming each). ``receivers``: a list of ``"logits"`` /
    ``"resid_final"``, ``("blocks.L.attn.q", head)`` (``.k``/``.v`` take a key/value head),
    ``"blocks.L.attn.q"`` (all heads), ``"blocks.L.mlp"`` (the MLP's input). ``batch_size`` caps
    the senders per batch, ``max_bytes`` its estimated memory (default: half the free memory).

    >>> r = path_patch(model, ioi_clean, ioi_corrupt, logit_diff(" Mary", " John"), "heads",
    ...                [("blocks.9.attn.q", 6), ("blocks.9.attn.q", 9)])  # doctest: +SKIP
    >>> r.plot()  # doctest: +SKIP
    """
    recv = parse_receivers(model, receivers)
    send, grid = parse_senders(model, senders, min(r.order for r in recv))
    check_order(send, recv)
    n = model.cfg.n_layers
    clean_names = ["blocks.*.attn.z", "blocks.*.attn.out", "blocks.*.mlp.out"]
    corrupt_names = ["blocks.*.attn.z", "blocks.*.post_attn_norm", "blocks.*.post_mlp_norm", "blocks.*.resid_pre",
                     "blocks.*.resid_mid", block_site(n - 1, "resid_post")]
    pair = prepare_pair(model, clean, corrupt, metric, clean_names, corrupt_names)
    end = pair.needed[-1] + 1
    cfg = model.cfg
    elem = torch.empty((), dtype=model.dtype).element_size()
    width = cfg.d_model * (2 + len(recv)) + cfg.n_heads * cfg.d_head * len(recv)
    per_row = row_bytes(model, end, end, len(pair.needed)) + elem * end * width
    limit = max_bytes if max_bytes is not None else default_max_bytes(model)
    cap = max(1, limit // per_row)
    if batch_size is not None:
        cap = max(1, min(cap, int(batch_size)))
    raw = torch.empty(len(send))
    bar = progress_bar(len(send), "path patching", "sender", progress)
    try:
        with torch.no_grad():
            for j in range(0, len(send), cap):
                chunk = send[j:j + cap]
                values = _receiver_run(model, pair, recv, _deltas(model, pair, chunk, end), end).float().cpu()
                raw[j:j + len(chunk)] = values
                bar.update(len(chunk))
    finally:
        bar.close()
    bad = [s.label for s, v in zip(send, raw.tolist()) if not torch.isfinite(torch.tensor(v))]
    if bad:
        raise NonFiniteError(f"path patching {bad[0]} gave a non-finite metric although both runs were finite; a "
                             "hook active during the run, or the metric, produced it")
    labels = [s.label for s in send]
    method = "path patching to " + ", ".join(r.label for r in recv)
    if grid:
        raw = raw.view(-1, cfg.n_heads)
    return PathPatchingResult(pair.normalise(raw), raw, "attn.z" if grid else "senders",
                              ("layer", "head") if grid else ("sender",), pair.tokens, pair.corrupt_tokens,
                              pair.clean_value, pair.corrupt_value, pair.metric.name, method, 0, labels,
                              [r.label for r in recv])


__all__ = ["path_patch", "PathPatchingResult"]

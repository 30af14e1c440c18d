"""AtP*'s fix for attention saturation (Kramár et al. 2024), for every patching sweep.

Plain attribution patching linearises the metric at the corrupt run. Where a patch moves an
attention pattern that is saturated (a softmax with one key far ahead), the gradient there is
about zero however large the real change: a false negative. The fix: compute the change of the
*first attention layer that reads the patched activation* exactly, and linearise only after it.

For a cell (a site at layer ``l``, a position or a head), let ``a`` be that layer: ``l`` for
``resid_pre``, ``l + 1`` for everything else (``attn.z``/``attn.out``/``resid_mid``/``mlp.out``/
``resid_post``). Everything between the site and layer ``a``'s attention acts position by
position (norms, the MLP of layer ``l``), so the residual entering layer ``a`` after the patch,
``r + dr``, is computed exactly (for a position cell ``dr`` is non-zero at that position only;
for an all-position head, at every position). Layer ``a``'s queries, keys and values are
recomputed from it, then its softmax and weighted values ``z'`` (every head), and

    estimate = dr . g(resid_mid_a)  +  (z' - z) . g(attn.z_a)

with ``g`` the metric's gradients at the corrupt run: the residual's skip path past layer ``a``'s
attention, plus its attention linearised from ``z`` onwards. As ``z' - z = (A' - A) v + A' (v' - v)``
and ``dm/dA = g_z v^T``, this is the paper's "gradient with respect to the pattern times the exact
pattern change, plus the value-side term" (values at the new pattern). Queries and keys of every
head of layer ``a`` are handled at once. It is exact whenever the model is linear after layer
``a``'s ``z`` (``tests/analysis/test_atp.py`` builds such a model with a saturated head). Cells
with no attention after them (the last layer's ``mlp.out``, ...) keep plain AtP. For ``attn.z``,
the head's own output change is already exact in plain AtP (it uses the clean ``z``); the fix is
applied where that output is read, the next layer's attention.

Cost: one recompute of one layer's attention per cell (batched, chunked by memory), besides the
clean forward and the corrupt forward-backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..model import Gemma3
from ..model.config import GLOBAL
from ..model.layers import Block, rope_tables, rotate_half
from ..model.sites import block_site
from ..patching import PromptPair
from ..patching.experiments import default_max_bytes
from .atp import layer_block, linear_estimates

POSITION_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out")
NEEDED_SITES = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out", "attn.z")


def reading_layer(kind: str, layer: int) -> int:
    """The first layer whose attention reads a change of sweep ``kind`` at ``layer``."""
    return layer if kind == "resid_pre" else layer + 1


def _mlp_add(block: Block, mid: torch.Tensor) -> torch.Tensor:
    """What layer ``block`` adds to the residual ``mid`` (``resid_mid``) with its MLP."""
    mlp, x = block.mlp, block.pre_mlp_norm(mid)
    hidden = F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x)
    return block.post_mlp_norm(mlp.down_proj(hidden))


def _after_attn(block: Block, pre: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """``resid_post`` of a layer from its ``resid_pre`` and ``attn.out`` (position by position)."""
    mid = pre + block.post_attn_norm(attn_out)
    return mid + _mlp_add(block, mid)


def _qkv(model: Gemma3, layer: int, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Queries and keys after RoPE, and values, of layer ``layer`` for residuals ``x [b, n, d]`` at
    positions ``pos [b or 1, n]``: exactly the forward's steps."""
    cfg, attn = model.cfg, layer_block(model, layer).attn
    b, n, _ = x.shape
    h = layer_block(model, layer).input_norm(x)
    q = attn.q_norm(attn.q_proj(h).view(b, n, cfg.n_heads, cfg.d_head))
    k = attn.k_norm(attn.k_proj(h).view(b, n, cfg.n_kv_heads, cfg.d_head))
    v = attn.v_proj(h).view(b, n, cfg.n_kv_heads, cfg.d_head)
    if cfg.layer_types[layer] == GLOBAL:
        cos, sin = rope_tables(pos, cfg.d_head, cfg.rope_global_base, cfg.rope_global_factor, model.dtype)
    else:
        cos, sin = rope_tables(pos, cfg.d_head, cfg.rope_local_base, 1.0, model.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def _attend(model: Gemma3, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``z [b, n, heads, hd]`` of the explicit attention (causal, windowed on sliding layers)."""
    cfg = model.cfg
    n = q.shape[1]
    qi = torch.arange(n, device=q.device)[:, None]
    kj = torch.arange(n, device=q.device)[None, :]
    allowed = kj <= qi
    if cfg.layer_types[layer] != GLOBAL:
        allowed = allowed & (qi - kj < cfg.window)
    kh = k.transpose(1, 2).repeat_interleave(cfg.group_size, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(cfg.group_size, dim=1)
    scores = torch.matmul(q.transpose(1, 2), kh.transpose(2, 3)) * cfg.attn_scale
    pattern = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(pattern, vh).transpose(1, 2)


def _cell_deltas(model: Gemma3, pair: PromptPair, kind: str, layer: int, end: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, ...]]]:
    """``(dr, positions, cells)``: the exact change of the residual entering the reading layer for
    each cell of ``kind`` at ``layer``: ``dr [B, d]`` at ``positions [B]`` (one position per cell),
    or ``dr [B, end, d]`` with positions None (every position); ``cells`` index the result."""
    c, k = pair.clean_cache, pair.corrupt_cache
    block = layer_block(model, layer)

    def get(cache: object, site: str) -> torch.Tensor:
        return cache[block_site(layer, site)][0, :end]  # type: ignore[index]

    pos = torch.arange(end, device=model.device)
    if kind == "resid_pre":
        dr = get(c, "resid_pre") - get(k, "resid_pre")
    elif kind in ("resid_mid", "resid_post"):  # resid_post follows from resid_mid position by position
        dr = get(c, "resid_post") - get(k, "resid_post")
    elif kind == "attn.out":
        pre = get(k, "resid_pre")
        dr = _after_attn(block, pre, get(c, "attn.out")) - _after_attn(block, pre, get(k, "attn.out"))
    elif kind == "mlp.out":
        dr = block.post_mlp_norm(get(c, "mlp.out")) - block.post_mlp_norm(get(k, "mlp.out"))
    else:  # attn.z, attn.z_by_pos: each head's clean output, every other head corrupt
        heads = model.cfg.n_heads
        zc, zk = get(c, "attn.z"), get(k, "attn.z")  # [end, heads, hd]
        z = zk.expand(heads, -1, -1, -1).clone()
        idx = torch.arange(heads, device=z.device)
        z[idx, :, idx] = zc.transpose(0, 1)
        o_proj = block.attn.o_proj
        pre = get(k, "resid_pre")
        base = _after_attn(block, pre, o_proj(zk.reshape(1, end, -1)))
        dense = _after_attn(block, pre, o_proj(z.reshape(heads, end, -1))) - base  # [heads, end, d]
        if kind == "attn.z":
            return dense, None, [(h,) for h in range(heads)]
        cells: list[tuple[int, ...]] = [(h, p) for h in range(heads) for p in range(end)]
        return dense.reshape(heads * end, -1), pos.repeat(heads), cells
    return dr, pos, [(p,) for p in range(end)]


def _estimates(model: Gemma3, pair: PromptPair, a: int, dr: torch.Tensor, positions: torch.Tensor | None,
               grads: dict[str, torch.Tensor], end: int, max_bytes: int | None) -> torch.Tensor:
    """``[R, B]``: ``dr . g(resid_mid_a) + (z' - z) . g(attn.z_a)`` per cell, z' recomputed exactly."""
    cfg = model.cfg
    pre = pair.corrupt_cache[block_site(a, "resid_pre")][:, :end]  # [1, end, d]
    pos = torch.arange(end, device=model.device)[None]
    g_mid = grads[block_site(a, "resid_mid")][:, :end].float()  # [R, end, d]
    g_z = grads[block_site(a, "attn.z")][:, :end].float()  # [R, end, heads, hd]
    with torch.no_grad():
        q0, k0, v0 = _qkv(model, a, pre, pos)
        z0 = _attend(model, a, q0, k0, v0)
        per_cell = 4 * end * (3 * cfg.n_heads * end + 4 * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head + cfg.d_model)
        limit = max_bytes if max_bytes is not None else default_max_bytes(model)
        cap = max(1, limit // per_cell)
        out = []
        for s in range(0, dr.shape[0], cap):
            d = dr[s:s + cap]
            b = d.shape[0]
            if positions is None:  # every position changes: recompute q, k, v everywhere
                q, k, v = _qkv(model, a, pre + d, pos)
                skip = torch.einsum("bpd,rpd->rb", d.float(), g_mid)
            else:  # one position per cell: recompute that row of q, k, v
                p = positions[s:s + cap]
                qp, kp, vp = _qkv(model, a, (pre[0, p] + d)[:, None], p[:, None])
                rows = torch.arange(b, device=d.device)
                q, k, v = (t.expand(b, -1, -1, -1).clone() for t in (q0, k0, v0))
                q[rows, p], k[rows, p], v[rows, p] = qp[:, 0], kp[:, 0], vp[:, 0]
                skip = torch.einsum("bd,rbd->rb", d.float(), g_mid[:, p])
            dz = _attend(model, a, q, k, v).float() - z0.float()
            out.append(skip + torch.einsum("bphe,rphe->rb", dz, g_z))
    return torch.cat(out, 1)


def qk_fixed_estimates(model: Gemma3, pair: PromptPair, kinds: Sequence[str], grads: dict[str, torch.Tensor],
                       max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """AtP* estimates ``{kind: [R, *cell shape]}`` (R gradient rows, e.g. GradDrop's): plain AtP where
    no attention reads the cell, the exact-attention estimate (module docstring) elsewhere.

    Needs, in both caches and (gradients) for every layer: the sweep sites, ``resid_pre``,
    ``resid_mid``, ``resid_post``, ``attn.out``, ``mlp.out``, ``attn.z`` (:data:`NEEDED_SITES`).
    """
    est = linear_estimates(model, pair, kinds, grads)
    end = pair.needed[-1] + 1
    n_layers = model.cfg.n_layers
    for kind in kinds:
        for layer in range(n_layers):
            a = reading_layer(kind, layer)
            if a >= n_layers:
                continue
            with torch.no_grad():
                dr, positions, cells = _cell_deltas(model, pair, kind, layer, end)
            changed = dr.flatten(1).abs().amax(1) > 0
            values = torch.zeros(est[kind].shape[0], len(cells))
            if bool(changed.any()):
                keep = changed.nonzero()[:, 0]
                sub_pos = positions[keep] if positions is not None else None
                values[:, keep.cpu()] = _estimates(model, pair, a, dr[keep], sub_pos, grads, end, max_bytes).cpu()
            target = est[kind][:, layer]
            if kind in POSITION_KINDS:
                target.zero_()  # positions after the last metric position change nothing the metric reads
            for j, cell in enumerate(cells):
                target[(slice(None), *cell)] = values[:, j]  # type: ignore[index]
    return est


__all__ = ["qk_fixed_estimates", "reading_layer", "NEEDED_SITES"]

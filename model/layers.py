"""The Gemma 3 decoder block, written so each named site is one visible step.

Every ``ctx.fire(name, x, layer)`` call is a site of the hook registry (see ``interp.hooks``);
when nothing is hooked it returns ``x`` after one dictionary miss. Attention runs fused
(``scaled_dot_product_attention``) unless someone hooks ``attn.scores``, ``attn.pattern`` or
``attn.head_out`` of that layer (or the model is set to ``attn_impl="eager"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import Gemma3Config
from .context import ForwardContext
from .sites import BLOCK_KINDS, EXPLICIT_KINDS, LAYER_FORMAT


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * (1 + w)``, computed in float32, cast back once.

    ``w`` is stored as the offset from 1, as in Gemma checkpoints.

    >>> torch.allclose(RMSNorm(4)(torch.full((1, 4), 2.0)), torch.ones(1, 4))
    True
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * rms_factor(x, self.eps) * (1.0 + self.weight.float())).type_as(x)


def rms_factor(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last axis, in float32: RMSNorm's data-dependent scale
    (the factor an exact attribution freezes).

    >>> rms_factor(torch.full((1, 4), 2.0), 0.0)
    tensor([[0.5000]])
    """
    xf = x.float()
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rope_tables(positions: torch.Tensor, d_head: int, base: float, factor: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[batch, seq, 1, d_head]`` for rotate-half RoPE (linear scaling by ``factor``).

    >>> cos, sin = rope_tables(torch.arange(3)[None], 4, 10_000.0, 1.0, torch.float32)
    >>> cos.shape, float(cos[0, 0, 0, 0])
    (torch.Size([1, 3, 1, 4]), 1.0)
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float, device=positions.device) / d_head))
    inv_freq = inv_freq / factor
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with q/k RMSNorm before RoPE, as in Gemma 3."""

    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        self.layer, self.layer_type = layer, cfg.layer_types[layer]
        self.n_heads, self.n_kv, self.d_head, self.group = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.group_size
        self.scale = cfg.attn_scale
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.d_head, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.d_head, cfg.eps)
        self.k_norm = RMSNorm(cfg.d_head, cfg.eps)
        self.site = block_site_names(layer, "attn.")
        self.explicit_sites = tuple(self.site[s] for s in EXPLICIT_KINDS)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        fire, n, layer = ctx.fire, self.site, self.layer
        b, s, _ = x.shape
        q = fire(n["attn.q"], self.q_proj(x).view(b, s, self.n_heads, self.d_head), layer)
        k = fire(n["attn.k"], self.k_proj(x).view(b, s, self.n_kv, self.d_head), layer)
        v = fire(n["attn.v"], self.v_proj(x).view(b, s, self.n_kv, self.d_head), layer)
        q = fire(n["attn.q_normed"], self.q_norm(q), layer)
        k = fire(n["attn.k_normed"], self.k_norm(k), layer)
        cos, sin = ctx.rope[self.layer_type]
        q = fire(n["attn.q_rot"], q * cos + rotate_half(q) * sin, layer)
        k = fire(n["attn.k_rot"], k * cos + rotate_half(k) * sin, layer)

        if ctx.kv is not None:  # earlier tokens' keys and values, then the new ones
            k, v, key_start = ctx.kv.attend(layer, k, v)
            ctx.run.key_offsets[layer] = key_start
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, hd]
        active = ctx.hooks
        explicit = ctx.eager or any(name in active for name in self.explicit_sites)
        mask, causal = ctx.mask(self.layer_type, explicit)
        if explicit:
            if self.group > 1:  # query head h reads kv head h // group
                kh, vh = kh.repeat_interleave(self.group, dim=1), vh.repeat_interleave(self.group, dim=1)
            scores = torch.matmul(qh, kh.transpose(2, 3)) * self.scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            scores = fire(n["attn.scores"], scores, layer)
            pattern = fire(n["attn.pattern"], torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), layer)
            z = torch.matmul(pattern, vh).transpose(1, 2)
        else:
            z = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.group > 1
            ).transpose(1, 2)
        z = fire(n["attn.z"], z, layer)  # [b, s, h, hd]
        out = self.o_proj(z.reshape(b, s, self.n_heads * self.d_head))
        if n["attn.head_out"] in active:
            w_o = self.o_proj.weight.view(-1, self.n_heads, self.d_head)  # [d, h, hd]
            head_out = torch.einsum("bshe,dhe->bshd", z, w_o)
            hooked = fire(n["attn.head_out"], head_out, layer)
            if hooked is not head_out:  # out = sum of the new per-head parts, written as o_proj(z)
                # plus the heads' changes: a hook that changes nothing leaves out bit for bit
                change = (hooked.float() - head_out.float()).sum(dim=2)
                out = (out.float() + change).to(out.dtype)
        return fire(n["attn.out"], out, layer)


class MLP(nn.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.site = block_site_names(layer, "mlp.")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        fire, n, layer = ctx.fire, self.site, self.layer
        gate = fire(n["mlp.gate"], self.gate_proj(x), layer)
        act = fire(n["mlp.act"], F.gelu(gate, approximate="tanh"), layer)
        up = fire(n["mlp.up"], self.up_proj(x), layer)
        hidden = fire(n["mlp.hidden"], act * up, layer)
        return fire(n["mlp.out"], self.down_proj(hidden), layer)


class Block(nn.Module):
    """One decoder layer: sandwich-normed attention, then sandwich-normed MLP."""

    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.input_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.pre_mlp_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg, layer)
        self.post_mlp_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.site = block_site_names(layer)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        fire, n, layer = ctx.fire, self.site, self.layer
        x = fire(n["resid_pre"], x, layer)
        attn_in = fire(n["input_norm"], self.input_norm(x), layer)
        attn_add = fire(n["post_attn_norm"], self.post_attn_norm(self.attn(attn_in, ctx)), layer)
        x = fire(n["resid_mid"], x + attn_add, layer)
        mlp_in = fire(n["pre_mlp_norm"], self.pre_mlp_norm(x), layer)
        mlp_add = fire(n["post_mlp_norm"], self.post_mlp_norm(self.mlp(mlp_in, ctx)), layer)
        return fire(n["resid_post"], x + mlp_add, layer)


def block_site_names(layer: int, prefix: str = "") -> dict[str, str]:
    """``{kind: full name}`` of layer ``layer``'s sites whose kind starts with ``prefix``.

    >>> block_site_names(3, "mlp.")["mlp.out"]
    'blocks.3.mlp.out'
    """
    head = LAYER_FORMAT.format(layer=layer)
    return {k: head + k for k in BLOCK_KINDS if k.startswith(prefix)}


def embed_scale(d_model: int, dtype: torch.dtype) -> torch.Tensor:
    """sqrt(d_model) cast to the model dtype first (in bf16, 1B: 34.0, not 33.94).

    >>> float(embed_scale(1152, torch.bfloat16))
    34.0
    """
    return torch.tensor(math.sqrt(d_model)).to(dtype)

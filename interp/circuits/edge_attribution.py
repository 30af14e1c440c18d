"""Edge attribution patching: a linear estimate of every edge's effect, sender -> receiver.

From one clean forward and one corrupt forward-backward, each edge gets
``(clean_out_s - corrupt_out_s) . grad_r``, normalised like patching (divided by
``m_clean - m_corrupt``):

- **senders** write into the residual stream: the token embeddings (``embed``); every attention
  head, its output ``W_O,h (z_clean - z_corrupt)`` carried through its layer's ``post_attn_norm``
  linearised at the corrupt run (the heads of a layer share that norm; linearised, their parts
  add up to the layer's); every MLP, its ``post_mlp_norm`` output (clean minus corrupt).
- **receivers** read the residual stream: every head's query (``L3H1.q``), every key/value head's
  key and value (``L3KV0.k``, ``L3KV0.v``: under grouped-query attention a key/value head serves
  a group of query heads, so that is where the split is exact), every MLP's input (``L3.mlp``),
  and the final residual (``logits``). ``grad_r`` is the metric's gradient at the residual stream
  through that reader only: the gradient at ``attn.q`` of head h, mapped back through ``W_Q,h``
  and the layer's ``input_norm`` (at the corrupt run); likewise keys, values, and the MLP's
  ``pre_mlp_norm``; the gradient of the final residual for ``logits``.

An edge exists when the sender comes before the receiver (a head of layer ``l`` feeds the MLP of
layer ``l`` and everything in later layers); other entries are 0 and ``exists`` is False.

Identities (tested in ``tests/analysis/test_atp.py``): the residual stream is a sum, so the
gradient at any point of it is the sum of its readers' gradients. Hence a head's edges to every
receiver after it add up to its node attribution score, ``attribution_patch(..., "attn.z")``;
the embedding's edges add up to the layer-0 ``resid_pre`` scores summed over positions.

>>> from interp.model import Gemma3, Gemma3Config
>>> from interp.metrics import logit_diff
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=16, n_heads=2, n_kv_heads=1,
...     d_head=8, vocab_size=20), seed=0)
>>> e = edge_attribution_patch(m, [2, 5, 7], [2, 6, 7], logit_diff(3, 4))
>>> e.values.shape, e.senders[:2], e.receivers[:4]
(torch.Size([7, 11]), ['embed', 'L0H0'], ['L0H0.q', 'L0H1.q', 'L0KV0.k', 'L0KV0.v'])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
import torch

from ..metrics import Metric
from ..model import Gemma3
from ..model.layers import RMSNorm, rms_factor
from ..model.sites import block_site
from ..patching import prepare_pair
from ..plots import escape_text, heatmap
from ..tokens import Top, top_entries
from .atp import layer_block


@dataclass
class EdgeScores:
    """Edge attribution scores ``values [senders, receivers]`` (normalised: 0 = corrupt run, 1 = clean
    run), with ``senders``/``receivers`` labels and ``exists`` (False where the sender comes after
    the receiver: no such edge, value 0).

    >>> s = EdgeScores(torch.tensor([[0.5, -2.0]]), ["embed"], ["L0.mlp", "logits"], torch.ones(1, 2, dtype=bool))
    >>> s.top(1)[0].label, s.shape
    ('embed -> logits', (1, 2))
    """

    values: torch.Tensor
    senders: list[str]
    receivers: list[str]
    exists: torch.Tensor
    clean_value: float = 1.0
    corrupt_value: float = 0.0
    metric: str = "metric"
    method: str = "edge attribution patching"
    tokens: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        """``(senders, receivers)``."""
        return (len(self.senders), len(self.receivers))

    def label(self, index: tuple[int, ...]) -> str:
        """``"sender -> receiver"`` of one entry."""
        return f"{self.senders[index[0]]} -> {self.receivers[index[1]]}"

    def top(self, k: int = 10) -> list[Top]:
        """The ``k`` edges of largest ``|value|``, largest first (index ``(sender, receiver)``)."""
        return top_entries(self.values, k, self.label)

    def plot(self, title: str | None = None, **kwargs: Any) -> go.Figure:
        """A heatmap (plotly): senders down, receivers across, centred at 0; no-edge cells blank."""
        z = self.values.detach().float().masked_fill(~self.exists, float("nan"))
        title = title or f"{self.method} ({escape_text(self.metric)}; 0 = corrupt, 1 = clean)"
        return heatmap(z, self.receivers, self.senders, title=title, x_title="receiver", y_title="sender",
                       zmid=0.0, colorbar_title="score", **kwargs)

    def __repr__(self) -> str:
        return f"EdgeScores({self.method}, {len(self.senders)} senders x {len(self.receivers)} receivers)"


def norm_jvp(norm: RMSNorm, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The derivative of ``norm`` at ``x`` applied to the tangent ``t`` (float32)."""
    x, t = x.float(), t.float()
    r = rms_factor(x, norm.eps)
    return (1.0 + norm.weight.float()) * (r * t - x * r**3 * (x * t).mean(-1, keepdim=True))


def norm_vjp(norm: RMSNorm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient at ``norm``'s input ``x`` of a gradient ``g`` at its output (float32)."""
    x = x.float()
    r = rms_factor(x, norm.eps)
    gw = g.float() * (1.0 + norm.weight.float())
    return r * gw - x * r**3 * (x * gw).mean(-1, keepdim=True)


def edge_attribution_patch(model: Gemma3, clean: Any, corrupt: Any, metric: Metric | Callable) -> EdgeScores:
    """Edge attribution patching scores of every sender -> receiver edge (module docs): one clean
    forward, one corrupt forward-backward.

    >>> e = edge_attribution_patch(model, clean, corrupt, logit_diff(" Paris", " Rome"))  # doctest: +SKIP
    >>> e.top(5); e.plot()  # doctest: +SKIP
    """
    cfg = model.cfg
    n, heads, kv, hd = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    last = block_site(n - 1, "resid_post")
    clean_names = ["embed", "blocks.*.attn.z", "blocks.*.post_mlp_norm"]
    corrupt_names = clean_names + ["blocks.*.attn.out", "blocks.*.resid_pre", "blocks.*.resid_mid", "blocks.*.attn.q",
                                   "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.pre_mlp_norm", last]
    pair = prepare_pair(model, clean, corrupt, metric, clean_names, corrupt_names, corrupt_grads=True)
    c, k, g = pair.clean_cache, pair.corrupt_cache, pair.corrupt_grads
    end = pair.needed[-1] + 1

    def at(cache: Any, name: str) -> torch.Tensor:
        return cache[name][0, :end].float()

    senders, out, s_time = ["embed"], [at(c, "embed") - at(k, "embed")], [-1]
    receivers, grads, r_time = [], [], []
    with torch.no_grad():
        for layer in range(n):
            block = layer_block(model, layer)
            w_o = block.attn.o_proj.weight.float().view(cfg.d_model, heads, hd)
            dz = at(c, block_site(layer, "attn.z")) - at(k, block_site(layer, "attn.z"))  # [end, heads, hd]
            per_head = torch.einsum("phe,dhe->hpd", dz, w_o)
            out += list(norm_jvp(block.post_attn_norm, at(k, block_site(layer, "attn.out")), per_head))
            out.append(at(c, block_site(layer, "post_mlp_norm")) - at(k, block_site(layer, "post_mlp_norm")))
            senders += [f"L{layer}H{h}" for h in range(heads)] + [f"L{layer}.mlp"]
            s_time += [2 * layer] * heads + [2 * layer + 1]
            resid = at(k, block_site(layer, "resid_pre"))
            for site, proj, count, tag in (("attn.q", block.attn.q_proj, heads, "H{}.q"),
                                           ("attn.k", block.attn.k_proj, kv, "KV{}.k"),
                                           ("attn.v", block.attn.v_proj, kv, "KV{}.v")):
                w = proj.weight.float().view(count, hd, cfg.d_model)
                g_in = torch.einsum("phe,hed->hpd", g[block_site(layer, site)][0, :end].float(), w)
                grads += list(norm_vjp(block.input_norm, resid, g_in))
                receivers += [f"L{layer}" + tag.format(i) for i in range(count)]
                r_time += [2 * layer] * count
            g_mlp = g[block_site(layer, "pre_mlp_norm")][0, :end]
            grads.append(norm_vjp(block.pre_mlp_norm, at(k, block_site(layer, "resid_mid")), g_mlp))
            receivers.append(f"L{layer}.mlp")
            r_time.append(2 * layer + 1)
        grads.append(g[last][0, :end].float())
        receivers.append("logits")
        r_time.append(2 * n)
        exists = torch.tensor(s_time)[:, None] < torch.tensor(r_time)[None, :]
        raw = torch.einsum("spd,rpd->sr", torch.stack(out), torch.stack(grads)).cpu()
    span = pair.clean_value - pair.corrupt_value
    values = (raw / span).masked_fill(~exists, 0.0)
    return EdgeScores(values, senders, receivers, exists, pair.clean_value, pair.corrupt_value, pair.metric.name,
                      tokens=pair.tokens)


__all__ = ["EdgeScores", "edge_attribution_patch", "norm_jvp", "norm_vjp"]

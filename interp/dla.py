"""Direct logit attribution, exact for Gemma 3's sandwich norms.

The residual stream after the last layer is exactly ``embed + sum_i post_attn_norm_i +
sum_i post_mlp_norm_i``. With the final norm's scale frozen at its actual value for the
position (``rsqrt(mean(x^2) + eps) * (1 + w)``), the logit is linear in the residual, so each
part's contribution is a dot product and the parts sum to the logit. Inside a layer the
post-norm's rsqrt factor is frozen the same way: ``post_attn_norm = sum_h head_out_h * f * (1 + w)``
splits the attention part into heads, and ``post_mlp_norm = sum_n hidden[n] W_down[:, n] * f * (1 + w)``
splits the MLP part into neurons. Everything is computed in float32.

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=6, d_model=32, d_mlp=64, n_heads=4,
...     n_kv_heads=2, d_head=8, vocab_size=100, window=4))
>>> dla = direct_logit_attribution(m, torch.tensor([[2, 17, 5, 9]]), target=7, baseline=3)
>>> dla.labels[:3]
['embed', 'L0 attn', 'L0 mlp']
>>> abs(float(dla.values.sum()) - dla.logit) < 1e-5        # parts sum to the logit difference
True
>>> torch.allclose(dla.heads.sum(-1), dla.values[1::2], atol=1e-5)  # heads sum to each attn part
True
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from einops import einsum

from .hooks import resolve_position
from .model import Gemma3
from .model.finite import check_finite
from .model.inputs import Prompt
from .model.layers import rms_factor
from .model.sites import block_site
from .plots import bars, escape_token, heatmap
from .tokens import Target, Top, layer_labels, single_prompt, str_tokens, token_id, top_entries


@dataclass
class DLAResult:
    """What :func:`direct_logit_attribution` returns (all values float32, in logit units).

    ``values [1 + 2 * layers]`` with ``labels`` (``embed``, ``L0 attn``, ``L0 mlp``, ...) sum to
    ``logit`` (the model's actual logit, or logit difference with a baseline). ``heads
    [layers, heads]`` sums over heads to each ``L{i} attn`` value; ``neurons [layers, d_mlp]``
    sums over neurons to each ``L{i} mlp`` value.
    """

    tokens: list[str]
    position: int
    target: int
    target_token: str
    baseline: int | None
    baseline_token: str | None
    logit: float
    labels: list[str]
    values: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor
    layer_labels: list[str]
    n_top: int = 10

    @property
    def metric(self) -> str:
        """What is attributed, e.g. ``logit(' Paris') - logit(' London')``."""
        m = f"logit({self.target_token!r})"
        return m if self.baseline is None else f"{m} - logit({self.baseline_token!r})"

    def __repr__(self) -> str:
        return (f"DLAResult({self.metric} = {self.logit:.4f} at position {self.position}, "
                f"{len(self.labels)} parts, sum {float(self.values.sum()):.4f})")

    @property
    def attn(self) -> torch.Tensor:
        """Each layer's attention contribution ``[layers]``."""
        return self.values[1::2]

    @property
    def mlp(self) -> torch.Tensor:
        """Each layer's MLP contribution ``[layers]``."""
        return self.values[2::2]

    def table(self) -> list[tuple[str, float]]:
        """``(part label, contribution)`` for every part, in residual order."""
        return [(label, float(v)) for label, v in zip(self.labels, self.values)]

    def top(self, k: int | None = None) -> list[Top]:
        """The ``k`` (default ``n_top``) parts (embed, each layer's attn and mlp) with the largest
        ``|contribution|``, largest first."""
        return top_entries(self.values, self.n_top if k is None else k, lambda i: self.labels[i[0]])

    def top_heads(self, k: int | None = None) -> list[Top]:
        """The ``k`` heads with the largest ``|contribution|``: index ``(layer, head)``."""
        return top_entries(self.heads, self.n_top if k is None else k, lambda i: f"L{i[0]}H{i[1]}")

    def top_neurons(self, k: int | None = None, layer: int | None = None) -> list[Top]:
        """The ``k`` neurons with the largest ``|contribution|``, overall or within ``layer``:
        index ``(layer, neuron)``, largest first."""
        k = self.n_top if k is None else k
        if layer is None:
            return top_entries(self.neurons, k, lambda i: f"L{i[0]} N{i[1]}")
        return [Top((layer, t.index[0]), t.value, f"L{layer} N{t.index[0]}")
                for t in top_entries(self.neurons[layer], k, str)]

    def _where(self) -> str:
        return f"at position {self.position} ({escape_token(self.tokens[self.position])})"

    def _metric_html(self) -> str:
        m = f"logit({escape_token(self.target_token)})"
        if self.baseline is None or self.baseline_token is None:
            return m
        return f"{m} − logit({escape_token(self.baseline_token)})"

    def plot(self, title: str | None = None) -> go.Figure:
        """Bars per part: ``embed``, ``L0 attn``, ``L0 mlp``, ... (they sum to the logit)."""
        return bars(self.values, self.labels, y_title="contribution (logits)", title=title or (
            f"Direct logit attribution of {self._metric_html()} {self._where()}: total {self.logit:.3f}"))

    def plot_heads(self, title: str | None = None) -> go.Figure:
        """Heatmap ``layers x heads`` of each head's contribution (centred at 0)."""
        return heatmap(self.heads, [f"H{h}" for h in range(self.heads.shape[1])], self.layer_labels,
                       title=title or f"Heads' direct contributions to {self._metric_html()} {self._where()}",
                       x_title="head", y_title="layer", zmid=0.0, colorbar_title="logits")

    def plot_neurons(self, k: int | None = None, layer: int | None = None, title: str | None = None) -> go.Figure:
        """Bars of the top ``k`` neurons by ``|contribution|`` (overall, or within ``layer``)."""
        top = self.top_neurons(k, layer)
        return bars([t.value for t in top], [t.label for t in top], y_title="contribution (logits)",
                    title=title or f"Top neurons' direct contributions to {self._metric_html()} {self._where()}")


@torch.no_grad()
def direct_logit_attribution(model: Gemma3, prompt: Prompt, target: Target, baseline: Target | None = None,
                             position: int = -1, top_neurons: int = 10) -> DLAResult:
    """Split the logit of ``target`` (or ``logit(target) - logit(baseline)``) at ``position``
    into embedding, per-layer attention and MLP parts, per-head and per-neuron parts.

    ``target``/``baseline`` are token strings (first token of the encoding, without BOS) or
    ids. ``top_neurons`` is the default ``k`` of :meth:`DLAResult.top_neurons`. The parts sum
    to the actual logit to float32 rounding in a float32 model; in bfloat16 the per-layer parts
    still sum exactly to the bf16 residual's logit, while heads and neurons (recomputed in float32
    from bf16 activations) agree with their layer's part to bf16 rounding.

    >>> dla = direct_logit_attribution(model, "The capital of France is", " Paris", " London")  # doctest: +SKIP
    >>> dla.plot(); dla.plot_heads(); dla.plot_neurons()  # doctest: +SKIP
    """
    cfg = model.cfg
    ids = single_prompt(model, prompt)
    pos = resolve_position(position, ids.shape[1])
    t_id = token_id(model, target)
    b_id = token_id(model, baseline) if baseline is not None else None

    last = cfg.n_layers - 1
    names = ["embed", block_site(last, "resid_post")] + [
        block_site("*", s) for s in ("attn.z", "attn.out", "post_attn_norm", "mlp.hidden", "mlp.out", "post_mlp_norm")]
    logits, cache = model.run_with_cache(ids, names=names, positions=[pos], logits_at=[pos])
    row = logits[0, -1].float()
    check_finite(row, "direct_logit_attribution: the logits",
                 lambda: model.run_with_cache(ids, names=names, positions=[pos], logits_at=[pos]))
    actual = float(row[t_id] - row[b_id]) if b_id is not None else float(row[t_id])

    def at(name: str) -> torch.Tensor:  # [d] or [h, hd] or [f], float32, at the position
        return cache[name][0, 0].float()

    w_u = model.embed.weight
    direction = w_u[t_id].float() - (w_u[b_id].float() if b_id is not None else 0.0)
    u = direction * (1.0 + model.final_norm.weight.float()) * rms_factor(at(block_site(last, "resid_post")), cfg.eps)

    values = [u @ at("embed")]
    heads, neurons = [], []
    for i in range(cfg.n_layers):
        block = model.block(i)
        values += [u @ at(block_site(i, "post_attn_norm")), u @ at(block_site(i, "post_mlp_norm"))]
        u_attn = u * (1.0 + block.post_attn_norm.weight.float()) * rms_factor(at(block_site(i, "attn.out")), cfg.eps)
        w_o = block.attn.o_proj.weight.float().view(cfg.d_model, cfg.n_heads, cfg.d_head)
        heads.append(einsum(u_attn, w_o, at(block_site(i, "attn.z")), "d, d h e, h e -> h"))
        u_mlp = u * (1.0 + block.post_mlp_norm.weight.float()) * rms_factor(at(block_site(i, "mlp.out")), cfg.eps)
        neurons.append((u_mlp @ block.mlp.down_proj.weight.float()) * at(block_site(i, "mlp.hidden")))

    labels = ["embed"] + [f"L{i} {part}" for i in range(cfg.n_layers) for part in ("attn", "mlp")]
    t_tok, = str_tokens(model, [t_id])
    return DLAResult(
        tokens=str_tokens(model, ids[0]), position=pos, target=t_id, target_token=t_tok,
        baseline=b_id, baseline_token=str_tokens(model, [b_id])[0] if b_id is not None else None,
        logit=actual, labels=labels, values=torch.stack(values).cpu(), heads=torch.stack(heads).cpu(),
        neurons=torch.stack(neurons).cpu(), layer_labels=layer_labels(cfg)[1:], n_top=top_neurons,
    )

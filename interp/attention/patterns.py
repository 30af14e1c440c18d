"""Attention patterns with token labels: one head with a head selector, or every head side by side.

>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=16, n_heads=2,
...     n_kv_heads=1, d_head=8, vocab_size=20))
>>> attention_patterns(m, [2, 5, 6], layers=[0]).pattern(0).shape
torch.Size([2, 3, 3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch

from ..display import subplots
from ..hooks import HookSpec
from ..model import Gemma3
from ..model.inputs import Prompt
from ..plots import escape_tokens, heatmap
from ..tokens import str_tokens
from .common import MAX_HOVER_TOKENS, as_tokens, layer_list, layer_title, patterns_of


@dataclass
class PatternResult:
    """Attention patterns of some layers for one run, with the token strings to label them.

    ``patterns[layer]`` is ``[batch, heads, query, key]``; ``tokens[row]`` the (raw, unescaped)
    token strings of each row and ``ids`` the token ids ``[batch, seq]``.
    """

    ids: torch.Tensor
    tokens: list[list[str]]
    patterns: dict[int, torch.Tensor]
    cfg: Any

    def pattern(self, layer: int, head: int | None = None, row: int = 0) -> torch.Tensor:
        """``[heads, query, key]`` of ``row`` (``[query, key]`` for one ``head``)."""
        if layer not in self.patterns:
            raise KeyError(f"layer {layer} was not computed; have layers {sorted(self.patterns)}")
        p = self.patterns[layer][row]
        return p if head is None else p[head]

    def _labels(self, row: int) -> list[str]:
        return self.tokens[row]

    def _hover(self, row: int) -> list[list[str]] | None:
        toks = self._labels(row)
        if len(toks) > MAX_HOVER_TOKENS:
            return None
        return [[f"query {q}: {toks[q]}  →  key {k}: {toks[k]}" for k in range(len(toks))]
                for q in range(len(toks))]

    def plot(self, layer: int, head: int | None = None, row: int = 0) -> go.Figure:
        """Heatmap query (rows) x key (columns) with token labels; ``head=None`` shows every
        head with a dropdown (head selector) to switch between them.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=16, d_mlp=16, n_heads=2,
        ...     n_kv_heads=1, d_head=8, vocab_size=20))
        >>> fig = attention_patterns(m, [2, 5, 6]).plot(0)
        >>> len(fig.data), len(fig.layout.updatemenus[0].buttons)
        (2, 2)
        """
        p = self.pattern(layer, row=row)
        toks, hover = self._labels(row), self._hover(row)
        heads = range(p.shape[0]) if head is None else [head]
        base = layer_title(self.cfg, layer)
        figs = [heatmap(p[h], toks, toks, title=f"{base}, head {h}", x_title="key", y_title="query",
                        hover=hover, colorscale="Blues", colorbar_title="attention") for h in heads]
        fig = figs[0]
        fig.data[0].update(zmin=0.0, zmax=1.0, name=f"head {list(heads)[0]}")
        if head is not None:
            return fig
        for h, other in zip(heads, figs):
            if h == 0:
                continue
            fig.add_trace(other.data[0].update(visible=False, zmin=0.0, zmax=1.0, name=f"head {h}"))
        n = len(fig.data)
        buttons = [dict(label=f"head {h}", method="update",
                        args=[{"visible": [i == h for i in range(n)]}, {"title.text": f"{base}, head {h}"}])
                   for h in range(n)]
        fig.update_layout(updatemenus=[dict(type="dropdown", buttons=buttons, active=0, direction="down",
                                            x=1.0, xanchor="right", y=1.12, yanchor="bottom")])
        return fig

    def plot_grid(self, layer: int, row: int = 0, cols: int = 4) -> go.Figure:
        """Every head of ``layer`` side by side (small multiples), one shared colour scale.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=16, d_mlp=16, n_heads=2,
        ...     n_kv_heads=1, d_head=8, vocab_size=20))
        >>> len(attention_patterns(m, [2, 5, 6]).plot_grid(0).data)
        2
        """
        p = self.pattern(layer, row=row).detach().float().cpu()
        n_heads, s = p.shape[0], p.shape[-1]
        cols = max(1, min(cols, n_heads))
        rows = math.ceil(n_heads / cols)
        labels = escape_tokens(self._labels(row))
        fig = subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in range(n_heads)],
                            horizontal_spacing=0.04, vertical_spacing=0.08)
        hover = [[f"{labels[q]} → {labels[k]}" for k in range(s)] for q in range(s)] if s <= MAX_HOVER_TOKENS else None
        for h in range(n_heads):
            r, c = h // cols + 1, h % cols + 1
            fig.add_trace(go.Heatmap(z=p[h].numpy(), x=list(range(s)), y=list(range(s)), coloraxis="coloraxis",
                                     customdata=hover, name=f"head {h}",
                                     hovertemplate=(f"head {h}<br>query %{{y}} · key %{{x}}<br>%{{z:.3f}}"
                                                    + ("<br>%{customdata}" if hover else "") + "<extra></extra>")),
                          row=r, col=c)
            fig.update_xaxes(tickmode="array", tickvals=list(range(s)), ticktext=labels, tickangle=-45,
                             tickfont=dict(size=8), row=r, col=c)
            fig.update_yaxes(tickmode="array", tickvals=list(range(s)), ticktext=labels, autorange="reversed",
                             tickfont=dict(size=8), row=r, col=c)
        fig.update_layout(title=layer_title(self.cfg, layer), template="plotly_white",
                          coloraxis=dict(colorscale="Blues", cmin=0.0, cmax=1.0), height=320 * rows + 80)
        return fig


def attention_patterns(model: Gemma3, prompt: Prompt, layers: int | Sequence[int] | None = None, *,
                       hooks: HookSpec = None) -> PatternResult:
    """Attention patterns of ``layers`` (default: all) for ``prompt`` (text or token ids).

    Caches only ``blocks.{i}.attn.pattern`` of those layers and stops after the last one.

    >>> from interp.model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=16, n_heads=2,
    ...     n_kv_heads=1, d_head=8, vocab_size=20))
    >>> res = attention_patterns(m, [2, 5, 6, 7], layers=[1])
    >>> res.pattern(1).shape, res.tokens[0]
    (torch.Size([2, 4, 4]), ['2', '5', '6', '7'])
    """
    ids = as_tokens(model, prompt)
    layers = layer_list(model, layers)
    pats = patterns_of(model, ids, layers, hooks)
    return PatternResult(ids, [str_tokens(model, row) for row in ids], pats, model.cfg)


__all__ = ["PatternResult", "attention_patterns"]

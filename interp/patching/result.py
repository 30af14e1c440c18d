"""What a patching sweep returns, and a side-by-side comparison of two sweeps.

>>> import torch
>>> r = PatchingResult(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), "resid_pre", ("layer", "pos"),
...                    ["The", " France"], ["The", " Italy"], 1.0, 0.0)
>>> r.top(1)[0].label
"blocks.0.resid_pre @ 1 ' France'"
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch

from ..display import figure, subplots
from ..model.sites import block_site
from ..plots import escape_text, escape_token, heatmap
from ..tokens import Top, top_entries


@dataclass
class PatchingResult:
    """One sweep's scores, normalised (0 = corrupt run, 1 = clean run), with labels.

    ``values`` has the shape ``axes`` names: ``("layer", "pos")``, ``("layer", "head")`` or
    ``("layer", "head", "pos")``; ``raw`` holds the metric itself. ``tokens`` and
    ``corrupt_tokens`` label positions. ``method`` says how the values were obtained
    (``"activation patching"`` or ``"attribution patching"``, a linear estimate).
    """

    values: torch.Tensor
    raw: torch.Tensor
    site: str
    axes: tuple[str, ...]
    tokens: list[str]
    corrupt_tokens: list[str]
    clean_value: float
    corrupt_value: float
    metric: str = "metric"
    method: str = "activation patching"
    skipped: int = 0  # experiments known to change nothing (not run; their value is the corrupt run's)

    def position_labels(self) -> list[str]:
        """``"i token"``, or ``"i clean/corrupt"`` where the two prompts differ (a token's leading
        space shown as ``·``; the plot escapes the rest).

        >>> r = PatchingResult(torch.zeros(1, 2), torch.zeros(1, 2), "resid_pre", ("layer", "pos"),
        ...                    ["The", " France"], ["The", " Italy"], 1.0, 0.0)
        >>> r.position_labels()
        ['0 The', '1 ·France/·Italy']
        """
        def vis(t: str) -> str:
            return "·" + t[1:] if t.startswith(" ") else t

        return [f"{i} {vis(c)}" if c == k else f"{i} {vis(c)}/{vis(k)}"
                for i, (c, k) in enumerate(zip(self.tokens, self.corrupt_tokens))]

    def index_labels(self, index: Sequence[int]) -> str:
        """A readable name for one cell, e.g. ``"blocks.3.resid_pre @ 5 ·Paris"``."""
        parts = dict(zip(self.axes, index))
        name = block_site(parts['layer'], 'attn.z' if 'head' in parts else self.site)
        if "head" in parts:
            name += f" head {parts['head']}"
        if "pos" in parts:
            name += f" @ {parts['pos']} {self.tokens[parts['pos']]!r}"
        return name

    def cells(self) -> list[tuple[int, ...]]:
        """Every index of ``values``, in row-major order."""
        return list(itertools.product(*(range(n) for n in self.values.shape)))

    def top(self, k: int = 10) -> list[Top]:
        """The ``k`` cells of largest ``|value|``, largest first (index, value, readable label)."""
        return top_entries(self.values, k, self.index_labels)

    def grid(self) -> tuple[torch.Tensor, list[str], list[str], str, str]:
        """The values as a 2-D ``[rows, cols]`` grid with row and column labels (for plotting)."""
        v = self.values.detach().float().cpu()
        if self.axes == ("layer", "pos"):
            return v, self.position_labels(), [f"L{i}" for i in range(v.shape[0])], "position", "layer"
        if self.axes == ("layer", "head"):
            return v, [f"H{h}" for h in range(v.shape[1])], [f"L{i}" for i in range(v.shape[0])], "head", "layer"
        layers, heads, _ = v.shape
        rows = [f"L{i}H{h}" for i in range(layers) for h in range(heads)]
        return v.reshape(layers * heads, -1), self.position_labels(), rows, "position", "layer.head"

    def plot(self, title: str | None = None, **kwargs: Any) -> go.Figure:
        """A heatmap (plotly) of the values with token labels, centred at 0."""
        z, x, y, xt, yt = self.grid()
        title = title or f"{self.method}: {self.site} ({escape_text(self.metric)}; 0 = corrupt, 1 = clean)"
        return heatmap(z, x, y, title=title, x_title=xt, y_title=yt, zmid=0.0, colorbar_title="score", **kwargs)

    def __repr__(self) -> str:
        return (f"PatchingResult({self.method}, site={self.site!r}, axes={self.axes}, "
                f"shape={tuple(self.values.shape)}, clean={self.clean_value:.4g}, corrupt={self.corrupt_value:.4g})")


@dataclass
class Comparison:
    """Actual patching next to an estimate of it (e.g. attribution patching), same format.

    >>> # c = compare(patch_sweep(...), attribution_patch(...)); c.sign_agreement(top=20); c.plot()
    """

    actual: PatchingResult
    estimate: PatchingResult

    def __post_init__(self) -> None:
        if self.actual.values.shape != self.estimate.values.shape or self.actual.axes != self.estimate.axes:
            raise ValueError(f"cannot compare {self.actual!r} with {self.estimate!r}: shapes or axes differ")

    def sign_agreement(self, top: int | None = 20) -> float:
        """Fraction of the ``top`` cells of largest ``|actual|`` (all if None) where the estimate has the same sign."""
        a = self.actual.values.flatten().float()
        e = self.estimate.values.flatten().float()
        idx = a.abs().argsort(descending=True)
        if top is not None:
            idx = idx[:top]
        return float((torch.sign(a[idx]) == torch.sign(e[idx])).float().mean())

    def correlation(self) -> float:
        """Pearson correlation of actual and estimated values over all cells."""
        a = self.actual.values.flatten().double()
        e = self.estimate.values.flatten().double()
        a, e = a - a.mean(), e - e.mean()
        return float((a * e).sum() / (a.norm() * e.norm()).clamp_min(1e-30))

    def scatter(self, title: str | None = None) -> go.Figure:
        """Estimate against actual, one point per cell (hover names the site)."""
        a, e = self.actual.values.flatten(), self.estimate.values.flatten()
        names = [escape_token(self.actual.index_labels(cell)) for cell in self.actual.cells()]
        lo, hi = float(torch.minimum(a.min(), e.min())), float(torch.maximum(a.max(), e.max()))
        fig = figure([
            go.Scatter(x=a.tolist(), y=e.tolist(), mode="markers", text=names, name="sites",
                       hovertemplate="%{text}<br>actual %{x:.4g}<br>estimate %{y:.4g}<extra></extra>"),
            go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"), name="y = x"),
        ])
        fig.update_layout(title=title or f"{self.estimate.method} vs {self.actual.method}: {self.actual.site} "
                                         f"(r = {self.correlation():.3f})",
                          xaxis_title=self.actual.method, yaxis_title=self.estimate.method, template="plotly_white")
        return fig

    def plot(self, title: str | None = None, scatter: bool = True) -> go.Figure:
        """Both heatmaps side by side on one colour scale, and (``scatter``) estimate vs actual."""

        cols = 3 if scatter else 2
        fig = subplots(rows=1, cols=cols, horizontal_spacing=0.08,
                            subplot_titles=[self.actual.method, self.estimate.method, "estimate vs actual"][:cols])
        bound = max(float(self.actual.values.abs().max()), float(self.estimate.values.abs().max()), 1e-12)
        for col, result in ((1, self.actual), (2, self.estimate)):
            single = result.plot()
            trace = single.data[0]
            trace.update(zmin=-bound, zmax=bound, zmid=None, showscale=col == 2, coloraxis=None)
            fig.add_trace(trace, row=1, col=col)
            fig.update_xaxes(single.layout.xaxis, row=1, col=col)
            fig.update_yaxes(single.layout.yaxis, row=1, col=col)
        if scatter:
            for trace in self.scatter().data:
                fig.add_trace(trace, row=1, col=3)
            fig.update_xaxes(title="actual", row=1, col=3)
            fig.update_yaxes(title="estimate", row=1, col=3)
        fig.update_layout(title=title or f"{self.actual.site}: {self.actual.method} vs {self.estimate.method} "
                                         f"(sign agreement on top 20: {self.sign_agreement(20):.0%})",
                          template="plotly_white", showlegend=False, width=520 * cols, height=520)
        return fig


def compare(actual: PatchingResult, estimate: PatchingResult) -> Comparison:
    """Put two results of the same sweep side by side: ``compare(actual, estimate).plot()``."""
    return Comparison(actual, estimate)


__all__ = ["PatchingResult", "Comparison", "compare"]

"""What :mod:`.quality` and :mod:`.quality_clt` share: the result of one dictionary's (or one
CLT layer's) evaluation, CE loss recovered, and reading a store's rows and aligned batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.corpus import PAD_DOC
from ..display import figure
from ..evaluation import lm_loss
from ..model import Gemma3


def recovered(ce_zero: float | None, ce_clean: float | None, ce_spliced: float | None) -> float | None:
    """CE loss recovered, ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)``: None when a loss is
    missing, NaN when zero-ablating changes nothing.

    >>> recovered(4.0, 2.0, 2.5)
    0.75
    """
    if ce_clean is None or ce_spliced is None or ce_zero is None:
        return None
    gap = ce_zero - ce_clean
    return (ce_zero - ce_spliced) / gap if gap != 0 else math.nan


@dataclass
class FeatureEval:
    """What :func:`evaluate` returns. ``frequency [d_sae]`` is the fraction of evaluated tokens
    on which each feature fires; the ``ce_*`` fields are None when the loss was not evaluated."""

    site: str
    site_out: str | None
    n_tokens: int
    d_sae: int
    l0: float
    fvu: float
    mse: float
    frequency: torch.Tensor
    dense_threshold: float = 0.1
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero: float | None = None
    ce_tokens: int = 0
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def explained_variance(self) -> float:
        """``1 - FVU``."""
        return 1.0 - self.fvu

    @property
    def ce_recovered(self) -> float | None:
        """``(CE_zero - CE_spliced) / (CE_zero - CE_clean)`` (NaN when zero-ablating changes nothing)."""
        return recovered(self.ce_zero, self.ce_clean, self.ce_spliced)

    @property
    def dead(self) -> torch.Tensor:
        """Indices of the features that never fired."""
        return (self.frequency == 0).nonzero().flatten()

    @property
    def dense(self) -> torch.Tensor:
        """Indices of the features that fired on more than ``dense_threshold`` of the tokens."""
        return (self.frequency > self.dense_threshold).nonzero().flatten()

    @property
    def n_dead(self) -> int:
        return int((self.frequency == 0).sum())

    @property
    def n_dense(self) -> int:
        return int((self.frequency > self.dense_threshold).sum())

    def table(self) -> list[tuple[str, Any]]:
        """``[(metric, value), ...]``: plain Python numbers (and the site names)."""
        rows: list[tuple[str, Any]] = [("site", self.site if not self.site_out else f"{self.site} -> {self.site_out}"),
                                       ("tokens", self.n_tokens), ("features", self.d_sae), ("L0", self.l0),
                                       ("FVU", self.fvu), ("explained variance", self.explained_variance),
                                       ("MSE per token", self.mse), ("dead features", self.n_dead),
                                       (f"dense features (> {self.dense_threshold:.0%})", self.n_dense)]
        if self.ce_clean is not None:
            rows += [("CE clean", self.ce_clean), ("CE spliced", self.ce_spliced), ("CE zero-ablated", self.ce_zero),
                     ("CE loss recovered", self.ce_recovered), ("CE tokens", self.ce_tokens)]
        return rows

    def __repr__(self) -> str:
        head = f"FeatureEval  {self.name}" if self.name else "FeatureEval"
        lines = [head]
        for metric, value in self.table():
            lines.append(f"  {metric:<26} {format_value(value):>14}")
        return "\n".join(lines)

    def _title(self) -> str:
        parts = [f"L0 {self.l0:.1f}", f"FVU {self.fvu:.3f}"]
        if self.ce_recovered is not None:
            parts.append(f"CE recovered {self.ce_recovered:.1%}")
        parts += [f"{self.n_dead} dead", f"{self.n_dense} dense"]
        return " · ".join(parts)

    def plot(self) -> Any:
        """A histogram of ``log10`` feature frequency: live features in blue, dense ones (right of
        the dashed line) in red, dead ones as one grey bar on the left; the title holds the key
        numbers of :meth:`table`."""
        import plotly.graph_objects as go

        from ..plots import escape_text

        freq = self.frequency.double()
        live = freq[freq > 0]
        floor = math.log10(1.0 / max(self.n_tokens, 1))
        log = live.log10()
        dense = log[live > self.dense_threshold]
        normal = log[live <= self.dense_threshold]
        fig = figure()
        fig.add_trace(go.Histogram(x=normal.tolist(), name="live", marker_color="#2166ac",
                                   xbins=dict(start=floor - 0.05, end=0.05, size=0.1)))
        fig.add_trace(go.Histogram(x=dense.tolist(), name=f"dense (> {self.dense_threshold:.0%})",
                                   marker_color="#b2182b", xbins=dict(start=floor - 0.05, end=0.05, size=0.1)))
        fig.add_trace(go.Bar(x=[floor - 0.5], y=[self.n_dead], width=[0.3], name="dead (never fire)",
                             marker_color="#888888"))
        fig.add_vline(x=math.log10(self.dense_threshold), line_dash="dash", line_color="#b2182b")
        title = escape_text(f"{self.name or self.site}: {self._title()}")
        fig.update_layout(title=title, template="plotly_white", barmode="overlay", bargap=0.05,
                          xaxis_title=f"log10 firing frequency ({self.n_tokens:,} tokens)",
                          yaxis_title="features")
        return fig


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def aligned_batches(store: Any, sites: list[str], batch_size: int, device: Any, dtype: torch.dtype) -> Any:
    """Unshuffled batches of several sites, token for token aligned (same rows, same order)."""
    gens = [store.batches(s, batch_size, shuffle=False, device=device, dtype=dtype) for s in sites]
    return zip(*gens)


def ce_rows(store: Any, ce_tokens: int | None) -> list[torch.Tensor]:
    """The store's rows (padding left out) up to ``ce_tokens`` tokens (at least one row)."""
    rows: list[torch.Tensor] = []
    total = 0
    for r in range(store.n_rows):
        ids = store.ids[r][store.doc[r] != PAD_DOC]
        if rows and ce_tokens is not None and total + ids.numel() > ce_tokens:
            break
        if ids.numel() >= 2:
            rows.append(ids)
            total += ids.numel()
    return rows




def lm_effect(model: Gemma3, texts: Any, store: Any, ce_tokens: int | None, lm_batch_size: int, progress: bool,
              splice: Any, zero: Any, clean: float | None = None) -> tuple[float, float, float, int]:
    """``(CE clean, CE spliced, CE zero-ablated, tokens)`` on ``texts`` (else the store's rows up to
    ``ce_tokens``): the model's loss as it is (or ``clean`` when the caller has it), with the hooks
    ``splice`` and with the hooks ``zero``."""
    rows: Any = list(texts) if texts is not None else ce_rows(store, ce_tokens)
    if not rows:
        raise ValueError("no text to evaluate the loss on (pass texts=, or a store with rows of 2+ tokens)")
    common: dict[str, Any] = {"batch_size": lm_batch_size, "progress": progress}
    clean = clean if clean is not None else lm_loss(model, rows, **common).mean
    spliced = lm_loss(model, rows, hooks=splice, **common)
    zeroed = lm_loss(model, rows, hooks=zero, **common)
    return clean, spliced.mean, zeroed.mean, spliced.n_tokens


__all__ = ["FeatureEval", "recovered", "format_value", "aligned_batches", "ce_rows", "lm_effect"]

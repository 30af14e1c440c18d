"""Small plotly helpers shared by every analysis: escaped token labels and labelled heatmaps.

Token text is untrusted (a model can emit ``<script>``): every label and hover text goes
through :func:`escape_token` before it reaches a figure. Plotly renders labels as a small
HTML subset, so ``<``, ``>`` and ``&`` must be escaped; quotes must not be (plotly does not
decode ``&quot;`` and would show it literally; a test reads the rendered text in Chromium).

>>> escape_token("<b>\\n")
'&lt;b&gt;↵'
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from .display import figure

_BYTE = re.compile(r"\\x([0-9a-fA-F]{2})")
_UNPRINTABLE = {"Cc", "Cf", "Co", "Cn", "Cs", "Zl", "Zp"}


def _readable(ch: str) -> str:
    """A character that draws nothing or a missing-glyph box (control, format, private-use,
    unassigned, surrogate) as its code point; others as they are."""
    return f"⟨U+{ord(ch):04X}⟩" if unicodedata.category(ch) in _UNPRINTABLE else ch


def escape_token(text: str) -> str:
    r"""HTML-escape a token and make it readable: whitespace visible (newline ↵, tab ⇥, leading or
    trailing space ·), a byte-fallback token (one byte of a longer UTF-8 character, ``'\\xee'``) as
    ``⟨0xEE⟩``, characters that draw nothing as their code point, and a leading combining mark on ◌.

    >>> escape_token(" Paris"), escape_token('say "hi"'), escape_token("\\xee"), escape_token("\u200b")
    ('·Paris', 'say "hi"', '⟨0xEE⟩', '⟨U+200B⟩')
    """
    byte = _BYTE.fullmatch(text)
    if byte:
        return f"⟨0x{byte.group(1).upper()}⟩"
    text = html.escape(text, quote=False).replace("\n", "↵").replace("\t", "⇥").replace("\r", "⏎")
    if text.startswith(" "):
        text = "·" + text[1:]
    if text.endswith(" ") and len(text) > 1:
        text = text[:-1] + "·"
    text = "".join(_readable(ch) for ch in text)
    if text and unicodedata.category(text[0]) in ("Mn", "Me"):
        text = "◌" + text
    return text if text else "∅"


def escape_text(text: str) -> str:
    """HTML-escape free text (a title holding token strings) for a figure: ``<``, ``>``, ``&`` only.

    >>> escape_text("logit_diff('<b>', ' x')")
    "logit_diff('&lt;b&gt;', ' x')"
    """
    return html.escape(text, quote=False)


def escape_tokens(tokens: Sequence[str]) -> list[str]:
    """:func:`escape_token` on each token."""
    return [escape_token(t) for t in tokens]


def _array(z: Any) -> np.ndarray:
    if isinstance(z, torch.Tensor):
        z = z.detach().float().cpu().numpy()
    return np.asarray(z, dtype=float)


def heatmap(z: Any, x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None, *,
            title: str = "", x_title: str = "", y_title: str = "", text: Sequence[Sequence[str]] | None = None,
            hover: Sequence[Sequence[str]] | None = None, zmid: float | None = None,
            colorscale: str = "RdBu", reverse_y: bool = True, colorbar_title: str = "") -> go.Figure:
    """A heatmap of ``z [rows, cols]`` with (escaped) tick labels; duplicate labels stay distinct.

    ``text`` writes a string in each cell, ``hover`` adds a line to each cell's hover box
    (both are escaped here). ``zmid`` centres a diverging colour scale.

    >>> fig = heatmap([[0, 1], [2, 3]], ["a", "a"], ["l0", "l1"], title="t")
    >>> fig.data[0].z.shape
    (2, 2)
    """
    z = _array(z)
    rows, cols = z.shape
    x_labels = escape_tokens(x_labels) if x_labels is not None else [str(i) for i in range(cols)]
    y_labels = [escape_token(str(t)) for t in y_labels] if y_labels is not None else [str(i) for i in range(rows)]
    custom = None
    hovertemplate = f"{y_title or 'row'} %{{y}} · {x_title or 'col'} %{{x}}<br>value %{{z:.4g}}"
    if hover is not None:
        custom = np.array([[escape_token(str(h)).replace("↵", "<br>") for h in row] for row in hover], dtype=object)
        hovertemplate += "<br>%{customdata}"
    trace = go.Heatmap(
        z=z, x=list(range(cols)), y=list(range(rows)), colorscale=colorscale, zmid=zmid,
        customdata=custom, hovertemplate=hovertemplate + "<extra></extra>",
        colorbar=dict(title=colorbar_title) if colorbar_title else None,
    )
    if text is not None:
        trace.update(text=[[escape_token(str(t)) for t in row] for row in text], texttemplate="%{text}",
                     textfont=dict(size=9))
    fig = figure(trace)
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=60, r=20, t=50, b=60))
    fig.update_xaxes(title=x_title, tickmode="array", tickvals=list(range(cols)), ticktext=x_labels, tickangle=-45)
    fig.update_yaxes(title=y_title, tickmode="array", tickvals=list(range(rows)), ticktext=y_labels,
                     autorange="reversed" if reverse_y else True)
    return fig


def line(ys: Mapping[str, Any], x: Sequence | None = None, *, title: str = "", x_title: str = "",
         y_title: str = "", log_y: bool = False) -> go.Figure:
    """One line per entry of ``ys`` (legend names escaped).

    >>> line({"p": [0.1, 0.5]}, title="t").data[0].name
    'p'
    """
    fig = figure()
    for name, raw in ys.items():
        values = _array(raw)
        fig.add_trace(go.Scatter(x=list(x) if x is not None else list(range(len(values))), y=values,
                                 mode="lines+markers", name=escape_token(name)))
    fig.update_layout(title=title, template="plotly_white", xaxis_title=x_title, yaxis_title=y_title)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def bars(values: Any, labels: Sequence[str], *, title: str = "", y_title: str = "") -> go.Figure:
    """A bar chart of ``values`` with escaped ``labels``.

    >>> len(bars([1.0, -2.0], ["embed", "blocks.0.attn"]).data[0].x)
    2
    """
    values = _array(values)
    fig = figure(go.Bar(x=escape_tokens(labels), y=values,
                           marker_color=["#2166ac" if v >= 0 else "#b2182b" for v in values]))
    fig.update_layout(title=title, template="plotly_white", yaxis_title=y_title)
    return fig

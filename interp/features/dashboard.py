"""Feature dashboards: offline HTML pages that show what a dictionary feature responds to and what
it does.

- :func:`top_activations` scans an :class:`~interp.data.ActivationStore` **once** for any number of
  features, keeping a running top-k per feature (merged batch by batch with ``torch.topk``), the
  feature's activations in a window of tokens around each top activation, exact firing counts,
  and a uniform random sample of each feature's non-zero activations (for the histogram).
- :func:`feature_dashboard` writes one feature's page: its top-activating contexts (tokens
  shaded by the feature's activation), the histogram of its non-zero activations, and its top
  positive and negative logit effects.
- :func:`feature_index` writes a page per feature (one scan for all of them) and ``index.html``
  (frequency and top tokens of each feature, linking its page), plus ``index.json``.

Pages work offline: plotly.js is embedded once per page (or, in :func:`feature_index`'s folder,
written once as ``plotly.min.js`` next to the pages); nothing is fetched from a CDN. Token text is
untrusted (a model can emit ``<script>``): pages are Jinja2 templates with autoescaping
(:mod:`interp.pages`), so every value is escaped unless this module marks it safe.

**Logit effects** are the decoder direction read through the unembedding:
``(W_dec[f] * (1 + final_norm.weight)) @ W_E.T``. The final RMSNorm's data-dependent scale
``1 / rms(resid)`` is left out (it is the same positive factor for every token of the vocabulary
at a given position, so it changes the size of the effects, not their order). This is only
meaningful when the dictionary writes a residual-stream-shaped site that is added to the residual
stream (``resid_*``, ``post_attn_norm``, ``post_mlp_norm``, a transcoder's output).

>>> html_text = feature_dashboard(model, sae, 123, store, path="feature_123.html")   # doctest: +SKIP
>>> feature_index(model, sae, store, range(100), "features/")                          # doctest: +SKIP
PosixPath('features')
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from markupsafe import Markup

from ..data.corpus import PAD_DOC
from ..display import figure
from ..model import Gemma3
from ..pages import render, trusted
from .dictionary import Dictionary
from .scan import (
    RESIDUAL_KINDS,
    Effects,
    TopActivations,
    logit_effects,
    logit_effects_of,
    top_activations,
)

# ---------------------------------------------------------------------- pages
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 70em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.4em; font-size: 1.15em; }
.summary { color: #555; }
.ctx { font-family: ui-monospace, monospace; font-size: 13px; margin: 3px 0; white-space: nowrap; overflow-x: auto; }
.meta { display: inline-block; min-width: 15em; color: #777; }
.tok { white-space: pre; border-radius: 2px; padding: 0 1px; }
.tok.top { outline: 1.5px solid #b2182b; }
.tok.unknown { color: #999; }
table { border-collapse: collapse; margin-right: 2em; display: inline-table; vertical-align: top; }
td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
td.token { font-family: ui-monospace, monospace; white-space: pre; }
.note { color: #777; font-size: 0.9em; }
"""


FEATURE_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Feature {{ feature }} · {{ site }}</title>
<style>{{ style }}</style>
{% if plotlyjs == "inline" %}<script id="plotlyjs" type="text/javascript">{{ plotly_library }}</script>
{% else %}<script id="plotlyjs" type="text/javascript" src="{{ plotlyjs }}"></script>
{% endif %}</head><body>
{% if index_link %}<p><a href="index.html">&larr; all features</a></p>{% endif %}<h1>Feature {{ feature }}</h1>
<p class="summary">{{ site }} · fires on {{ "{:,}".format(count) }} of {{ "{:,}".format(n_tokens) }} tokens \
({{ "{:.4%}".format(frequency) }}) · max {{ "{:.4g}".format(max) }} · mean when firing {{ "{:.4g}".format(mean) }}</p>
<h2>Top activations</h2>
<div class="contexts">
{% for c in contexts %}<div class="ctx"><span class="meta">#{{ loop.index }} · {{ "{:.4g}".format(c.value) }} · \
{{ c.where }}</span>{% for t in c.tokens %}{% if t.act is none %}<span class="{{ t.cls }} unknown" \
title="not harvested">{{ t.text | token }}</span>{% else %}<span class="{{ t.cls }}" \
style="background: rgba(255, 90, 0, {{ "%.3f" | format(t.alpha) }})" title="activation {{ "{:.4g}".format(t.act) }}">\
{{ t.text | token }}</span>{% endif %}{% endfor %}</div>
{% else %}<p class="note">This feature never fires on the scanned tokens.</p>
{% endfor %}</div>
<h2>Activation histogram</h2>
{% if histogram %}{{ histogram }}{% else %}<p class="note">No non-zero activations.</p>{% endif %}
<h2>Logit effects</h2>
<div class="logits">{% if effects is none %}<p class="note">The dictionary writes width {{ d_out }}, not the \
residual stream's {{ d_model }}: no logit effects.</p>{% else %}{% for label, rows in effects %}<table><tr>\
<th>{{ label }}</th><th>effect</th></tr>{% for _, text, value in rows %}<tr><td class="token">{{ text | token }}</td>\
<td class="num">{{ "%+.4g" | format(value) }}</td></tr>{% endfor %}</table>{% endfor %}<p class="note">W_dec[f] · \
(1 + final_norm.weight) projected on the unembedding; the final norm's data-dependent scale (1 / rms of the residual) \
is left out: it scales every token's effect alike.{% if caveat %} {{ caveat }} is not added to the residual stream as \
it is: read these with care.{% endif %}</p>{% endif %}</div>
</body></html>
"""

INDEX_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Features · {{ site }}</title>
<style>{{ style }}</style>
</head><body>
<h1>{{ "{:,}".format(entries | length) }} features of {{ kind }} ({{ "{:,}".format(d_sae) }} features) at \
{{ site }}</h1>
<p class="summary">{{ "{:,}".format(n_tokens) }} tokens scanned.</p>
<table>
<tr><th>feature</th><th>frequency</th><th>tokens</th><th>max</th><th>top tokens</th></tr>
{% for e in entries %}<tr><td><a href="{{ e.page }}">{{ e.feature }}</a></td><td class="num">\
{{ "{:.4%}".format(e.frequency) }}</td><td class="num">{{ "{:,}".format(e.count) }}</td><td class="num">\
{{ "{:.4g}".format(e.max) }}</td><td class="token">{% for t in e.top_tokens %}<span class="tok">{{ t | token }}</span>\
{% if not loop.last %} {% endif %}{% endfor %}</td></tr>
{% endfor %}</table>
</body></html>
"""


class _Tokens:
    """Token strings of store rows (cached): a row's tokens by position (padding left out)."""

    def __init__(self, model: Gemma3, store: Any, tokenizer: Any):
        self.store = store
        self.tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.cache: dict[int, dict[int, str]] = {}

    def row(self, r: int) -> dict[int, str]:
        if r not in self.cache:
            where = (self.store.doc[r] != PAD_DOC).nonzero().flatten().tolist()
            if self.tok is not None:
                strings = self.store.token_strings(r, self.tok)
            else:
                strings = [str(int(self.store.ids[r, p])) for p in where]
            self.cache[r] = dict(zip(where, strings))
        return self.cache[r]


def _contexts(tops: TopActivations, feature: int, tokens: _Tokens) -> list[dict[str, Any]]:
    """Each top activation's context: where it is, and its tokens with their shading."""
    i = tops.index_of(feature)
    top = tops.top(feature)
    scale = max((v for _, _, v in top), default=0.0)
    out = []
    for n, (row, pos, value) in enumerate(top):
        strings = tokens.row(row)
        doc, doc_pos = int(tokens.store.doc[row, pos]), int(tokens.store.pos[row, pos])
        where = f"row {row}, token {pos}" + (f" (document {doc}, token {doc_pos})" if doc >= 0 else "")
        spans = []
        for j, p in enumerate(range(pos - tops.before, pos + tops.after + 1)):
            if p not in strings:
                continue
            act = float(tops.windows[i, n, j])
            alpha = max(0.0, min(1.0, act / scale)) if scale > 0 and not math.isnan(act) else 0.0
            spans.append({"cls": "tok top" if p == pos else "tok", "text": strings[p], "alpha": alpha,
                          "act": None if math.isnan(act) else act})
        out.append({"value": value, "where": where, "tokens": spans})
    return out


def _histogram(tops: TopActivations, feature: int, div_id: str) -> Markup | None:
    import plotly.graph_objects as go

    i = tops.index_of(feature)
    values = tops.sample[i]
    if not values.numel():
        return None
    shown = "all" if values.numel() == int(tops.count[i]) else f"a uniform sample of {values.numel():,} of"
    fig = figure(go.Histogram(x=values.tolist(), nbinsx=50, marker_color="#e66101"))
    fig.update_layout(template="plotly_white", height=300, margin=dict(l=50, r=20, t=40, b=40),
                      title=f"non-zero activations ({shown} {int(tops.count[i]):,})",
                      xaxis_title="activation", yaxis_title="tokens")
    return trusted(fig.to_html(include_plotlyjs=False, full_html=False, div_id=div_id))


def _page(model: Gemma3, dictionary: Dictionary, feature: int, tops: TopActivations, tokens: _Tokens, *, k_logits: int,
          plotlyjs: str, index_link: bool = False, effects: Effects | None = None) -> str:
    from plotly.offline import get_plotlyjs

    d = dictionary
    i = tops.index_of(feature)
    count = int(tops.count[i])
    effects = effects if effects is not None else logit_effects(model, d, feature, k_logits)
    writes = d.writes or ""
    kind = writes.split(".", 2)[-1] if writes.startswith("blocks.") else writes
    site = d.site if not (d.site_out and d.site_out != d.site) else f"{d.site} -> {d.site_out}"
    return render(FEATURE_PAGE, feature=int(feature), site=site, style=trusted(STYLE), plotlyjs=plotlyjs,
                  plotly_library=trusted(get_plotlyjs()) if plotlyjs == "inline" else "", index_link=index_link,
                  count=count, n_tokens=tops.n_tokens, frequency=tops.frequency(feature), max=float(tops.max[i]),
                  mean=float(tops.total[i]) / count if count else 0.0, contexts=_contexts(tops, feature, tokens),
                  histogram=_histogram(tops, feature, f"hist-{int(feature)}"),
                  effects=None if effects is None else [("raises", effects[0]), ("lowers", effects[1])],
                  d_out=d.d_out, d_model=model.cfg.d_model, caveat="" if kind in RESIDUAL_KINDS else writes)


class Page(str):
    """An HTML page (a ``str``) that a notebook shows as one line, not megabytes of markup.

    >>> Page("<html>" + "x" * 2_000_000, path="f1.html")
    <HTML page, 2.0 MB, written to f1.html>
    """

    path: Path | None

    def __new__(cls, html: str, path: str | os.PathLike | None = None) -> Page:
        page = super().__new__(cls, html)
        page.path = None if path is None else Path(path)
        return page

    def __repr__(self) -> str:
        where = f", written to {self.path}" if self.path is not None else ""
        return f"<HTML page, {len(self.encode('utf-8')) / 1e6:.1f} MB{where}>"


def feature_dashboard(model: Gemma3, dictionary: Dictionary, feature: int, store: Any, *, k: int = 20,
                      path: str | os.PathLike | None = None, window: tuple[int, int] = (12, 4),
                      k_logits: int | None = None, tokenizer: Any = None, site: str | None = None,
                      progress: bool = True) -> Page:
    """One feature's offline HTML page (see the module docstring): its ``k`` top-activating
    contexts from ``store`` (``window`` tokens before/after, shaded by the feature's activation),
    the histogram of its non-zero activations and its top ``k_logits`` (default ``k``) positive
    and negative logit effects. Written to ``path`` when given; returns the HTML as a :class:`Page`
    (a ``str`` whose repr is one line, so a notebook cell does not print the page). Token text
    comes from ``tokenizer`` (default the model's)."""
    d = dictionary
    tops = top_activations(d, store, [int(feature)], k=k, window=window, site=site, progress=progress)
    page = _page(model, d, int(feature), tops, _Tokens(model, store, tokenizer), k_logits=k_logits or k,
                 plotlyjs="inline")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(page, encoding="utf-8")
    return Page(page, path)


def page_name(feature: int) -> str:
    """The file of a feature's page in :func:`feature_index`'s folder."""
    return f"feature_{int(feature)}.html"


def feature_index(model: Gemma3, dictionary: Dictionary, store: Any, features: Iterable[int] | None,
                  out_dir: str | os.PathLike, *, k: int = 10, window: tuple[int, int] = (12, 4),
                  k_logits: int = 10, tokenizer: Any = None, site: str | None = None,
                  progress: bool = True) -> Path:
    """Pages for many ``features`` (default all) from **one** scan of ``store``, in ``out_dir``:
    ``feature_<f>.html`` each, ``index.html`` (each feature's frequency and top tokens, linking
    its page), ``index.json`` (the same, and each feature's top ``(row, position, activation)``)
    and ``plotly.min.js`` (shared by the pages; offline). ``features=None`` writes every feature's
    page. Returns the folder."""
    from plotly.offline import get_plotlyjs

    d = dictionary
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tops = top_activations(d, store, features, k=k, window=window, site=site, progress=progress)
    tokens = _Tokens(model, store, tokenizer)
    (out / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
    entries = []
    effects = logit_effects_of(model, d, tops.features.tolist(), k_logits)
    for f in tops.features.tolist():
        i = tops.index_of(f)
        (out / page_name(f)).write_text(_page(model, d, f, tops, tokens, k_logits=k_logits, plotlyjs="plotly.min.js",
                                              index_link=True, effects=effects.get(f)), encoding="utf-8")
        top = tops.top(f)
        common = Counter(tokens.row(r).get(p, "") for r, p, _ in top).most_common(5)
        entries.append({"feature": f, "page": page_name(f), "count": int(tops.count[i]),
                        "frequency": tops.frequency(f), "max": float(tops.max[i]),
                        "top_tokens": [t for t, _ in common], "top": [list(t) for t in top]})
    site_name = tops.site
    (out / "index.json").write_text(json.dumps({"site": site_name, "n_tokens": tops.n_tokens, "k": k,
                                                "features": entries}, indent=1), encoding="utf-8")
    index = render(INDEX_PAGE, site=site_name, style=trusted(STYLE), entries=entries, kind=type(d).__name__,
                   d_sae=d.d_sae, n_tokens=tops.n_tokens)
    (out / "index.html").write_text(index, encoding="utf-8")
    return out


__all__ = ["Page", "top_activations", "TopActivations", "feature_dashboard", "feature_index", "logit_effects",
           "logit_effects_of", "page_name"]

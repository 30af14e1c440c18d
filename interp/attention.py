"""Attention heads: patterns with token labels, head scores, attention distance, induction loss.

Everything here reads ``blocks.{i}.attn.pattern`` (``[batch, heads, query, key]``, after the
softmax, after any hooks) and caches nothing else. Head scores use one recipe: a boolean
*target* mask ``[batch, query, key]`` says where a head of a kind should attend; a head's
score is the attention it puts on the targets, averaged over the query positions that have
one. The kinds:

- ``previous_token``: the key just before the query (``k = q - 1``), queries ``q >= 1``.
- ``bos``: the first position (``k = 0``), queries ``q >= 1``.
- ``duplicate_token``: earlier positions holding the query's token.
- ``induction``: the positions right *after* an earlier occurrence of the query's token.

On ``BOS + r + r`` (``r`` random tokens without repeats, length ``n``), a query in the second
copy has exactly one duplicate target (``n`` back) and one induction target (``n - 1`` back).

>>> from model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
...     n_kv_heads=1, d_head=8, vocab_size=50))
>>> ind = head_scores(m, "induction", seq_len=8, batch=2)
>>> ind.scores.shape, len(ind.top(3))
(torch.Size([2, 2]), 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from hooks.interventions import zero_ablate

from .plots import escape_token, escape_tokens, heatmap, line, str_tokens

KINDS = ("previous_token", "induction", "duplicate_token", "bos")
HookSpec = Mapping[Any, Callable] | Sequence[tuple[Any, Callable]] | None
GEMMA3_LAST_NORMAL_ID = 255_967  # Gemma 3 tokenizer: later ids are tab runs, image and <unused> tokens
_MAX_HOVER_TOKENS = 200  # per-cell hover text only up to this many tokens (s^2 strings per head)


# ---------------------------------------------------------------------- tokens
def random_token_range(cfg) -> tuple[int, int]:
    """``[low, high)`` ids to sample random tokens from, avoiding special ids.

    A large vocabulary skips its first 1000 ids (Gemma keeps pad/eos/bos/unk, ``<unused>``
    and chat-control tokens there); the Gemma 3 vocabulary (>= 256000 ids) also stops at
    255968, where tab runs, image markers and ~6000 more ``<unused>`` tokens begin. A tiny
    vocabulary skips only the pad/eos/bos ids.

    >>> from model import Gemma3Config
    >>> random_token_range(Gemma3Config.preset("1b")), random_token_range(Gemma3Config(vocab_size=100))
    ((1000, 255968), (3, 100))
    """
    if cfg.vocab_size >= 256_000:
        return 1000, GEMMA3_LAST_NORMAL_ID + 1
    if cfg.vocab_size >= 2000:
        return 1000, cfg.vocab_size
    return max(cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) + 1, cfg.vocab_size


def repeated_random_tokens(model_or_cfg, seq_len: int = 50, batch: int = 4, seed: int = 0, *,
                           repeats: int = 2, bos: bool = True, low: int | None = None,
                           high: int | None = None) -> torch.Tensor:
    """``BOS + r * repeats`` per row: ``[batch, bos + repeats * seq_len]`` token ids.

    ``r`` is ``seq_len`` distinct ids drawn (seeded) from ``[low, high)`` (default
    :func:`random_token_range`), so every repeat of a token is an exact copy of one earlier
    position. ``repeats=1`` gives plain random tokens.

    >>> from model import Gemma3Config
    >>> t = repeated_random_tokens(Gemma3Config(vocab_size=100), seq_len=3, batch=1)
    >>> t.shape, bool((t[0, 1:4] == t[0, 4:7]).all()), int(t[0, 0])
    (torch.Size([1, 7]), True, 2)
    """
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    lo, hi = random_token_range(cfg)
    lo, hi = (lo if low is None else low), (hi if high is None else high)
    if seq_len < 1 or batch < 1 or repeats < 1:
        raise ValueError(f"seq_len, batch and repeats must be positive, got {seq_len}, {batch}, {repeats}")
    if seq_len > hi - lo:
        raise ValueError(f"cannot draw {seq_len} distinct tokens from ids [{lo}, {hi}); use a shorter seq_len")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(hi - lo, generator=gen)[:seq_len] + lo for _ in range(batch)])
    out = rows.repeat(1, repeats)
    if bos:
        out = torch.cat((torch.full((batch, 1), cfg.bos_token_id, dtype=torch.long), out), dim=1)
    return out


def _as_tokens(model, prompt) -> torch.Tensor:
    ids, mask = model.to_tokens(prompt)
    if mask is not None:
        raise ValueError("attention analyses need unpadded input: pass one prompt, or token ids "
                         "of equal length [batch, seq]")
    return ids


def _layers(model, layers) -> list[int]:
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    layers = [layers] if isinstance(layers, int) else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} are outside 0..{n - 1}")
    return sorted(set(layers))


@torch.no_grad()
def _patterns(model, tokens: torch.Tensor, layers: list[int], hooks: HookSpec = None) -> dict[int, torch.Tensor]:
    """``{layer: pattern [b, h, s, s]}``; runs only up to the last requested layer."""
    names = [f"blocks.{i}.attn.pattern" for i in layers]
    _, cache = model.run_with_cache(tokens, names, hooks=hooks, stop_at_layer=max(layers) + 1)
    return {i: cache[f"blocks.{i}.attn.pattern"] for i in layers}


def _layer_label(cfg, layer: int) -> str:
    return f"L{layer} global" if cfg.is_global(layer) else f"L{layer} local"


def _layer_title(cfg, layer: int) -> str:
    return f"layer {layer} (global)" if cfg.is_global(layer) else f"layer {layer} (local, window {cfg.window})"


# ---------------------------------------------------------------------- patterns
@dataclass
class PatternResult:
    """Attention patterns of some layers for one run, with the token strings to label them.

    ``patterns[layer]`` is ``[batch, heads, query, key]``; ``str_tokens[row]`` the (raw,
    unescaped) token strings of each row.
    """

    tokens: torch.Tensor
    str_tokens: list[list[str]]
    patterns: dict[int, torch.Tensor]
    cfg: Any

    def pattern(self, layer: int, head: int | None = None, row: int = 0) -> torch.Tensor:
        """``[heads, query, key]`` of ``row`` (``[query, key]`` for one ``head``)."""
        if layer not in self.patterns:
            raise KeyError(f"layer {layer} was not computed; have layers {sorted(self.patterns)}")
        p = self.patterns[layer][row]
        return p if head is None else p[head]

    def _labels(self, row: int) -> list[str]:
        return self.str_tokens[row]

    def _hover(self, row: int) -> list[list[str]] | None:
        toks = self._labels(row)
        if len(toks) > _MAX_HOVER_TOKENS:
            return None
        return [[f"query {q}: {toks[q]}  →  key {k}: {toks[k]}" for k in range(len(toks))]
                for q in range(len(toks))]

    def plot(self, layer: int, head: int | None = None, row: int = 0) -> go.Figure:
        """Heatmap query (rows) x key (columns) with token labels; ``head=None`` shows every
        head with a dropdown (head selector) to switch between them.

        >>> from model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=16, d_mlp=16, n_heads=2,
        ...     n_kv_heads=1, d_head=8, vocab_size=20))
        >>> fig = attention_patterns(m, [2, 5, 6]).plot(0)
        >>> len(fig.data), len(fig.layout.updatemenus[0].buttons)
        (2, 2)
        """
        p = self.pattern(layer, row=row)
        toks, hover = self._labels(row), self._hover(row)
        heads = range(p.shape[0]) if head is None else [head]
        base = _layer_title(self.cfg, layer)
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

        >>> from model import Gemma3, Gemma3Config
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
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in range(n_heads)],
                            horizontal_spacing=0.04, vertical_spacing=0.08)
        hover = [[f"{labels[q]} → {labels[k]}" for k in range(s)] for q in range(s)] if s <= _MAX_HOVER_TOKENS else None
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
        fig.update_layout(title=_layer_title(self.cfg, layer), template="plotly_white",
                          coloraxis=dict(colorscale="Blues", cmin=0.0, cmax=1.0), height=320 * rows + 80)
        return fig


def attention_patterns(model, prompt, layers: int | Sequence[int] | None = None, *,
                       hooks: HookSpec = None) -> PatternResult:
    """Attention patterns of ``layers`` (default: all) for ``prompt`` (text or token ids).

    Caches only ``blocks.{i}.attn.pattern`` of those layers and stops after the last one.

    >>> from model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=16, n_heads=2,
    ...     n_kv_heads=1, d_head=8, vocab_size=20))
    >>> res = attention_patterns(m, [2, 5, 6, 7], layers=[1])
    >>> res.pattern(1).shape, res.str_tokens[0]
    (torch.Size([2, 4, 4]), ['2', '5', '6', '7'])
    """
    tokens = _as_tokens(model, prompt)
    layers = _layers(model, layers)
    pats = _patterns(model, tokens, layers, hooks)
    return PatternResult(tokens, [str_tokens(model, row) for row in tokens], pats, model.cfg)


# ---------------------------------------------------------------------- head scores
def target_mask(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """Where a head of ``kind`` should attend: bool ``[batch, query, key]`` for ``tokens [batch, seq]``.

    >>> target_mask(torch.tensor([[2, 7, 8, 7, 8]]), "induction")[0, 3].nonzero().flatten().tolist()
    [2]
    >>> target_mask(torch.tensor([[2, 7, 8, 7, 8]]), "duplicate_token")[0, 4].nonzero().flatten().tolist()
    [2]
    """
    if kind not in KINDS:
        raise ValueError(f"unknown head-score kind {kind!r}; choose one of {list(KINDS)}")
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    s = tokens.shape[1]
    q = torch.arange(s, device=tokens.device)[:, None]
    k = torch.arange(s, device=tokens.device)[None, :]
    if kind == "previous_token":
        m = (k == q - 1)[None].expand(tokens.shape[0], -1, -1)
    elif kind == "bos":
        m = ((k == 0) & (q >= 1))[None].expand(tokens.shape[0], -1, -1)
    elif kind == "duplicate_token":
        m = (tokens[:, None, :] == tokens[:, :, None]) & (k < q)
    else:  # induction: key k follows an earlier occurrence (k - 1) of the query's token
        before = torch.cat((torch.full_like(tokens[:, :1], -1), tokens[:, :-1]), dim=1)  # token at k - 1
        m = (before[:, None, :] == tokens[:, :, None]) & (k >= 1) & (k < q)
    return m


def score_pattern(pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention on the targets, averaged over queries that have targets: ``[heads]``.

    ``pattern`` is ``[batch, heads, query, key]``, ``mask`` bool ``[batch, query, key]``.

    >>> p = torch.eye(3)[None, None]  # every query attends to itself
    >>> score_pattern(p, torch.eye(3, dtype=torch.bool)[None]), score_pattern(p, torch.ones(1, 3, 3, dtype=torch.bool))
    (tensor([1.]), tensor([1.]))
    """
    valid = mask.any(-1)  # [b, q]
    if not bool(valid.any()):
        raise ValueError("no query position has a target (e.g. the prompt repeats no token)")
    per_query = (pattern.float() * mask[:, None].float()).sum(-1)  # [b, h, q]
    return (per_query * valid[:, None].float()).sum((0, 2)) / valid.sum()


@dataclass
class HeadScores:
    """A score per head: ``scores[i, h]`` for layer ``layers[i]`` (all layers by default, so
    ``scores[layer, head]``). ``tokens`` are the ids it was measured on.
    """

    kind: str
    scores: torch.Tensor
    layers: list[int]
    cfg: Any
    tokens: torch.Tensor
    source: str = ""

    def top(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` best heads as ``(layer, head, score)``, highest first."""
        flat = self.scores.flatten()
        idx = flat.argsort(descending=True)[:k].tolist()
        h = self.scores.shape[1]
        return [(self.layers[i // h], i % h, float(flat[i])) for i in idx]

    def __getitem__(self, key: tuple[int, int]) -> float:
        layer, head = key
        return float(self.scores[self.layers.index(layer), head])

    def __repr__(self) -> str:
        best = ", ".join(f"L{l}H{h}={s:.3f}" for l, h, s in self.top(3))
        return f"HeadScores({self.kind}, {len(self.layers)} layers x {self.scores.shape[1]} heads; top: {best})"

    def plot(self, title: str | None = None) -> go.Figure:
        """Layer x head heatmap; global layers are labelled and outlined.

        >>> from model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=6, d_model=16, d_mlp=16, n_heads=2,
        ...     n_kv_heads=1, d_head=8, vocab_size=20))
        >>> list(head_scores(m, "bos", seq_len=4, batch=1).plot().layout.yaxis.ticktext)[-1]
        'L5 global'
        """
        n_layers, n_heads = self.scores.shape
        text = ([[f"{float(v):.2f}" for v in row] for row in self.scores] if n_layers * n_heads <= 600 else None)
        fig = heatmap(self.scores, [f"H{h}" for h in range(n_heads)], [_layer_label(self.cfg, i) for i in self.layers],
                      title=title or f"{self.kind.replace('_', '-')} score per head" + (f" ({self.source})" if self.source else ""),
                      x_title="head", y_title="layer", text=text, colorscale="Blues", colorbar_title="score")
        fig.data[0].update(zmin=0.0, zmax=max(1e-9, float(self.scores.max())))
        for r, layer in enumerate(self.layers):
            if self.cfg.is_global(layer):
                fig.add_shape(type="rect", x0=-0.5, x1=n_heads - 0.5, y0=r - 0.5, y1=r + 0.5,
                              line=dict(color="#d95f02", width=2))
        return fig


def head_scores(model, kind: str = "induction", prompt=None, *, seq_len: int = 50, batch: int = 4,
                seed: int = 0, layers: int | Sequence[int] | None = None,
                hooks: HookSpec = None) -> HeadScores | dict[str, HeadScores]:
    """Score every head for ``kind`` (one of :data:`KINDS`, or ``"all"`` for a dict of each).

    Without ``prompt`` the scores are measured on ``batch`` rows of repeated random tokens
    ``BOS + r + r`` (``len(r) = seq_len``, seeded; see :func:`repeated_random_tokens`). With a
    ``prompt`` (text or unpadded token ids) they are measured on it; ``duplicate_token`` and
    ``induction`` then need a prompt that repeats a token.

    >>> from model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
    ...     n_kv_heads=1, d_head=8, vocab_size=50))
    >>> all_scores = head_scores(m, "all", seq_len=6, batch=1)
    >>> sorted(all_scores), all_scores["bos"].scores.shape
    (['bos', 'duplicate_token', 'induction', 'previous_token'], torch.Size([2, 2]))
    """
    kinds = list(KINDS) if kind == "all" else [kind]
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown head-score kind {k!r}; choose one of {list(KINDS)} or 'all'")
    if prompt is None:
        tokens = repeated_random_tokens(model.cfg, seq_len, batch, seed).to(model.device)
        source = f"repeated random tokens, n={seq_len}, batch={batch}, seed={seed}"
    else:
        tokens = _as_tokens(model, prompt)
        source = "prompt"
    layers = _layers(model, layers)
    pats = _patterns(model, tokens, layers, hooks)
    out = {}
    for k in kinds:
        mask = target_mask(tokens, k)
        if not bool(mask.any()):
            raise ValueError(f"no query position of this prompt has a {k} target: "
                             "the prompt repeats no token (use prompt=None for repeated random tokens)")
        scores = torch.stack([score_pattern(pats[i], mask) for i in layers]).cpu()
        out[k] = HeadScores(k, scores, layers, model.cfg, tokens.cpu(), source)
    return out if kind == "all" else out[kind]


# ---------------------------------------------------------------------- attention distance
@dataclass
class AttentionDistance:
    """Mean attention distance ``sum_k pattern[q, k] * |q - k|`` averaged over queries (and
    rows): ``distance[i, h]`` for layer ``layers[i]``. A local layer's is below its window.
    """

    distance: torch.Tensor
    layers: list[int]
    cfg: Any
    seq_len: int
    is_global: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.is_global:
            self.is_global = [self.cfg.is_global(i) for i in self.layers]

    def plot(self, title: str | None = None) -> go.Figure:
        """Bars per head, grouped by layer; local and global layers in different colours,
        with the window limit drawn when the sequence is longer than the window.

        >>> from model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=6, d_model=16, d_mlp=16, n_heads=2,
        ...     n_kv_heads=1, d_head=8, vocab_size=20, window=3))
        >>> [t.name for t in attention_distance(m, seq_len=8).plot().data]
        ['local (window 3)', 'global']
        """
        n_heads = self.distance.shape[1]
        fig = go.Figure()
        for is_glob, name, colour in ((False, f"local (window {self.cfg.window})", "#1b9e77"), (True, "global", "#d95f02")):
            xs, ys = [], []
            for r, layer in enumerate(self.layers):
                if self.is_global[r] == is_glob:
                    for h in range(n_heads):
                        xs.append(escape_token(f"L{layer}H{h}"))
                        ys.append(float(self.distance[r, h]))
            if xs:
                fig.add_trace(go.Bar(x=xs, y=ys, name=name, marker_color=colour,
                                     hovertemplate="%{x}<br>mean distance %{y:.2f}<extra>" + name + "</extra>"))
        order = [escape_token(f"L{layer}H{h}") for layer in self.layers for h in range(n_heads)]
        fig.update_xaxes(categoryorder="array", categoryarray=order, tickangle=-45)
        if self.seq_len > self.cfg.window:
            fig.add_hline(y=self.cfg.window - 1, line_dash="dash", line_color="#1b9e77",
                          annotation_text=f"local limit (window - 1 = {self.cfg.window - 1})")
        fig.update_layout(title=title or f"mean attention distance per head ({self.seq_len} tokens)",
                          template="plotly_white", xaxis_title="layer, head", yaxis_title="mean |query - key|")
        return fig


def attention_distance(model, prompt=None, *, seq_len: int = 128, batch: int = 1, seed: int = 0,
                       layers: int | Sequence[int] | None = None, hooks: HookSpec = None) -> AttentionDistance:
    """Mean attention distance per head on ``prompt`` (default: ``BOS`` + ``seq_len`` random
    tokens, no repeats). Local layers cannot look further back than ``window - 1``.

    >>> from model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=16, n_heads=2,
    ...     n_kv_heads=1, d_head=8, vocab_size=50, window=4))
    >>> bool((attention_distance(m, seq_len=20).distance < 4).all())
    True
    """
    if prompt is None:
        tokens = repeated_random_tokens(model.cfg, seq_len, batch, seed, repeats=1).to(model.device)
    else:
        tokens = _as_tokens(model, prompt)
    layers = _layers(model, layers)
    pats = _patterns(model, tokens, layers, hooks)
    s = tokens.shape[1]
    pos = torch.arange(s, device=tokens.device, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).abs()  # [q, k]
    rows = [(pats[i].float() * dist).sum(-1).mean((0, 2)) for i in layers]  # [h] each
    return AttentionDistance(torch.stack(rows).cpu(), layers, model.cfg, s)


# ---------------------------------------------------------------------- induction loss
@dataclass
class InductionLoss:
    """Per-token loss on ``BOS + r + r``: ``per_token[b, t]`` is the loss of predicting token
    ``t + 1`` at position ``t`` (``[batch, 2 * seq_len]``).

    ``first``/``second`` average the loss on ``r[1:]`` in the first / second copy (the first
    token of each copy cannot be predicted from context, so both leave it out). A model with
    induction heads has ``second`` far below ``first``.
    """

    per_token: torch.Tensor
    seq_len: int

    @property
    def first(self) -> float:
        """Mean loss on the first copy (its first token, unpredictable after BOS, left out)."""
        return float(self.per_token[:, 1:self.seq_len].mean())

    @property
    def second(self) -> float:
        """Mean loss on the second copy (its first token left out): low when the model copies."""
        return float(self.per_token[:, self.seq_len + 1:].mean())

    def __repr__(self) -> str:
        return f"InductionLoss(first copy {self.first:.3f}, second copy {self.second:.3f}, n={self.seq_len})"

    def plot(self, others: Mapping[str, "InductionLoss"] | None = None, title: str = "") -> go.Figure:
        """Mean loss per position (target index), optionally against other runs (e.g. ablations).

        >>> InductionLoss(torch.ones(2, 6), 3).plot({"ablated": InductionLoss(torch.zeros(2, 6), 3)}).data[1].name
        'ablated'
        """
        ys = {"loss": self.per_token.mean(0)}
        for name, other in (others or {}).items():
            ys[name] = other.per_token.mean(0)
        return line(ys, x=list(range(1, self.per_token.shape[1] + 1)),
                    title=title or f"loss on repeated random tokens (second copy starts at {self.seq_len + 1})",
                    x_title="target position", y_title="loss (nats)")


def ablate_heads_hooks(heads: Sequence[tuple[int, int]]) -> list[tuple[str, Callable]]:
    """Hooks that zero the listed ``(layer, head)`` outputs (their ``attn.z``).

    >>> [name for name, _ in ablate_heads_hooks([(3, 1), (3, 2), (5, 0)])]
    ['blocks.3.attn.z', 'blocks.5.attn.z']
    """
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    return [(f"blocks.{layer}.attn.z", zero_ablate(heads=hs)) for layer, hs in sorted(by_layer.items())]


@torch.no_grad()
def induction_loss(model, seq_len: int = 50, batch: int = 4, seed: int = 0, *, hooks: HookSpec = None,
                   ablate: Sequence[tuple[int, int]] = ()) -> InductionLoss:
    """Per-token loss on repeated random tokens, with ``hooks`` active and the heads in
    ``ablate`` (``(layer, head)`` pairs) zero-ablated.

    >>> from model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
    ...     n_kv_heads=1, d_head=8, vocab_size=50))
    >>> res = induction_loss(m, seq_len=5, batch=2, ablate=[(1, 0)])
    >>> res.per_token.shape
    torch.Size([2, 10])
    """
    tokens = repeated_random_tokens(model.cfg, seq_len, batch, seed).to(model.device)
    pairs = list(hooks.items() if isinstance(hooks, Mapping) else hooks or []) + ablate_heads_hooks(ablate)
    logits = model.run_with_hooks(tokens, pairs)[:, :-1].float()
    target = tokens[:, 1:]
    loss = torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None])[..., 0]
    return InductionLoss(loss.cpu(), seq_len)


__all__ = [
    "KINDS", "PatternResult", "HeadScores", "AttentionDistance", "InductionLoss", "attention_patterns",
    "head_scores", "attention_distance", "induction_loss", "ablate_heads_hooks", "repeated_random_tokens",
    "random_token_range", "target_mask", "score_pattern", "str_tokens",
]

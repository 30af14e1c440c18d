"""Head scores (previous-token, induction, duplicate-token, BOS) and attention distance.

Head scores use one recipe: a boolean *target* mask ``[batch, query, key]`` says where a head
of a kind should attend; a head's score is the attention it puts on the targets, averaged over
the query positions that have one. The kinds:

- ``previous_token``: the key just before the query (``k = q - 1``), queries ``q >= 1``.
- ``bos``: the first position (``k = 0``), queries ``q >= 1``.
- ``duplicate_token``: earlier positions holding the query's token.
- ``induction``: the positions right *after* an earlier occurrence of the query's token.

On ``BOS + r + r`` (``r`` random tokens without repeats, length ``n``), a query in the second
copy has exactly one duplicate target (``n`` back) and one induction target (``n - 1`` back).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
import torch

from ..display import figure
from ..hooks import HookSpec
from ..model import Gemma3
from ..model.inputs import Prompt
from ..plots import escape_token, heatmap
from ..tokens import Top, top_entries
from .common import as_tokens, layer_label, layer_list, patterns_of, repeated_random_tokens

HEAD_SCORE_KINDS = ("previous_token", "induction", "duplicate_token", "bos")


def target_mask(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """Where a head of ``kind`` should attend: bool ``[batch, query, key]`` for ``tokens [batch, seq]``.

    >>> target_mask(torch.tensor([[2, 7, 8, 7, 8]]), "induction")[0, 3].nonzero().flatten().tolist()
    [2]
    >>> target_mask(torch.tensor([[2, 7, 8, 7, 8]]), "duplicate_token")[0, 4].nonzero().flatten().tolist()
    [2]
    """
    if kind not in HEAD_SCORE_KINDS:
        raise ValueError(f"unknown head-score kind {kind!r}; choose one of {list(HEAD_SCORE_KINDS)}")
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
    ``scores[layer, head]``). ``ids`` are the token ids it was measured on.
    """

    kind: str
    scores: torch.Tensor
    layers: list[int]
    cfg: Any
    ids: torch.Tensor
    source: str = ""

    def top(self, k: int = 5) -> list[Top]:
        """The ``k`` best heads, highest score first: index ``(layer, head)``, label ``L5H1``."""
        out = []
        for t in top_entries(self.scores, k, str, by_abs=False):
            layer, head = self.layers[t.index[0]], t.index[1]
            out.append(Top((layer, head), t.value, f"L{layer}H{head}"))
        return out

    def __getitem__(self, key: tuple[int, int]) -> float:
        layer, head = key
        return float(self.scores[self.layers.index(layer), head])

    def __repr__(self) -> str:
        best = ", ".join(f"{t.label}={t.value:.3f}" for t in self.top(3))
        return f"HeadScores({self.kind}, {len(self.layers)} layers x {self.scores.shape[1]} heads; top: {best})"

    def plot(self, title: str | None = None) -> go.Figure:
        """Layer x head heatmap; global layers are labelled and outlined.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=6, d_model=16, d_mlp=16, n_heads=2,
        ...     n_kv_heads=1, d_head=8, vocab_size=20))
        >>> list(head_scores(m, "bos", seq_len=4, batch_size=1).plot().layout.yaxis.ticktext)[-1]
        'L5 global'
        """
        n_layers, n_heads = self.scores.shape
        text = ([[f"{float(v):.2f}" for v in row] for row in self.scores] if n_layers * n_heads <= 600 else None)
        fig = heatmap(self.scores, [f"H{h}" for h in range(n_heads)], [layer_label(self.cfg, i) for i in self.layers],
                      title=title or (f"{self.kind.replace('_', '-')} score per head"
                                      + (f" ({self.source})" if self.source else "")),
                      x_title="head", y_title="layer", text=text, colorscale="Blues", colorbar_title="score")
        fig.data[0].update(zmin=0.0, zmax=max(1e-9, float(self.scores.max())))
        for r, layer in enumerate(self.layers):
            if self.cfg.is_global(layer):
                fig.add_shape(type="rect", x0=-0.5, x1=n_heads - 0.5, y0=r - 0.5, y1=r + 0.5,
                              line=dict(color="#d95f02", width=2))
        return fig


def _score_tokens(model: Gemma3, prompt: Prompt | None, seq_len: int, batch_size: int,
                  seed: int) -> tuple[torch.Tensor, str]:
    if prompt is None:
        ids = repeated_random_tokens(model.cfg, seq_len, batch_size, seed).to(model.device)
        return ids, f"repeated random tokens, n={seq_len}, batch_size={batch_size}, seed={seed}"
    return as_tokens(model, prompt), "prompt"


def all_head_scores(model: Gemma3, kinds: Sequence[str] = HEAD_SCORE_KINDS, prompt: Prompt | None = None, *,
                    seq_len: int = 50, batch_size: int = 4, seed: int = 0, layers: int | Sequence[int] | None = None,
                    hooks: HookSpec = None) -> dict[str, HeadScores]:
    """:func:`head_scores` of several kinds from one run: ``{kind: HeadScores}``.

    >>> from interp.model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
    ...     n_kv_heads=1, d_head=8, vocab_size=50))
    >>> scores = all_head_scores(m, seq_len=6, batch_size=1)
    >>> sorted(scores), scores["bos"].scores.shape
    (['bos', 'duplicate_token', 'induction', 'previous_token'], torch.Size([2, 2]))
    """
    if isinstance(kinds, str):
        raise TypeError(f"kinds= takes a list of kinds; for one use head_scores(model, {kinds!r})")
    for k in kinds:
        if k not in HEAD_SCORE_KINDS:
            raise ValueError(f"unknown head-score kind {k!r}; choose from {list(HEAD_SCORE_KINDS)}")
    ids, source = _score_tokens(model, prompt, seq_len, batch_size, seed)
    layer_ids = layer_list(model, layers)
    pats = patterns_of(model, ids, layer_ids, hooks)
    out = {}
    for k in kinds:
        mask = target_mask(ids, k)
        if not bool(mask.any()):
            raise ValueError(f"no query position of this prompt has a {k} target: "
                             "the prompt repeats no token (use prompt=None for repeated random tokens)")
        scores = torch.stack([score_pattern(pats[i], mask) for i in layer_ids]).cpu()
        out[k] = HeadScores(k, scores, layer_ids, model.cfg, ids.cpu(), source)
    return out


def head_scores(model: Gemma3, kind: str = "induction", prompt: Prompt | None = None, *, seq_len: int = 50,
                batch_size: int = 4, seed: int = 0, layers: int | Sequence[int] | None = None,
                hooks: HookSpec = None) -> HeadScores:
    """Score every head for ``kind`` (one of :data:`HEAD_SCORE_KINDS`; :func:`all_head_scores` for several).

    Without ``prompt`` the scores are measured on one batch of ``batch_size`` rows of repeated
    random tokens ``BOS + r + r`` (``len(r) = seq_len``, seeded; see :func:`repeated_random_tokens`). With a
    ``prompt`` (text or unpadded token ids) they are measured on it; ``duplicate_token`` and
    ``induction`` then need a prompt that repeats a token.

    >>> from interp.model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
    ...     n_kv_heads=1, d_head=8, vocab_size=50))
    >>> head_scores(m, "induction", seq_len=6, batch_size=1).scores.shape
    torch.Size([2, 2])
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind= takes one kind; for several use all_head_scores(model, {kind!r})")
    return all_head_scores(model, [kind], prompt, seq_len=seq_len, batch_size=batch_size, seed=seed, layers=layers,
                           hooks=hooks)[kind]


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

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=6, d_model=16, d_mlp=16, n_heads=2,
        ...     n_kv_heads=1, d_head=8, vocab_size=20, window=3))
        >>> [t.name for t in attention_distance(m, seq_len=8).plot().data]
        ['local (window 3)', 'global']
        """
        n_heads = self.distance.shape[1]
        fig = figure()
        kinds = ((False, f"local (window {self.cfg.window})", "#1b9e77"), (True, "global", "#d95f02"))
        for is_glob, name, colour in kinds:
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


def attention_distance(model: Gemma3, prompt: Prompt | None = None, *, seq_len: int = 128, batch_size: int = 1,
                       seed: int = 0, layers: int | Sequence[int] | None = None,
                       hooks: HookSpec = None) -> AttentionDistance:
    """Mean attention distance per head on ``prompt`` (default: ``BOS`` + ``seq_len`` random
    tokens, no repeats). Local layers cannot look further back than ``window - 1``.

    >>> from interp.model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=16, n_heads=2,
    ...     n_kv_heads=1, d_head=8, vocab_size=50, window=4))
    >>> bool((attention_distance(m, seq_len=20).distance < 4).all())
    True
    """
    if prompt is None:
        tokens = repeated_random_tokens(model.cfg, seq_len, batch_size, seed, repeats=1).to(model.device)
    else:
        tokens = as_tokens(model, prompt)
    layers = layer_list(model, layers)
    pats = patterns_of(model, tokens, layers, hooks)
    s = tokens.shape[1]
    pos = torch.arange(s, device=tokens.device, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).abs()  # [q, k]
    rows = [(pats[i].float() * dist).sum(-1).mean((0, 2)) for i in layers]  # [h] each
    return AttentionDistance(torch.stack(rows).cpu(), layers, model.cfg, s)


__all__ = ["HEAD_SCORE_KINDS", "target_mask", "score_pattern", "HeadScores", "head_scores", "all_head_scores",
           "AttentionDistance", "attention_distance"]

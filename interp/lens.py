"""The logit lens: read every layer's residual stream through the final norm and the unembedding.

Row 0 is the residual entering layer 0 (the scaled embedding); row ``i + 1`` is the residual
after layer ``i``. Each row goes through ``model.final_norm`` and the tied unembedding exactly
as the model's last layer does, so the final row *is* the model's output distribution.

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=6, d_model=32, d_mlp=64, n_heads=4,
...     n_kv_heads=2, d_head=8, vocab_size=100, window=4))
>>> lens = logit_lens(m, torch.tensor([[2, 17, 5, 9]]), targets=[5], k=3)
>>> lens.top_ids.shape                      # [layers + 1, positions, k]
torch.Size([7, 4, 3])
>>> lens.labels[0], lens.labels[6]
('embed', 'L5 (global)')
>>> probs = m(torch.tensor([[2, 17, 5, 9]]))[0].softmax(-1)
>>> torch.allclose(lens.top_probs[-1, :, 0], probs.max(-1).values, atol=1e-6)
True
>>> int(lens.target_ranks[-1, -1, 0]) >= 1   # ranks count from 1 (the top token)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
import torch

from .hooks import partial_run, resolve_position, sorted_positions
from .model import Gemma3
from .model.config import GLOBAL
from .model.finite import check_finite
from .model.inputs import Prompt
from .model.memory import available_memory
from .plots import escape_token, heatmap, line
from .tokens import Target, layer_labels, single_prompt, str_tokens, token_ids

if TYPE_CHECKING:
    from .tuned_lens import TunedLens

LOGITS_BUDGET = 1 << 30  # bytes of float32 logits unembedded in one matmul (less when memory is short)


# ---------------------------------------------------------------------- result
@dataclass
class LensResult:
    """What :func:`logit_lens` returns. Rows are stages (``labels``), columns the positions
    that were read (``positions``, indices into ``tokens``).

    ``top_ids``/``top_probs`` are ``[stages, positions, k]``; ``top_tokens[r][c]`` their text.
    ``target_probs``/``target_ranks`` are ``[stages, positions, targets]`` (rank 1 = the top
    token), present when targets were given.
    """

    tokens: list[str]
    positions: list[int]
    labels: list[str]
    layer_types: list[str]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_tokens: list[list[list[str]]]
    targets: list[int] = field(default_factory=list)
    target_tokens: list[str] = field(default_factory=list)
    target_probs: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    name: str = "Logit lens"

    def __repr__(self) -> str:
        return (f"LensResult({len(self.labels)} stages x {len(self.positions)} positions, k={self.top_ids.shape[-1]}, "
                f"targets={self.target_tokens})")

    def column(self, position: int = -1) -> int:
        """The column of sequence ``position`` (negative counts from the prompt's end)."""
        p = resolve_position(position, len(self.tokens))
        if p not in self.positions:
            raise IndexError(f"position {p} was not read by this lens (positions={self.positions}); "
                             "rerun logit_lens with it in positions=")
        return self.positions.index(p)

    def table(self, position: int = -1) -> list[tuple[str, str, float]]:
        """``(stage label, top token, its probability)`` per stage at ``position``."""
        c = self.column(position)
        return [(label, self.top_tokens[r][c][0], float(self.top_probs[r, c, 0]))
                for r, label in enumerate(self.labels)]

    def format_table(self, position: int = -1) -> str:
        """:meth:`table` as aligned text (tokens shown with ``repr``, so spaces are visible),
        with each target's probability and rank as extra columns."""
        c = self.column(position)
        header = ["layer", "top token", "prob"]
        for t in self.target_tokens:
            header += [f"p({t!r})", "rank"]
        rows = [header]
        for r, (label, top, prob) in enumerate(self.table(position)):
            row = [label, repr(top), f"{prob:.3f}"]
            if self.target_probs is not None and self.target_ranks is not None:
                for j in range(len(self.targets)):
                    row += [f"{float(self.target_probs[r, c, j]):.3f}", str(int(self.target_ranks[r, c, j]))]
            rows.append(row)
        return aligned(rows)

    def plot(self, title: str | None = None) -> go.Figure:
        """Heatmap ``stages x positions`` of the top-1 probability, the top token written in each
        cell and the top-k (with probabilities) on hover. Global-attention layers are labelled."""
        k = self.top_ids.shape[-1]
        hover = []
        for r, _label in enumerate(self.labels):
            stage = "the embedding" if r == 0 else (
                f"after layer {r - 1} "
                f"({'global' if self.layer_types[r - 1] == GLOBAL else 'sliding-window'} attention)")
            hover.append([f"{stage}\ntop {k}:\n" + "\n".join(
                f"{repr(t)} {float(p):.3g}" for t, p in zip(self.top_tokens[r][c], self.top_probs[r, c]))
                for c in range(len(self.positions))])
        fig = heatmap(
            self.top_probs[:, :, 0], [self.tokens[p] for p in self.positions], self.labels,
            title=title or f"{self.name}: top-1 probability after each layer", x_title="position",
            y_title="layer", text=[[cells[c][0] for c in range(len(self.positions))] for cells in self.top_tokens],
            hover=hover, colorscale="Blues", colorbar_title="p(top-1)")
        fig.data[0].update(zmin=0.0, zmax=1.0)
        fig.update_layout(height=max(400, 28 * len(self.labels) + 150), width=max(600, 70 * len(self.positions) + 250))
        return fig

    def plot_targets(self, position: int = -1, metric: str = "prob", title: str | None = None) -> go.Figure:
        """One line per target across stages at ``position``: ``metric`` is ``"prob"`` or
        ``"rank"`` (log axis; 1 = the top token)."""
        if not self.targets or self.target_probs is None or self.target_ranks is None:
            raise ValueError("this lens has no targets; call logit_lens(..., targets=[' Paris'])")
        if metric not in ("prob", "rank"):
            raise ValueError(f"metric must be 'prob' or 'rank', got {metric!r}")
        c = self.column(position)
        values = self.target_probs if metric == "prob" else self.target_ranks
        ys = {t: values[:, c, j].float() for j, t in enumerate(self.target_tokens)}
        p = self.positions[c]
        fig = line(ys, [escape_token(label) for label in self.labels],
                   title=title or f"{self.name} at position {p} ({escape_token(self.tokens[p])}): target {metric}",
                   x_title="layer", y_title="probability" if metric == "prob" else "rank (1 = top)",
                   log_y=metric == "rank")
        if metric == "rank":
            fig.update_yaxes(autorange="reversed")
        return fig


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: East Asian wide and full-width characters take two,
    combining marks none.

    >>> display_width("abc"), display_width("東京"), display_width("é")
    (3, 4, 1)
    """
    import unicodedata

    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def aligned(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as text columns aligned by display width (CJK text lines up).

    >>> print(aligned([("a", "b"), ("東京", "c")]))
    a     b
    東京  c
    """
    widths = [max(display_width(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell + " " * (w - display_width(cell)) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


# ---------------------------------------------------------------------- the lens
@torch.no_grad()
def logit_lens(model: Gemma3, prompt: Prompt, targets: Sequence[Target] | Target | None = None,
               positions: Any = None, k: int = 5, *, lens: TunedLens | None = None) -> LensResult:
    """Logit lens of one prompt (text or token ids) over every layer.

    ``positions`` (by the rule of :mod:`interp.hooks.positions`; default all) limits which
    sequence positions are read, cached and unembedded. ``targets`` are token strings (one token
    each, without BOS; see :func:`interp.tokens.token_id`) or ids; their probability and rank
    (1 = top) are kept for every stage and position. ``k`` top tokens are kept per cell.
    ``lens`` (a :class:`~interp.tuned_lens.TunedLens`) maps each stage's residual through its
    translator first: the tuned lens (stage 0, the embedding, is read as it is).

    Every stage and position goes through ``model.unembed`` in one matmul (split only when the
    logits would exceed 1 GiB or a quarter of the free memory). The lens reads the residual
    through the model's own final norm and unembedding, so hooks on ``final_norm`` or ``logits``
    are refused (they would reach only the last stage); hooks elsewhere apply.

    >>> lens = logit_lens(model, "The capital of France is", targets=[" Paris"])  # doctest: +SKIP
    >>> print(lens.format_table())  # doctest: +SKIP
    >>> lens.plot()  # doctest: +SKIP
    """
    for name in ("final_norm", "logits"):
        if model.registry.is_hooked(name):
            raise ValueError(f"a hook is active on {name!r}, but the logit lens reads every stage through the model's "
                             "own final norm and unembedding (the hook would apply to the last stage only); "
                             "remove it, or hook the residual stream instead")
    ids = single_prompt(model, prompt)
    seq = ids.shape[1]
    cols = sorted_positions(positions, seq)
    target_ids = token_ids(model, targets)
    k = max(1, min(int(k), model.cfg.vocab_size))
    if lens is not None:
        lens.check_model(model)

    names = ["blocks.0.resid_pre", "blocks.*.resid_post"]
    with partial_run():
        _, cache = model.run_with_cache(ids, names=names, positions=cols, stop_at_layer=model.cfg.n_layers)
    resid, _ = cache.accumulated_resid()  # [stages, 1, cols, d]
    if lens is not None:
        resid = lens.translate(resid)
    stages = resid.shape[0]
    flat = resid[:, 0].reshape(stages * len(cols), -1)

    def rerun() -> None:
        model.run_with_cache(ids, names=names, positions=cols, stop_at_layer=model.cfg.n_layers)

    check_finite(flat, "logit_lens: the residual stream", rerun)
    vocab = model.cfg.vocab_size
    free = available_memory(model.device) or LOGITS_BUDGET * 4
    rows_per_chunk = max(1, min(LOGITS_BUDGET, free // 4) // (vocab * (8 + len(target_ids))))
    tid = torch.tensor(target_ids, dtype=torch.long, device=model.device)
    top_ids, top_probs, t_probs, t_ranks = [], [], [], []
    for part in flat.split(rows_per_chunk):
        logits = model.unembed(part).float()  # [rows, vocab]
        logp = logits.log_softmax(-1)
        values, idx = logp.topk(k, dim=-1)
        top_ids.append(idx)
        top_probs.append(values.exp())
        if target_ids:
            t_probs.append(logp[:, tid].exp())
            t_ranks.append((logits[:, None, :] > logits[:, tid][..., None]).sum(-1) + 1)

    def gather(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts).view(stages, len(cols), -1).cpu()

    top_ids_t = gather(top_ids)
    texts = str_tokens(model, top_ids_t.flatten().tolist())
    n_cols = len(cols)
    top_tokens = [[texts[(r * n_cols + c) * k:(r * n_cols + c + 1) * k] for c in range(n_cols)]
                  for r in range(stages)]
    return LensResult(
        tokens=str_tokens(model, ids[0]),
        positions=cols,
        labels=layer_labels(model.cfg),
        layer_types=list(model.cfg.layer_types),
        top_ids=top_ids_t,
        top_probs=gather(top_probs),
        top_tokens=top_tokens,
        targets=target_ids,
        target_tokens=str_tokens(model, target_ids),
        target_probs=gather(t_probs) if target_ids else None,
        target_ranks=gather(t_ranks) if target_ids else None,
        name="Logit lens" if lens is None else "Tuned lens",
    )


__all__ = ["logit_lens", "LensResult", "aligned", "display_width"]

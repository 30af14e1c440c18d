"""Induction on repeated random tokens: the per-token loss, and the same with heads ablated."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch

from ..hooks import HookSpec, hook_pairs, zero_ablate
from ..model import Gemma3
from ..model.finite import check_finite
from ..model.sites import block_site
from ..plots import line
from ..tokens import Top
from .common import repeated_random_tokens


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

    def plot(self, others: Mapping[str, InductionLoss] | None = None, title: str = "") -> go.Figure:
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


def ablate_heads_hooks(model: Gemma3, heads: Sequence[tuple[int, int] | Top]) -> list[tuple[str, Callable]]:
    """Hooks that zero the listed ``(layer, head)`` outputs (their ``attn.z``), checked against the
    model; ``heads`` may also be :class:`~interp.tokens.Top` entries of ``head_scores(...).top(k)``.

    >>> from interp.model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=6, d_model=16, d_mlp=16, n_heads=4,
    ...     n_kv_heads=1, d_head=4, vocab_size=20))
    >>> [name for name, _ in ablate_heads_hooks(m, [(3, 1), (3, 2), (5, 0)])]
    ['blocks.3.attn.z', 'blocks.5.attn.z']
    """
    by_layer: dict[int, list[int]] = {}
    cfg = model.cfg
    for item in heads:
        pair = item.index if isinstance(item, Top) else item  # Top: e.g. head_scores(...).top(2)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"heads are (layer, head) pairs, got {item!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise IndexError(f"head ({layer}, {head}) is outside {cfg.n_layers} layers x {cfg.n_heads} heads")
        by_layer.setdefault(layer, []).append(head)
    return [(block_site(layer, "attn.z"), zero_ablate(heads=hs)) for layer, hs in sorted(by_layer.items())]


@torch.no_grad()
def induction_loss(model: Gemma3, seq_len: int = 50, batch_size: int = 4, seed: int = 0, *, hooks: HookSpec = None,
                   ablate: Sequence[tuple[int, int] | Top] = ()) -> InductionLoss:
    """Per-token loss on repeated random tokens, with ``hooks`` active and the heads in
    ``ablate`` (``(layer, head)`` pairs) zero-ablated.

    >>> from interp.model import Gemma3, Gemma3Config
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
    ...     n_kv_heads=1, d_head=8, vocab_size=50))
    >>> res = induction_loss(m, seq_len=5, batch_size=2, ablate=[(1, 0)])
    >>> res.per_token.shape
    torch.Size([2, 10])
    """
    tokens = repeated_random_tokens(model.cfg, seq_len, batch_size, seed).to(model.device)
    pairs = hook_pairs(hooks) + ablate_heads_hooks(model, ablate)
    logits = model.run_with_hooks(tokens, pairs)[:, :-1].float()
    check_finite(logits, "induction_loss: the logits", lambda: model.run_with_hooks(tokens, pairs))
    target = tokens[:, 1:]
    loss = torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None])[..., 0]
    return InductionLoss(loss.cpu(), seq_len)


__all__ = ["InductionLoss", "induction_loss", "ablate_heads_hooks"]

"""Attention heads: patterns with token labels, head scores, attention distance, induction loss.

Everything here reads ``blocks.{i}.attn.pattern`` (``[batch, heads, query, key]``, after the
softmax, after any hooks) and caches nothing else.

>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
...     n_kv_heads=1, d_head=8, vocab_size=50))
>>> ind = head_scores(m, "induction", seq_len=8, batch_size=2)
>>> ind.scores.shape, len(ind.top(3))
(torch.Size([2, 2]), 3)
"""

from .common import random_token_range, repeated_random_tokens
from .heads import (
                    HEAD_SCORE_KINDS,
                    AttentionDistance,
                    HeadScores,
                    all_head_scores,
                    attention_distance,
                    head_scores,
                    score_pattern,
                    target_mask,
)
from .induction import InductionLoss, ablate_heads_hooks, induction_loss
from .patterns import PatternResult, attention_patterns

__all__ = [
    "HEAD_SCORE_KINDS", "PatternResult", "HeadScores", "AttentionDistance", "InductionLoss", "attention_patterns",
    "head_scores", "all_head_scores", "attention_distance", "induction_loss", "ablate_heads_hooks",
    "repeated_random_tokens", "random_token_range", "target_mask", "score_pattern",
]

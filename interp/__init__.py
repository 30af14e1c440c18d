"""Interpretability on Gemma 3: one import for a notebook.

>>> import interp
>>> interp.Gemma3Config.preset("1b").n_layers
26
"""

from hooks import ActivationCache, Site
from model import Gemma3, Gemma3Config

from .attention import (
    AttentionDistance, HeadScores, InductionLoss, PatternResult, ablate_heads_hooks, attention_distance,
    attention_patterns, head_scores, induction_loss, repeated_random_tokens,
)
from .dla import DLAResult, direct_logit_attribution
from .attribution import attribution_patch
from .lens import LensResult, logit_lens
from .metrics import Metric, kl, logit_diff, prob
from .patching import PatchingResult, compare, patch_sweep
from .sae import JumpReLUSAE, run_with_saes, top_features


def load(src: str = "demo", **kwargs) -> Gemma3:
    """Load a model: ``"demo"`` (the real Gemma 3 270M from PyPI), a directory, a file or a hub id.

    >>> m = interp.load("demo")  # doctest: +SKIP
    """
    return Gemma3.from_pretrained(src, **kwargs)


__all__ = [
    "load", "Gemma3", "Gemma3Config", "ActivationCache", "Site",
    "logit_lens", "LensResult", "direct_logit_attribution", "DLAResult",
    "attention_patterns", "head_scores", "attention_distance", "induction_loss", "ablate_heads_hooks",
    "repeated_random_tokens", "PatternResult", "HeadScores", "AttentionDistance", "InductionLoss",
    "patch_sweep", "attribution_patch", "compare", "PatchingResult", "logit_diff", "prob", "kl", "Metric",
    "JumpReLUSAE", "run_with_saes", "top_features",
]

"""Interpretability on Gemma 3: one import for a notebook.

``interp.model`` is the model, ``interp.hooks`` the registry; everything a notebook uses is
re-exported here (the model, caches, interventions, analyses, metrics).

>>> import interp
>>> interp.Gemma3Config.preset("1b").n_layers
26
"""

from typing import Any

from .attention import (
    AttentionDistance,
    HeadScores,
    InductionLoss,
    PatternResult,
    ablate_heads_hooks,
    all_head_scores,
    attention_distance,
    attention_patterns,
    head_scores,
    induction_loss,
    repeated_random_tokens,
)
from .attribution import attribution_patch, attribution_patches
from .circuits import (
    EdgeScores,
    Graph,
    InterventionResult,
    PathPatchingResult,
    attribution_graph,
    edge_attribution_patch,
    intervene,
    path_patch,
)
from .data import ActivationStore, Corpus, harvest
from .dla import DLAResult, direct_logit_attribution
from .evaluation import LMLoss, lm_loss, test_prompt
from .features import (
    FeatureEval,
    JumpReLUSAE,
    TopKSAE,
    Transcoder,
    compare_dictionaries,
    feature_dashboard,
    feature_index,
    load_dictionary,
    run_with_dictionaries,
    run_with_saes,
    top_features,
)
from .hooks import (
    ActivationCache,
    HookSpec,
    NonFiniteError,
    Site,
    add,
    hook_pairs,
    mean_ablate,
    patch,
    resample_ablate,
    zero_ablate,
)
from .lens import LensResult, logit_lens
from .metrics import Metric, kl, logit_diff, prob
from .model import Gemma3, Gemma3Cache, Gemma3Config, Generation, KVCache
from .patching import Comparison, PatchingResult, compare, patch_sweep, patch_sweeps
from .probes import ProbeResult, probe
from .steering import SteeringVector, steering_vector
from .tokens import Top
from .tuned_lens import LensKL, TunedLens


def load(src: str = "demo", **kwargs: Any) -> Gemma3:
    """Load a model: ``"demo"`` (the real Gemma 3 270M from PyPI), a directory, a file or a hub id
    (see :meth:`Gemma3.from_pretrained` for the options).

    >>> m = interp.load("demo")  # doctest: +SKIP
    """
    return Gemma3.from_pretrained(src, **kwargs)


__all__ = [
    "load", "Gemma3", "Gemma3Config", "Gemma3Cache", "Generation", "KVCache",
    "lm_loss", "LMLoss", "test_prompt", "ActivationCache", "Site", "HookSpec",
    "NonFiniteError", "hook_pairs", "patch", "zero_ablate", "mean_ablate", "resample_ablate", "add",
    "logit_lens", "LensResult", "direct_logit_attribution", "DLAResult",
    "attention_patterns", "head_scores", "all_head_scores", "attention_distance", "induction_loss",
    "ablate_heads_hooks", "repeated_random_tokens", "PatternResult", "HeadScores", "AttentionDistance",
    "InductionLoss", "patch_sweep", "patch_sweeps", "attribution_patch", "attribution_patches", "compare",
    "Comparison", "PatchingResult", "logit_diff", "prob", "kl", "Metric", "Top",
    "JumpReLUSAE", "TopKSAE", "Transcoder", "load_dictionary", "run_with_dictionaries", "run_with_saes",
    "top_features", "FeatureEval", "compare_dictionaries", "feature_dashboard", "feature_index",
    "probe", "ProbeResult", "steering_vector", "SteeringVector", "TunedLens", "LensKL",
    "Corpus", "harvest", "ActivationStore", "attribution_graph", "Graph", "intervene", "InterventionResult",
    "path_patch", "PathPatchingResult", "edge_attribution_patch", "EdgeScores",
]

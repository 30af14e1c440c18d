"""Sparse dictionaries: SAEs (JumpReLU, TopK), transcoders (with an affine skip or not) and
cross-layer transcoders --
load (Gemma Scope 2, SAELens, the hub), save (SAELens's format), run on the registry (read,
splice, steer, ablate, clamp), train, evaluate and browse.

>>> from interp.features import JumpReLUSAE, TopKSAE, Transcoder, load_dictionary, run_with_dictionaries
"""

from __future__ import annotations

import torch

from ..tokens import Top
from .architectures import ARCHITECTURES, AbsTopKSAE, GatedSAE, StandardSAE
from .clt import CrossLayerTranscoder
from .dashboard import TopActivations, feature_dashboard, feature_index, logit_effects, top_activations
from .demo import demo_clt, demo_clt_store
from .dictionary import Dictionary, JumpReLUSAE, TopKSAE, Transcoder
from .interventions import clt_hooks, dictionary_hooks, run_with_dictionaries, run_with_saes
from .io import DictionaryFileError, check_fits, download, from_hub, load_dictionary, save_dictionary
from .quality import DictionaryComparison, FeatureEval, compare_dictionaries, evaluate
from .settings import Settings
from .training import TrainingError, TrainingLog, train


def top_features(acts: torch.Tensor, k: int = 10, position: int = -1, row: int = 0) -> list[Top]:
    """The ``k`` most active features at one position (only those that fire), largest first.

    >>> [(t.index, t.value) for t in top_features(torch.tensor([[[0.0, 3.0, 1.0]]]), k=2)]
    [((1,), 3.0), ((2,), 1.0)]
    """
    values, idx = acts[row, position].float().topk(min(k, acts.shape[-1]))
    return [Top((int(i),), float(v), f"F{int(i)}") for i, v in zip(idx, values) if v > 0]


__all__ = ["Dictionary", "JumpReLUSAE", "TopKSAE", "Transcoder", "StandardSAE", "GatedSAE", "AbsTopKSAE", "Settings",
           "CrossLayerTranscoder", "ARCHITECTURES", "dictionary_hooks", "clt_hooks",
           "run_with_dictionaries", "run_with_saes", "load_dictionary", "save_dictionary", "check_fits", "download",
           "from_hub", "DictionaryFileError", "top_features", "evaluate", "FeatureEval", "compare_dictionaries",
           "DictionaryComparison", "feature_dashboard", "feature_index", "top_activations", "TopActivations",
           "logit_effects", "train", "TrainingLog", "TrainingError", "demo_clt", "demo_clt_store"]

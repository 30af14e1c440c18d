"""A hook registry that knows nothing of Gemma: named sites, scoped hooks, caches, interventions.

Installed as ``interp.hooks``; a notebook needs only ``import interp`` (which re-exports the
interventions).

>>> from interp.hooks import HookRegistry, SiteNames, ActivationCache, zero_ablate
"""

from .cache import ActivationCache, CacheFileError, caching_hook, seq_indices
from .interventions import add, mean_ablate, patch, resample_ablate, selection_mask, zero_ablate
from .names import NameSpec, SiteNames, UnknownSiteError, expand_braces, is_exact
from .positions import PositionError, Positions, positions_mask, resolve_position, resolve_positions, sorted_positions
from .registry import (
                       Hook,
                       HookError,
                       HookRegistry,
                       HookRun,
                       HookSpec,
                       NonFiniteError,
                       Registration,
                       Site,
                       backward_hook,
                       checking_pass,
                       hook_pairs,
                       in_partial_run,
                       partial_run,
)

__all__ = [
    "patch", "zero_ablate", "mean_ablate", "resample_ablate", "add", "selection_mask",
    "ActivationCache", "CacheFileError", "caching_hook", "seq_indices",
    "NameSpec", "SiteNames", "UnknownSiteError", "expand_braces", "is_exact",
    "PositionError", "Positions", "positions_mask", "resolve_position", "resolve_positions", "sorted_positions",
    "Hook", "HookError", "HookRegistry", "HookRun", "HookSpec", "NonFiniteError", "Registration", "Site",
    "backward_hook", "checking_pass", "hook_pairs", "in_partial_run", "partial_run",
]

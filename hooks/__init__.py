"""A hook registry that knows nothing of Gemma: named sites, scoped hooks, caches.

>>> from hooks import HookRegistry, ActivationCache
"""

from .cache import ActivationCache, caching_hook, seq_indices
from .interventions import add, mean_ablate, patch, resample_ablate, selection_mask, zero_ablate
from .registry import (Hook, HookError, HookRegistry, NameSpec, Site, UnknownSiteError, backward_hook,
                       expand_braces)

__all__ = [
    "patch", "zero_ablate", "mean_ablate", "resample_ablate", "add", "selection_mask",
    "ActivationCache", "caching_hook", "seq_indices", "backward_hook", "Hook", "HookError", "HookRegistry", "NameSpec", "Site",
    "UnknownSiteError", "expand_braces",
]

"""The Gemma 3 text model, rewritten so every intermediate has a public name.

Installed as ``interp.model``.

>>> from interp.model import Gemma3, Gemma3Config
"""

from .cache import Gemma3Cache
from .checkpoint import CheckpointError
from .config import ConfigError, Gemma3Config
from .gemma3 import Gemma3, UnreachableSiteError
from .generate import Generation
from .inputs import InputError, Prompt
from .kvcache import KVCache
from .memory import CacheTooLargeError
from .sites import SITES, hf_aliases, site_names, tl_aliases, tl_name

__all__ = [
    "Gemma3", "Gemma3Config", "Gemma3Cache", "Generation", "ConfigError", "CheckpointError", "InputError",
    "UnreachableSiteError", "CacheTooLargeError", "KVCache", "Prompt", "SITES", "site_names", "hf_aliases",
    "tl_aliases", "tl_name",
]

"""The Gemma 3 text model, rewritten so every intermediate has a public name.

>>> from model import Gemma3, Gemma3Config
"""

from .config import ConfigError, Gemma3Config
from .gemma3 import CacheTooLargeError, Gemma3, InputError, hf_aliases, site_names
from .layers import KVPrefix

__all__ = [
    "Gemma3", "Gemma3Config", "ConfigError", "InputError", "CacheTooLargeError", "KVPrefix", "site_names",
    "hf_aliases",
]

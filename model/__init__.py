"""The Gemma 3 text model, rewritten so every intermediate has a public name.

>>> from model import Gemma3, Gemma3Config
"""

from .config import ConfigError, Gemma3Config
from .gemma3 import Gemma3, InputError, hf_aliases, site_names

__all__ = ["Gemma3", "Gemma3Config", "ConfigError", "InputError", "site_names", "hf_aliases"]

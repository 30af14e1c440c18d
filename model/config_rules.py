"""The rules every Gemma 3 configuration follows, below :mod:`.config` and :mod:`.hf_config`
(which both read them): the two layer types, the default layout, the size bounds, the error."""

from __future__ import annotations

SLIDING = "sliding_attention"
GLOBAL = "full_attention"
LAYER_TYPES = (SLIDING, GLOBAL)


class ConfigError(ValueError):
    """A configuration that cannot describe a Gemma 3 model."""


def default_layer_types(n_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's layout: layer i is global when (i + 1) % pattern == 0, else sliding-window.

    >>> [t[0] for t in default_layer_types(7)]  # s = sliding_attention, f = full_attention
    ['s', 's', 's', 's', 's', 'f', 's']
    """
    return tuple(GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers))


# Bounds on sizes, far above every released model (27B: 62 layers, d_model 5376, vocabulary
# 262,208, 131,072 positions), checked before anything is allocated: a mistyped or hostile
# config fails at once with the field's name instead of exhausting memory.
LIMITS: dict[str, int] = {
    "n_layers": 1024, "d_model": 1 << 17, "d_mlp": 1 << 20, "n_heads": 1024, "n_kv_heads": 1024,
    "d_head": 4096, "vocab_size": 1 << 24, "window": 1 << 24, "max_positions": 1 << 24,
}


__all__ = ["SLIDING", "GLOBAL", "LAYER_TYPES", "ConfigError", "default_layer_types", "LIMITS"]

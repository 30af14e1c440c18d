"""Gemma 3 text-decoder configuration: the presets of the release and ``config.json`` parsing.

>>> cfg = Gemma3Config.preset("1b")
>>> cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
(26, 4, 1, 256)
>>> [i for i in range(cfg.n_layers) if cfg.is_global(i)]
[5, 11, 17, 23]
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..hooks.checks import is_int, is_number
from .config_rules import GLOBAL, LAYER_TYPES, LIMITS, SLIDING, ConfigError, default_layer_types
from .hf_config import config_to_hf, hf_error, hf_fields


def validate(cfg: Gemma3Config) -> None:
    """Check every field (type, sign, bounds, consistency) and fill ``layer_types``; raises a
    :class:`ConfigError` that names the field. Sizes are checked before ``layer_types`` (one
    entry per layer) is built."""
    for name, limit in LIMITS.items():
        value = getattr(cfg, name)
        if not is_int(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if value > limit:
            raise ConfigError(f"{name}={value:,} is beyond any Gemma 3 model (at most {limit:,} here); "
                              "check the configuration")
    for name in ("rope_local_base", "rope_global_base", "rope_global_factor", "query_pre_attn_scalar", "eps"):
        value = getattr(cfg, name)
        if not is_number(value) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    if cfg.d_head % 2:
        raise ConfigError(f"d_head must be even (RoPE rotates pairs of halves), got {cfg.d_head}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(f"n_heads ({cfg.n_heads}) must be divisible by n_kv_heads ({cfg.n_kv_heads}): "
                          "each key/value head serves a whole group of query heads")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(cfg, name)
        if not is_int(value) or not 0 <= value < cfg.vocab_size:
            raise ConfigError(f"{name}={value!r} is not a token id of a vocabulary of {cfg.vocab_size}")
    if not cfg.layer_types:
        object.__setattr__(cfg, "layer_types", default_layer_types(cfg.n_layers))
    else:
        object.__setattr__(cfg, "layer_types", tuple(cfg.layer_types))
    if len(cfg.layer_types) != cfg.n_layers:
        raise ConfigError(f"layer_types has {len(cfg.layer_types)} entries but n_layers is {cfg.n_layers}")
    bad = sorted({str(t) for t in cfg.layer_types if t not in LAYER_TYPES})
    if bad:
        raise ConfigError(f"unknown layer type(s) {bad}; expected {SLIDING!r} or {GLOBAL!r}")


@dataclass(frozen=True)
class Gemma3Config:
    """Every number the Gemma 3 text decoder needs, and nothing else.

    Names: ``d_model`` hidden size, ``d_mlp`` MLP width, ``d_head`` head dimension, ``n_heads``
    query heads, ``n_kv_heads`` key/value heads (query head h reads kv head
    ``h // (n_heads // n_kv_heads)``), ``window`` the sliding window of local layers,
    ``rope_global_factor`` the linear RoPE scaling factor of global layers.

    >>> Gemma3Config.preset("270m").d_model
    640
    >>> Gemma3Config(n_layers=2, d_model=64, d_mlp=128, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=100).layer_types
    ('sliding_attention', 'sliding_attention')
    """

    n_layers: int = 26
    d_model: int = 1152
    d_mlp: int = 6912
    n_heads: int = 4
    n_kv_heads: int = 1
    d_head: int = 256
    vocab_size: int = 262_144
    window: int = 512
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rope_global_factor: float = 1.0
    query_pre_attn_scalar: float = 256.0
    eps: float = 1e-6
    max_positions: int = 32_768
    layer_types: tuple[str, ...] = field(default=())
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    def __post_init__(self) -> None:
        validate(self)

    # ------------------------------------------------------------------ derived
    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def attn_scale(self) -> float:
        """The factor on q k^T: query_pre_attn_scalar ** -0.5."""
        return float(self.query_pre_attn_scalar**-0.5)

    def is_global(self, layer: int) -> bool:
        """True when ``layer`` attends to every earlier token, False for a sliding-window layer."""
        return self.layer_types[layer] == GLOBAL

    def replace(self, **changes: Any) -> Gemma3Config:
        """A copy with some fields changed (``layer_types`` recomputed if ``n_layers`` changes).

        >>> Gemma3Config.preset("1b").replace(n_layers=6).layer_types[-1]
        'full_attention'
        """
        if "n_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``Gemma3Config(**d)`` round-trips it."""
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike[str]) -> Gemma3Config:
        """Read a Hugging Face ``config.json`` (a dict, a file, or a directory holding one);
        see :mod:`interp.model.hf_config` for what is read.

        >>> cfg = Gemma3Config.from_hf({"model_type": "gemma3_text", "num_hidden_layers": 2,
        ...     "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        ...     "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300, "sliding_window": 8,
        ...     "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
        >>> cfg.rope_global_factor, cfg.window
        (8.0, 8)
        """
        fields, source = hf_fields(hf)
        try:
            return cls(**fields)
        except ConfigError as e:  # a value out of bounds: name the config.json key (and the file)
            raise hf_error(e, source) from None

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``Gemma3TextConfig`` keyword arguments.

        >>> Gemma3Config.preset("4b").to_hf()["rope_scaling"]
        {'rope_type': 'linear', 'factor': 8.0}
        """
        return config_to_hf(self)

    def param_count(self) -> int:
        """Number of parameters (the tied embedding counted once).

        >>> Gemma3Config.preset("270m").param_count()
        268098176
        """
        d, f, hd = self.d_model, self.d_mlp, self.d_head
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 2 * hd
        per_layer = attn + 3 * d * f + 4 * d
        return self.vocab_size * d + self.n_layers * per_layer + d

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> Gemma3Config:
        """The released text-decoder shapes: ``270m``, ``1b``, ``4b``, ``12b``, ``27b``.

        >>> Gemma3Config.preset("27b").attn_scale == 168 ** -0.5
        True
        """
        key = name.lower().replace("gemma-3-", "").replace("gemma3-", "")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[key])

def _preset(n_layers: int, d_model: int, d_mlp: int, n_heads: int, n_kv_heads: int, d_head: int, window: int,
            factor: float, scalar: float, max_pos: int, vocab: int) -> dict[str, Any]:
    return dict(
        n_layers=n_layers, d_model=d_model, d_mlp=d_mlp, n_heads=n_heads, n_kv_heads=n_kv_heads,
        d_head=d_head, window=window, rope_global_factor=factor, query_pre_attn_scalar=scalar,
        max_positions=max_pos, vocab_size=vocab,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "270m": _preset(18, 640, 2048, 4, 1, 256, 512, 1.0, 256.0, 32_768, 262_144),
    "1b": _preset(26, 1152, 6912, 4, 1, 256, 512, 1.0, 256.0, 32_768, 262_144),
    "4b": _preset(34, 2560, 10240, 8, 4, 256, 1024, 8.0, 256.0, 131_072, 262_208),
    "12b": _preset(48, 3840, 15360, 16, 8, 256, 1024, 8.0, 256.0, 131_072, 262_208),
    "27b": _preset(62, 5376, 21504, 32, 16, 128, 1024, 8.0, 168.0, 131_072, 262_208),
}


__all__ = ["Gemma3Config", "validate", "PRESETS", "SLIDING", "GLOBAL", "LAYER_TYPES", "LIMITS", "ConfigError",
           "default_layer_types"]

"""Gemma 3 text-decoder configuration: the presets of the release and ``config.json`` parsing.

>>> cfg = Gemma3Config.preset("1b")
>>> cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
(26, 4, 1, 256)
>>> [i for i in range(cfg.n_layers) if cfg.is_global(i)]
[5, 11, 17, 23]
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
GLOBAL = "full_attention"
LAYER_TYPES = (SLIDING, GLOBAL)


class ConfigError(ValueError):
    """A configuration that cannot describe a Gemma 3 model."""


def default_layer_types(n_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's layout: layer i is global when (i + 1) % pattern == 0, else sliding-window.

    >>> default_layer_types(7)
    ('sliding_attention', 'sliding_attention', 'sliding_attention', 'sliding_attention', 'sliding_attention', 'full_attention', 'sliding_attention')
    """
    return tuple(GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers))


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
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.n_layers))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for name in ("n_layers", "d_model", "d_mlp", "n_heads", "n_kv_heads", "d_head", "vocab_size", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}): "
                "each key/value head serves a whole group of query heads"
            )
        if len(self.layer_types) != self.n_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but n_layers is {self.n_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ConfigError(f"unknown layer type(s) {bad}; expected {SLIDING!r} or {GLOBAL!r}")
        if self.rope_global_factor <= 0 or self.query_pre_attn_scalar <= 0:
            raise ConfigError("rope_global_factor and query_pre_attn_scalar must be positive")

    # ------------------------------------------------------------------ derived
    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def attn_scale(self) -> float:
        """The factor on q k^T: query_pre_attn_scalar ** -0.5."""
        return self.query_pre_attn_scalar**-0.5

    def is_global(self, layer: int) -> bool:
        """True when ``layer`` attends to every earlier token, False for a sliding-window layer."""
        return self.layer_types[layer] == GLOBAL

    def replace(self, **changes: Any) -> "Gemma3Config":
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

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "Gemma3Config":
        """The released text-decoder shapes: ``270m``, ``1b``, ``4b``, ``12b``, ``27b``.

        >>> Gemma3Config.preset("27b").attn_scale == 168 ** -0.5
        True
        """
        key = name.lower().replace("gemma-3-", "").replace("gemma3-", "")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[key])

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike) -> "Gemma3Config":
        """Read a Hugging Face ``config.json`` (a dict, a file, or a directory holding one).

        Reads both RoPE spellings (``rope_theta``/``rope_local_base_freq``/``rope_scaling`` and
        ``rope_parameters``), ``layer_types`` or the every-6th rule (``sliding_window_pattern``),
        and the ``text_config`` nesting of multimodal checkpoints.

        >>> cfg = Gemma3Config.from_hf({"model_type": "gemma3_text", "num_hidden_layers": 2,
        ...     "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        ...     "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300, "sliding_window": 8,
        ...     "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
        >>> cfg.rope_global_factor, cfg.window
        (8.0, 8)
        """
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        if isinstance(hf.get("text_config"), dict):
            hf = hf["text_config"]
        model_type = hf.get("model_type", "gemma3_text")
        if model_type not in ("gemma3_text", "gemma3"):
            raise ConfigError(f"model_type {model_type!r} is not a Gemma 3 text model")
        for softcap in ("final_logit_softcapping", "attn_logit_softcapping"):
            if hf.get(softcap) is not None:
                raise ConfigError(f"{softcap}={hf[softcap]} is set, but Gemma 3 uses no softcapping")
        if hf.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention is set (an EmbeddingGemma-style encoder), "
                              "not the causal Gemma 3 decoder this model implements")
        # Released multimodal configs omit fields equal to transformers' Gemma3TextConfig defaults.
        hf = {**HF_TEXT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k not in HF_TEXT_DEFAULTS}}
        required = ("num_hidden_layers", "hidden_size", "intermediate_size")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"config.json lacks {missing}")

        local_base, global_base, factor = 10_000.0, 1_000_000.0, 1.0
        rope_params = hf.get("rope_parameters")
        if isinstance(rope_params, dict) and (GLOBAL in rope_params or SLIDING in rope_params):
            g = rope_params.get(GLOBAL) or {}
            s = rope_params.get(SLIDING) or {}
            global_base = float(g.get("rope_theta", global_base))
            local_base = float(s.get("rope_theta", local_base))
            factor = _linear_factor(g)
            if _linear_factor(s) != 1.0:
                raise ConfigError("RoPE scaling on sliding layers is not part of Gemma 3")
        else:
            if isinstance(rope_params, dict):  # a single dict: the global layers' parameters
                global_base = float(rope_params.get("rope_theta", hf.get("rope_theta", global_base)))
                factor = _linear_factor(rope_params)
            else:
                global_base = float(hf.get("rope_theta", global_base))
                factor = _linear_factor(hf.get("rope_scaling") or {})
            local_base = float(hf.get("rope_local_base_freq", local_base))

        n_layers = int(hf["num_hidden_layers"])
        layer_types = hf.get("layer_types")
        if layer_types is None:
            layer_types = default_layer_types(n_layers, int(hf.get("sliding_window_pattern") or 6))
        n_heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id", 1)
        return cls(
            n_layers=n_layers,
            d_model=int(hf["hidden_size"]),
            d_mlp=int(hf["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(hf["num_key_value_heads"]),
            d_head=int(hf["head_dim"]),
            vocab_size=int(hf["vocab_size"]),
            window=int(hf["sliding_window"]),
            rope_local_base=local_base,
            rope_global_base=global_base,
            rope_global_factor=factor,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_positions=int(hf.get("max_position_embeddings", 131_072)),
            layer_types=tuple(layer_types),
            pad_token_id=int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0),
            eos_token_id=int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 1)),
            bos_token_id=int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 2),
        )

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``Gemma3TextConfig`` keyword arguments.

        >>> Gemma3Config.preset("4b").to_hf()["rope_scaling"]
        {'rope_type': 'linear', 'factor': 8.0}
        """
        return {
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "num_hidden_layers": self.n_layers,
            "hidden_size": self.d_model,
            "intermediate_size": self.d_mlp,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.d_head,
            "vocab_size": self.vocab_size,
            "sliding_window": self.window,
            "rope_theta": self.rope_global_base,
            "rope_local_base_freq": self.rope_local_base,
            "rope_scaling": (
                {"rope_type": "linear", "factor": float(self.rope_global_factor)}
                if self.rope_global_factor != 1.0 else None
            ),
            "query_pre_attn_scalar": (
                int(self.query_pre_attn_scalar) if float(self.query_pre_attn_scalar).is_integer()
                else self.query_pre_attn_scalar
            ),
            "rms_norm_eps": self.eps,
            "max_position_embeddings": self.max_positions,
            "layer_types": list(self.layer_types),
            "hidden_activation": "gelu_pytorch_tanh",
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "tie_word_embeddings": True,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
        }


# transformers' Gemma3TextConfig defaults, which released configs rely on by omission.
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "sliding_window": 4096, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}


def _linear_factor(params: dict[str, Any]) -> float:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return 1.0
    if kind != "linear":
        raise ConfigError(f"RoPE type {kind!r} is not used by Gemma 3 (expected 'default' or 'linear')")
    return float(params.get("factor", 1.0))


def _preset(n_layers, d_model, d_mlp, n_heads, n_kv_heads, d_head, window, factor, scalar, max_pos, vocab):
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

"""Hugging Face ``config.json`` <-> :class:`~interp.model.config.Gemma3Config`.

Reads both RoPE spellings (``rope_theta``/``rope_local_base_freq``/``rope_scaling`` and
``rope_parameters``), ``layer_types`` or the every-6th rule (``sliding_window_pattern``), and the
``text_config`` nesting of multimodal checkpoints. Every problem is a
:class:`~interp.model.config.ConfigError` naming the field, and the file when there is one;
sizes are bounded before anything that grows with them is built.

>>> fields, source = hf_fields({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
...     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300})
>>> fields["n_layers"], fields["window"], source
(2, 4096, None)
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from ..hooks.checks import is_int, is_number
from .config_rules import GLOBAL, LIMITS, SLIDING, ConfigError, default_layer_types

if TYPE_CHECKING:
    from .config import Gemma3Config

# transformers' Gemma3TextConfig defaults, which released configs rely on by omission.
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "sliding_window": 4096, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}


def read_config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path`` (a ``config.json`` or a directory holding one), or a clear
    :class:`ConfigError` when it is missing, not JSON, or not an object."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}; a Hugging Face model directory needs one "
                          "(or pass config=Gemma3Config(...))") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(data), "null")
        raise ConfigError(f"{path} holds {kind}, not a JSON object of settings")
    return data


def hf_fields(hf: dict[str, Any] | str | os.PathLike[str]) -> tuple[dict[str, Any], str | None]:
    """:class:`Gemma3Config`'s fields from a Hugging Face config (a dict, a file, or a directory),
    and the file they came from (None for a dict). Missing, mistyped or contradictory keys are a
    :class:`ConfigError` naming the key (and the file); the values' bounds are checked when the
    config is built (:meth:`Gemma3Config.from_hf`, whose errors :func:`hf_error` renames)."""
    if isinstance(hf, dict):
        return _from_dict(hf), None
    path = os.fspath(hf)
    data = read_config_json(path)
    try:
        return _from_dict(data), path
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def hf_error(e: ConfigError, source: str | None) -> ConfigError:
    """``e`` (an error building a config from :func:`hf_fields`) with our field name replaced by its
    ``config.json`` key and the file named."""
    message = str(e)
    field = message.split(" ", 1)[0].split("=", 1)[0]
    if field in HF_KEYS:
        message = f"{HF_KEYS[field]} (our {field}){message[len(field):]}"
    return ConfigError(f"{source}: {message}" if source else message)


def _int(hf: dict[str, Any], key: str, field: str) -> int:
    value = hf[key]
    if not is_int(value):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    if field in LIMITS and not 0 < value <= LIMITS[field]:
        raise ConfigError(f"{key}={value:,} is outside 1..{LIMITS[field]:,} ({field})")
    return value


def _float(value: Any, key: str) -> float:
    if not is_number(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _linear_factor(params: Any) -> float:
    if not isinstance(params, dict):
        raise ConfigError(f"RoPE parameters must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return 1.0
    if kind != "linear":
        raise ConfigError(f"RoPE type {kind!r} is not used by Gemma 3 (expected 'default' or 'linear')")
    return _float(params.get("factor", 1.0), "rope factor")


def _rope(hf: dict[str, Any]) -> tuple[float, float, float]:
    """``(local base, global base, global linear factor)``."""
    local_base, global_base, factor = 10_000.0, 1_000_000.0, 1.0
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and (GLOBAL in params or SLIDING in params):
        g, s = params.get(GLOBAL) or {}, params.get(SLIDING) or {}
        global_base = _float(g.get("rope_theta", global_base), "rope_parameters.full_attention.rope_theta")
        local_base = _float(s.get("rope_theta", local_base), "rope_parameters.sliding_attention.rope_theta")
        factor = _linear_factor(g)
        if _linear_factor(s) != 1.0:
            raise ConfigError("RoPE scaling on sliding layers is not part of Gemma 3")
        return local_base, global_base, factor
    if isinstance(params, dict):  # a single dict: the global layers' parameters
        global_base = _float(params.get("rope_theta", hf.get("rope_theta", global_base)), "rope_theta")
        factor = _linear_factor(params)
    else:
        global_base = _float(hf.get("rope_theta", global_base), "rope_theta")
        factor = _linear_factor(hf.get("rope_scaling") or {})
    local_base = _float(hf.get("rope_local_base_freq", local_base), "rope_local_base_freq")
    return local_base, global_base, factor


def _from_dict(hf: dict[str, Any]) -> dict[str, Any]:
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
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size") if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks {missing}")

    n_layers = _int(hf, "num_hidden_layers", "n_layers")  # bounded before layer_types is built
    layer_types = hf.get("layer_types")
    if layer_types is None:
        pattern = hf.get("sliding_window_pattern") or 6
        if not is_int(pattern) or pattern < 1:
            raise ConfigError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
        layer_types = default_layer_types(n_layers, pattern)
    elif not isinstance(layer_types, list) or len(layer_types) != n_layers:
        got = f"a list of {len(layer_types)}" if isinstance(layer_types, list) else type(layer_types).__name__
        raise ConfigError(f"layer_types must be a list of {n_layers} entries (one per layer), got {got}")
    local_base, global_base, factor = _rope(hf)
    eos = hf.get("eos_token_id", 1)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return _fields(hf, n_layers, layer_types, local_base, global_base, factor, eos)


# our field -> its Hugging Face config.json key, to name the key a user must fix
HF_KEYS = {"rope_local_base": "rope_local_base_freq", "rope_global_base": "rope_theta",
           "rope_global_factor": "rope_scaling.factor", "eps": "rms_norm_eps",
           "query_pre_attn_scalar": "query_pre_attn_scalar", "pad_token_id": "pad_token_id",
           "eos_token_id": "eos_token_id", "bos_token_id": "bos_token_id", "d_head": "head_dim",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads"}


def _fields(hf: dict[str, Any], n_layers: int, layer_types: Any, local_base: float, global_base: float,
            factor: float, eos: Any) -> dict[str, Any]:
    return dict(
        n_layers=n_layers,
        d_model=_int(hf, "hidden_size", "d_model"),
        d_mlp=_int(hf, "intermediate_size", "d_mlp"),
        n_heads=_int(hf, "num_attention_heads", "n_heads"),
        n_kv_heads=_int(hf, "num_key_value_heads", "n_kv_heads"),
        d_head=_int(hf, "head_dim", "d_head"),
        vocab_size=_int(hf, "vocab_size", "vocab_size"),
        window=_int(hf, "sliding_window", "window"),
        rope_local_base=local_base,
        rope_global_base=global_base,
        rope_global_factor=factor,
        query_pre_attn_scalar=_float(hf.get("query_pre_attn_scalar", 256), "query_pre_attn_scalar"),
        eps=_float(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        max_positions=_int(hf, "max_position_embeddings", "max_positions"),
        layer_types=tuple(layer_types),
        pad_token_id=hf["pad_token_id"] if hf.get("pad_token_id") is not None else 0,
        eos_token_id=eos if eos is not None else 1,
        bos_token_id=hf["bos_token_id"] if hf.get("bos_token_id") is not None else 2,
    )


def config_to_hf(cfg: Gemma3Config) -> dict[str, Any]:
    """The equivalent Hugging Face ``Gemma3TextConfig`` keyword arguments."""
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": cfg.n_layers,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "vocab_size": cfg.vocab_size,
        "sliding_window": cfg.window,
        "rope_theta": cfg.rope_global_base,
        "rope_local_base_freq": cfg.rope_local_base,
        "rope_scaling": ({"rope_type": "linear", "factor": float(cfg.rope_global_factor)}
                         if cfg.rope_global_factor != 1.0 else None),
        "query_pre_attn_scalar": (int(cfg.query_pre_attn_scalar) if float(cfg.query_pre_attn_scalar).is_integer()
                                  else cfg.query_pre_attn_scalar),
        "rms_norm_eps": cfg.eps,
        "max_position_embeddings": cfg.max_positions,
        "layer_types": list(cfg.layer_types),
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "bos_token_id": cfg.bos_token_id,
        "tie_word_embeddings": True,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


__all__ = ["HF_TEXT_DEFAULTS", "hf_fields", "hf_error", "config_to_hf", "read_config_json"]

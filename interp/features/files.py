"""The floor under the dictionary formats: reading tensors and JSON safely, and the error type.

Nothing here knows a layout; :mod:`.gemma_scope` and :mod:`.saelens` read theirs with these, and
:mod:`.io` picks the layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..hooks.checks import is_int


class DictionaryFileError(ValueError):
    """A dictionary file that cannot be read or does not fit the model."""


def hf_hook(name: str | None) -> str | None:
    """A config's hook point as a name the registry resolves (drop a trailing ``.output``)."""
    if not isinstance(name, str) or not name:
        return None
    return name[: -len(".output")] if name.endswith(".output") else name


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DictionaryFileError(f"{path} is not a readable safetensors file ({e})") from None
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except (ValueError, OSError) as e:
            raise DictionaryFileError(f"{path} is not a readable npz of arrays ({e}; pickles are refused)") from None
    raise DictionaryFileError(f"{path.name}: dictionaries are read from .safetensors or .npz")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise DictionaryFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DictionaryFileError(f"{path} holds no JSON object")
    return data


CONFIG_KEYS = ("hf_hook_point_in", "hf_hook_point_out", "width", "model_name", "architecture", "l0",
               "affine_connection", "type", "hook_point", "site", "k")
TYPES = ("sae", "transcoder", "clt", "crosscoder")


def check_config(config: dict[str, Any], path: Path) -> str | None:
    """Refuse a Gemma Scope 2 ``config.json`` setting this reader does not apply; return its ``type``.

    >>> check_config({"type": "clt", "architecture": "jump_relu", "width": 262080}, Path("config.json"))
    'clt'
    """
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise DictionaryFileError(f"{path}: unknown setting(s) {unknown}; this reader applies {list(CONFIG_KEYS)}. "
                                  "Remove the key if it does not change the math, or ask for it to be supported")
    arch = config.get("architecture")
    kind = config.get("type")
    if arch == "topk" and kind == "clt":  # a TopK CLT this toolkit trained and saved (CrossLayerTranscoder.save)
        k = config.get("k")
        if not is_int(k) or k < 1:
            raise DictionaryFileError(f"{path}: a TopK CLT needs k (features kept per layer and token), an int >= 1; "
                                      f"got k={k!r}")
    elif arch is not None and arch not in ("jump_relu", "jumprelu"):
        raise DictionaryFileError(f"{path}: architecture={arch!r} is not supported; Gemma Scope 2 releases "
                                  "'jump_relu' dictionaries only (and this toolkit's TopK CLTs are type 'clt')")
    elif "k" in config:
        raise DictionaryFileError(f"{path}: k={config['k']!r} is for TopK CLTs (architecture 'topk', type 'clt'); "
                                  "remove it")
    if kind is not None and kind not in TYPES:
        raise DictionaryFileError(f"{path}: type={kind!r} is unknown; expected one of {list(TYPES)}")
    if kind == "crosscoder":
        raise DictionaryFileError(f"{path}: type='crosscoder' (several layers' residual streams in, every one out) "
                                  "is refused: no published reference (Google's release notes or code, SAELens, "
                                  "circuit-tracer) fixes how its per-layer tensors combine, and this toolkit does "
                                  "not guess. Use the single-layer SAEs or the CLT of the same release")
    return kind


__all__ = ["DictionaryFileError", "hf_hook", "read_tensors", "read_json", "check_config", "CONFIG_KEYS", "TYPES"]

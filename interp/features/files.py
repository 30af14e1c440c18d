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


__all__ = ["DictionaryFileError", "hf_hook", "read_tensors", "read_json"]

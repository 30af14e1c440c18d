"""Gemma Scope 2's layouts (and Gemma Scope's): one folder per dictionary.

A folder holds ``params.safetensors`` or ``params.npz`` (keys ``w_enc [d_in, d_sae]``,
``w_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``, and for a skip transcoder
``affine_skip_connection [d_in, d_out]``) and a ``config.json`` naming the Hugging Face hook
points (``hf_hook_point_in``, ``hf_hook_point_out``). npz files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .dictionary import Dictionary, JumpReLUSAE, Transcoder
from .files import DictionaryFileError, hf_hook, read_json, read_tensors

GEMMA_SCOPE_FILES = ("params.safetensors", "params.npz")


def is_gemma_scope(path: Path) -> bool:
    """Whether ``path`` is a file (read as a Gemma Scope params file) or a folder holding one."""
    if path.is_file():
        return True
    return any((path / f).is_file() for f in GEMMA_SCOPE_FILES)


def load_gemma_scope(path: Path) -> Dictionary:
    """Read one Gemma Scope folder (or its params file, with the ``config.json`` beside it)."""
    folder = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else [folder / f for f in GEMMA_SCOPE_FILES if (folder / f).is_file()]
    if not files:
        raise DictionaryFileError(f"{path} holds no Gemma Scope dictionary: expected one of {GEMMA_SCOPE_FILES}")
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    return _from_gemma_scope(read_tensors(files[0]), config, files[0])


def _pick(tensors: dict[str, torch.Tensor], names: tuple[str, ...], path: Path) -> dict[str, torch.Tensor]:
    by_key = {k.lower(): v for k, v in tensors.items()}
    missing = [n for n in names if n not in by_key]
    if missing:
        raise DictionaryFileError(f"{path.name} lacks {missing} (has {sorted(tensors)}); expected w_enc [d_in, d_sae], "
                                  "w_dec [d_sae, d_out], b_enc, b_dec, threshold")
    return {n: by_key[n].float() for n in names}


def _from_gemma_scope(tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> Dictionary:
    t = _pick(tensors, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), path)
    site_in = (hf_hook(config.get("hf_hook_point_in")) or hf_hook(config.get("hook_point"))
               or hf_hook(config.get("site")))
    site_out = hf_hook(config.get("hf_hook_point_out"))
    skip = {k.lower(): v for k, v in tensors.items()}.get("affine_skip_connection")
    if site_out is not None or skip is not None:
        return Transcoder(t["w_enc"], t["w_dec"], t["b_enc"], t["b_dec"], threshold=t["threshold"],
                          W_skip=None if skip is None else skip.float(), site=site_in, site_out=site_out)
    return JumpReLUSAE(t["w_enc"], t["w_dec"], t["b_enc"], t["b_dec"], threshold=t["threshold"], site=site_in)


__all__ = ["GEMMA_SCOPE_FILES", "is_gemma_scope", "load_gemma_scope"]

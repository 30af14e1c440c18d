"""Gemma Scope 2's layouts (and Gemma Scope's): one folder per dictionary.

A folder holds ``params.safetensors`` or ``params.npz`` (keys ``w_enc [d_in, d_sae]``,
``w_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``, and for a skip transcoder
``affine_skip_connection [d_in, d_out]``) and a ``config.json`` naming the Hugging Face hook
points (``hf_hook_point_in``, ``hf_hook_point_out``). npz files are read with ``allow_pickle=False``.

Gemma Scope 2's ``config.json`` keys (each applied or checked; any other key is an error naming it):
``hf_hook_point_in``/``_out``, ``width`` (checked against the tensors), ``model_name``,
``architecture`` (only ``jump_relu``), ``l0`` (a label), ``affine_connection`` (checked against
``affine_skip_connection`` in the file) and ``type``: ``sae`` (reads and writes one site),
``transcoder``, ``clt`` (a ``clt/`` folder of ``params_layer_{i}.safetensors``, see
:mod:`.clt_files`) or ``crosscoder`` (refused: no published reference fixes its math).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .clt import CrossLayerTranscoder
from .clt_files import LAYER_FILE, load_clt
from .dictionary import Dictionary, JumpReLUSAE, Transcoder
from .files import DictionaryFileError, check_config, hf_hook, read_json, read_tensors

GEMMA_SCOPE_FILES = ("params.safetensors", "params.npz")
GEMMA_SCOPE_PATTERNS = (*GEMMA_SCOPE_FILES, "params_layer_*.safetensors", "config.json")
def _is_clt_folder(path: Path) -> bool:
    return path.is_dir() and any(LAYER_FILE.match(p.name) for p in path.iterdir())


def is_gemma_scope(path: Path) -> bool:
    """Whether ``path`` is a file (read as a Gemma Scope params file) or a folder holding one (or a
    CLT's or crosscoder's ``params_layer_{i}.safetensors``)."""
    if path.is_file():
        return True
    return any((path / f).is_file() for f in GEMMA_SCOPE_FILES) or _is_clt_folder(path)


def load_gemma_scope(path: Path, *, lazy: bool = True) -> Any:
    """Read one Gemma Scope folder (or its params file, with the ``config.json`` beside it): a
    :class:`Dictionary`, or for a CLT folder a :class:`CrossLayerTranscoder` (``lazy``: memory-mapped)."""
    folder = path if path.is_dir() else path.parent
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    kind = check_config(config, folder / "config.json")
    if kind == "clt" or (kind is None and _is_clt_folder(folder) and path.is_dir()):
        return load_clt(CrossLayerTranscoder, folder, config, lazy=lazy)
    files = [path] if path.is_file() else [folder / f for f in GEMMA_SCOPE_FILES if (folder / f).is_file()]
    if not files:
        raise DictionaryFileError(f"{path} holds no Gemma Scope dictionary: expected one of {GEMMA_SCOPE_FILES}"
                                  f"{' (config.json says type=' + repr(kind) + ')' if kind else ''}")
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
    kind, affine, width = config.get("type"), config.get("affine_connection"), config.get("width")
    if affine is not None and bool(affine) != (skip is not None):
        raise DictionaryFileError(f"{path}: config.json says affine_connection={affine!r} but the file "
                                  f"{'holds' if skip is not None else 'lacks'} affine_skip_connection; the config "
                                  "and the tensors must agree (re-download the folder)")
    if width is not None and width != t["w_enc"].shape[1]:
        raise DictionaryFileError(f"{path}: config.json says width={width!r} but w_enc has {t['w_enc'].shape[1]} "
                                  "features; the config and the tensors must agree (re-download the folder)")
    if kind == "sae":
        if skip is not None or (site_out is not None and site_in is not None and site_out != site_in):
            what = ("holds affine_skip_connection" if skip is not None
                    else f"writes {site_out!r}, not the {site_in!r} it reads")
            raise DictionaryFileError(f"{path}: config.json says type='sae' but the file {what}; an SAE writes what "
                                      "it reads. Fix the type ('transcoder') or the file")
        return JumpReLUSAE(t["w_enc"], t["w_dec"], t["b_enc"], t["b_dec"], threshold=t["threshold"], site=site_in)
    if kind == "transcoder" or (site_out is not None and site_out != site_in) or skip is not None:
        return Transcoder(t["w_enc"], t["w_dec"], t["b_enc"], t["b_dec"], threshold=t["threshold"],
                          W_skip=None if skip is None else skip.float(), site=site_in, site_out=site_out)
    return JumpReLUSAE(t["w_enc"], t["w_dec"], t["b_enc"], t["b_dec"], threshold=t["threshold"], site=site_in)


__all__ = ["GEMMA_SCOPE_FILES", "GEMMA_SCOPE_PATTERNS", "is_gemma_scope", "load_gemma_scope"]

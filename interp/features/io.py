"""Loading dictionaries in any layout, checking them against a model, and the hub.

Layouts read (each in its own module):

- **Gemma Scope 2** (and Gemma Scope), :mod:`.gemma_scope`: a folder with ``params.safetensors``
  or ``params.npz`` and a ``config.json`` naming the Hugging Face hook points.
- **SAELens**, :mod:`.saelens`: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

:func:`save_dictionary` writes the SAELens format, with the registry site names in the
metadata, so a dictionary trained here opens in SAELens and loads back here unchanged.

The site comes from the file's config (Hugging Face module paths, ``model.layers.12``, resolve
through the registry's aliases); with ``model=`` given, the width is checked against the site
and a mismatch is an error naming both shapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..model import Gemma3
from .clt import CrossLayerTranscoder
from .dictionary import Dictionary
from .files import DictionaryFileError
from .gemma_scope import GEMMA_SCOPE_PATTERNS, is_gemma_scope, load_gemma_scope
from .saelens import SAELENS_CFG, SAELENS_WEIGHTS, load_saelens, save_dictionary, tl_hook_name


def load_dictionary(path: str | os.PathLike, *, site: str | None = None, site_out: str | None = None,
                    model: Gemma3 | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Dictionary | CrossLayerTranscoder:
    """Load a dictionary from a folder or file in any supported layout (see the module docstring).

    ``site``/``site_out`` override what the config names. With ``model``, the sites are resolved
    through its registry (Hugging Face paths included) and the widths checked. ``dtype`` None keeps
    the file's (a SAELens config's ``dtype``; Gemma Scope's float32).

    >>> sae = load_dictionary("resid_post_all/layer_6_width_16k_l0_small", model=m)   # doctest: +SKIP
    """
    p = Path(path)
    if not p.exists():
        raise DictionaryFileError(f"{p} holds no dictionary: there is no such file or folder")
    if p.is_dir() and (p / SAELENS_CFG).is_file():
        out = load_saelens(p, dtype=dtype, device=device)
    elif is_gemma_scope(p):
        out = load_gemma_scope(p).to(device=device, dtype=dtype or torch.float32)
    else:
        raise DictionaryFileError(f"{p} holds no dictionary: expected params.safetensors / params.npz (Gemma "
                                  f"Scope) or {SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens)")
    out.site = site or out.site
    out.site_out = site_out or out.site_out
    if model is not None:
        check_fits(out, model)
    return out


def check_fits(d: Dictionary | CrossLayerTranscoder, model: Gemma3) -> None:
    """Resolve ``d``'s sites through ``model``'s registry and check the widths (an attention SAE
    reading ``attn.z`` sees the heads flattened, as Hugging Face's o_proj input). A
    cross-layer transcoder checks itself (:meth:`CrossLayerTranscoder.check_fits`)."""
    if isinstance(d, CrossLayerTranscoder):
        d.check_fits(model)
        return
    for attr, width in (("site", d.d_in), ("site_out", d.d_out)):
        name = getattr(d, attr)
        if name is None:
            if attr == "site":
                raise DictionaryFileError("this dictionary names no site; pass site='blocks.L.resid_post' "
                                          "(or set .site)")
            continue
        found = model.registry.resolve(name)
        if len(found) != 1:
            raise DictionaryFileError(f"a dictionary reads one site; {name!r} matches {len(found)}")
        shape = model.site_shape(found[0], 1, 1)
        flat = int(torch.Size(shape[2:]).numel())
        if flat != width:
            raise DictionaryFileError(f"{type(d).__name__} {attr}={name!r} ({found[0]}) has width {flat} (site shape "
                                      f"{list(shape[2:])} per token) but the dictionary's is {width}")
        setattr(d, attr, found[0])


def download(repo_id: str, folder: str, *, token: str | None = None) -> Path:
    """Download one dictionary's folder from the hub (``params.safetensors`` or ``params.npz``
    and ``config.json``, a CLT's ``params_layer_{i}.safetensors``, or SAELens's two files) and
    return the local folder.

    >>> download("google/gemma-scope-2-270m-pt", "resid_post_all/layer_6_width_16k_l0_small")  # doctest: +SKIP
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError("loading dictionaries from the hub needs huggingface_hub: pip install "
                          "'gemma3-interp[hub]'") from e
    patterns = [f"{folder}/{f}" for f in (*GEMMA_SCOPE_PATTERNS, SAELENS_CFG, SAELENS_WEIGHTS)]
    try:
        root = snapshot_download(repo_id, allow_patterns=patterns, token=token or os.environ.get("HF_TOKEN") or None)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all need the same advice
        raise RuntimeError(f"could not download {repo_id}/{folder} ({type(e).__name__}: {e}); check the network, "
                           "the names, and HF_TOKEN for gated repositories; or pass a local folder") from e
    local = Path(root) / folder
    if not local.is_dir():
        raise DictionaryFileError(f"{repo_id} has no folder {folder!r}")
    return local


def from_hub(repo_id: str, folder: str, **kwargs: Any) -> Dictionary | CrossLayerTranscoder:
    """:func:`download` then :func:`load_dictionary` (``kwargs`` go to the latter)."""
    return load_dictionary(download(repo_id, folder), **kwargs)


__all__ = ["load_dictionary", "save_dictionary", "check_fits", "download", "from_hub", "DictionaryFileError",
           "tl_hook_name"]

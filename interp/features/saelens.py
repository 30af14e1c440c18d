"""SAELens's format: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

Read: ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``; ``W_skip`` stored ``[d_out, d_in]``;
``k`` for TopK. Written by :func:`save_dictionary`, with the registry site names in the metadata,
so a dictionary trained here opens in SAELens and loads back here unchanged.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .dictionary import Dictionary, JumpReLUSAE, TopKSAE, Transcoder
from .files import DictionaryFileError, hf_hook, read_json, read_tensors

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
_TL_KINDS = {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
             "pre_mlp_norm": "hook_mlp_in", "post_mlp_norm": "hook_mlp_out", "attn.z": "attn.hook_z",
             "post_attn_norm": "hook_attn_out", "mlp.hidden": "mlp.hook_post"}


def _from_tl(hook: str | None) -> str | None:
    """Our site for a TransformerLens-style hook name SAELens configs use (``blocks.3.hook_resid_post``)."""
    if not hook:
        return None
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if m:
        for ours, tl in _TL_KINDS.items():
            if m.group(2) == tl:
                return f"blocks.{m.group(1)}.{ours}"
    return None


def tl_hook_name(site: str | None) -> str | None:
    """The TransformerLens-style hook name of one of our sites, for SAELens's metadata."""
    if not site:
        return None
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", site)
    if m and m.group(2) in _TL_KINDS:
        return f"blocks.{m.group(1)}.{_TL_KINDS[m.group(2)]}"
    return site


def load_saelens(folder: Path) -> Dictionary:
    cfg = read_json(folder / SAELENS_CFG)
    weights = folder / SAELENS_WEIGHTS
    if not weights.is_file():
        raise DictionaryFileError(f"{folder} has {SAELENS_CFG} but no {SAELENS_WEIGHTS}")
    t = read_tensors(weights)
    arch = cfg.get("architecture", "standard")
    meta = cfg.get("metadata") or {}
    site = (meta.get("interp_site") or hf_hook(meta.get("hf_hook_name")) or hf_hook(cfg.get("hf_hook_name"))
            or _from_tl(meta.get("hook_name")) or _from_tl(cfg.get("hook_name")))
    site_out = (meta.get("interp_site_out") or hf_hook(meta.get("hf_hook_name_out"))
                or hf_hook(cfg.get("hf_hook_name_out")) or _from_tl(meta.get("hook_name_out"))
                or _from_tl(cfg.get("hook_name_out")))
    if cfg.get("apply_b_dec_to_input"):
        raise DictionaryFileError(f"{folder}: apply_b_dec_to_input=True SAEs (b_dec subtracted before encoding) are "
                                  "not supported; save with apply_b_dec_to_input=False")
    need = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in t]
    if need:
        raise DictionaryFileError(f"{weights.name} lacks {need}")
    common = (t["W_enc"].float(), t["W_dec"].float(), t["b_enc"].float(), t["b_dec"].float())
    if arch == "jumprelu":
        return JumpReLUSAE(*common, threshold=t["threshold"].float(), site=site)
    if arch == "topk":
        return TopKSAE(*common, k=int(cfg["k"]), site=site)
    if arch in ("jumprelu_transcoder", "jumprelu_skip_transcoder", "topk_transcoder", "topk_skip_transcoder"):
        skip = t.get("W_skip")
        return Transcoder(*common, threshold=t["threshold"].float() if "threshold" in t else None,
                          W_skip=None if skip is None else skip.float().T, k=cfg.get("k"), site=site,
                          site_out=site_out)
    raise DictionaryFileError(f"{folder}: SAELens architecture {arch!r} is not supported here (jumprelu, topk and "
                              "jumprelu/topk transcoders are)")


def save_dictionary(d: Dictionary, path: str | os.PathLike) -> Path:
    """Write ``d`` in SAELens's format into the folder ``path``: ``cfg.json`` and
    ``sae_weights.safetensors``. Returns the folder.

    >>> import tempfile
    >>> sae = JumpReLUSAE.random(4, 8, site="blocks.0.resid_post")
    >>> back = load_saelens(save_dictionary(sae, tempfile.mkdtemp()))
    >>> torch.equal(back.W_dec, sae.W_dec), back.site
    (True, 'blocks.0.resid_post')
    """
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"W_enc": d.W_enc, "W_dec": d.W_dec, "b_enc": d.b_enc, "b_dec": d.b_dec}
    extra = d.extra_tensors()
    if "threshold" in extra:
        tensors["threshold"] = extra["threshold"]
    if "W_skip" in extra:
        tensors["W_skip"] = extra["W_skip"].T  # SAELens stores [d_out, d_in]
    if isinstance(d, Transcoder):
        arch = ("topk" if d.k is not None else "jumprelu") + ("_skip" if d.W_skip is not None else "") + "_transcoder"
    else:
        arch = d.architecture
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": d.d_in, "d_sae": d.d_sae, "dtype": str(d.W_enc.dtype).removeprefix("torch."),
        "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": tl_hook_name(d.site), "interp_site": d.site, "saved_by": "gemma3-interp"},
        **d.extra_config(),
    }
    if isinstance(d, Transcoder):
        cfg["d_out"] = d.d_out
        cfg["metadata"].update({"hook_name_out": tl_hook_name(d.site_out), "interp_site_out": d.site_out})
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / SAELENS_WEIGHTS))
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return folder



__all__ = ["SAELENS_CFG", "SAELENS_WEIGHTS", "load_saelens", "save_dictionary", "tl_hook_name"]

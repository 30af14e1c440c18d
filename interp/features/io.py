"""Loading and saving dictionaries: Gemma Scope 2's layouts, SAELens's format, the hub.

Layouts read:

- **Gemma Scope 2** (and Gemma Scope): a folder with ``params.safetensors`` or ``params.npz``
  (keys ``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``,
  and for a skip transcoder ``affine_skip_connection [d_in, d_out]``) and a ``config.json``
  naming the Hugging Face hook points (``hf_hook_point_in``, ``hf_hook_point_out``). npz files
  are read with ``allow_pickle=False``.
- **SAELens**: a folder with ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc``, ``W_dec``,
  ``b_enc``, ``b_dec``, ``threshold``; ``W_skip`` stored ``[d_out, d_in]``; ``k`` for TopK).

:func:`save_dictionary` writes the SAELens format, with the registry site names in the
metadata, so a dictionary trained here opens in SAELens and loads back here unchanged.

The site comes from the file's config (Hugging Face module paths, ``model.layers.12``, resolve
through the registry's aliases); with ``model=`` given, the width is checked against the site
and a mismatch is an error naming both shapes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dictionary import Dictionary, JumpReLUSAE, TopKSAE, Transcoder

GEMMA_SCOPE_FILES = ("params.safetensors", "params.npz")
SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
_TL_KINDS = {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
             "pre_mlp_norm": "hook_mlp_in", "post_mlp_norm": "hook_mlp_out", "attn.z": "attn.hook_z",
             "post_attn_norm": "hook_attn_out", "mlp.hidden": "mlp.hook_post"}


class DictionaryFileError(ValueError):
    """A dictionary file that cannot be read or does not fit the model."""


def _hook(name: str | None) -> str | None:
    """A config's hook point as a name the registry resolves (drop a trailing ``.output``)."""
    if not isinstance(name, str) or not name:
        return None
    return name[: -len(".output")] if name.endswith(".output") else name


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


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise DictionaryFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DictionaryFileError(f"{path} holds no JSON object")
    return data


def load_dictionary(path: str | os.PathLike, *, site: str | None = None, site_out: str | None = None,
                    model: Any = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Dictionary:
    """Load a dictionary from a folder or file in any supported layout (see the module docstring).

    ``site``/``site_out`` override what the config names. With ``model``, the sites are resolved
    through its registry (Hugging Face paths included) and the widths checked.

    >>> sae = load_dictionary("resid_post_all/layer_6_width_16k_l0_small", model=m)   # doctest: +SKIP
    """
    p = Path(path)
    if not p.exists():
        raise DictionaryFileError(f"{p} holds no dictionary: there is no such file or folder")
    folder = p if p.is_dir() else p.parent
    if p.is_dir() and (p / SAELENS_CFG).is_file():
        out = _load_saelens(p)
    else:
        files = [p] if p.is_file() else [folder / f for f in GEMMA_SCOPE_FILES if (folder / f).is_file()]
        if not files:
            raise DictionaryFileError(f"{p} holds no dictionary: expected params.safetensors / params.npz (Gemma "
                                      f"Scope) or {SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens)")
        config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        out = _from_gemma_scope(_read_tensors(files[0]), config, files[0])
    out.site = site or out.site
    out.site_out = site_out or out.site_out
    out = out.to(device=device, dtype=dtype)
    if model is not None:
        check_fits(out, model)
    return out


def _pick(tensors: dict[str, torch.Tensor], names: tuple[str, ...], path: Path) -> dict[str, torch.Tensor]:
    by_key = {k.lower(): v for k, v in tensors.items()}
    missing = [n for n in names if n not in by_key]
    if missing:
        raise DictionaryFileError(f"{path.name} lacks {missing} (has {sorted(tensors)}); expected w_enc [d_in, d_sae], "
                                  "w_dec [d_sae, d_out], b_enc, b_dec, threshold")
    return {n: by_key[n].float() for n in names}


def _from_gemma_scope(tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> Dictionary:
    t = _pick(tensors, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), path)
    site_in = _hook(config.get("hf_hook_point_in")) or _hook(config.get("hook_point")) or _hook(config.get("site"))
    site_out = _hook(config.get("hf_hook_point_out"))
    skip = {k.lower(): v for k, v in tensors.items()}.get("affine_skip_connection")
    if site_out is not None or skip is not None:
        return Transcoder(t["w_enc"], t["w_dec"], t["b_enc"], t["b_dec"], threshold=t["threshold"],
                          W_skip=None if skip is None else skip.float(), site=site_in, site_out=site_out)
    return JumpReLUSAE(t["w_enc"], t["w_dec"], t["b_enc"], t["b_dec"], threshold=t["threshold"], site=site_in)


def _load_saelens(folder: Path) -> Dictionary:
    cfg = _read_json(folder / SAELENS_CFG)
    weights = folder / SAELENS_WEIGHTS
    if not weights.is_file():
        raise DictionaryFileError(f"{folder} has {SAELENS_CFG} but no {SAELENS_WEIGHTS}")
    t = _read_tensors(weights)
    arch = cfg.get("architecture", "standard")
    meta = cfg.get("metadata") or {}
    site = (meta.get("interp_site") or _hook(meta.get("hf_hook_name")) or _hook(cfg.get("hf_hook_name"))
            or _from_tl(meta.get("hook_name")) or _from_tl(cfg.get("hook_name")))
    site_out = (meta.get("interp_site_out") or _hook(meta.get("hf_hook_name_out")) or _hook(cfg.get("hf_hook_name_out"))
                or _from_tl(meta.get("hook_name_out")) or _from_tl(cfg.get("hook_name_out")))
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


def check_fits(d: Dictionary, model: Any) -> None:
    """Resolve ``d``'s sites through ``model``'s registry and check the widths (an attention SAE
    reading ``attn.z`` sees the heads flattened, as Hugging Face's o_proj input)."""
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


def save_dictionary(d: Dictionary, path: str | os.PathLike) -> Path:
    """Write ``d`` in SAELens's format into the folder ``path``: ``cfg.json`` and
    ``sae_weights.safetensors``. Returns the folder.

    >>> import tempfile
    >>> sae = JumpReLUSAE.random(4, 8, site="blocks.0.resid_post")
    >>> back = load_dictionary(save_dictionary(sae, tempfile.mkdtemp()))
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


def download(repo_id: str, folder: str, *, token: str | None = None) -> Path:
    """Download one dictionary's folder from the hub (``params.safetensors`` or ``params.npz``
    and ``config.json``, or SAELens's two files) and return the local folder.

    >>> download("google/gemma-scope-2-270m-pt", "resid_post_all/layer_6_width_16k_l0_small")  # doctest: +SKIP
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError("loading dictionaries from the hub needs huggingface_hub: pip install "
                          "'gemma3-interp[hub]'") from e
    patterns = [f"{folder}/{f}" for f in (*GEMMA_SCOPE_FILES, "config.json", SAELENS_CFG, SAELENS_WEIGHTS)]
    try:
        root = snapshot_download(repo_id, allow_patterns=patterns, token=token or os.environ.get("HF_TOKEN") or None)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all need the same advice
        raise RuntimeError(f"could not download {repo_id}/{folder} ({type(e).__name__}: {e}); check the network, "
                           "the names, and HF_TOKEN for gated repositories; or pass a local folder") from e
    local = Path(root) / folder
    if not local.is_dir():
        raise DictionaryFileError(f"{repo_id} has no folder {folder!r}")
    return local


def from_hub(repo_id: str, folder: str, **kwargs: Any) -> Dictionary:
    """:func:`download` then :func:`load_dictionary` (``kwargs`` go to the latter)."""
    return load_dictionary(download(repo_id, folder), **kwargs)


__all__ = ["load_dictionary", "save_dictionary", "check_fits", "download", "from_hub", "DictionaryFileError",
           "tl_hook_name"]

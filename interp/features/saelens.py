"""SAELens's format: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

Read (:func:`load_saelens`): every architecture SAELens 6 saves for inference that is a sparse
dictionary -- ``standard``, ``gated``, ``jumprelu``, ``topk``, ``abstopk``, ``transcoder``,
``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder`` -- with every inference
setting applied as SAELens applies it (:class:`~interp.features.settings.Settings`), in the
config's ``dtype`` unless the caller asks for another. A setting or key this reader does not know
is an error naming it, never a dictionary that silently computes something else.

Written by :func:`save_dictionary`: what SAELens 6 reads back whole (``metadata.sae_lens_version``,
``metadata.hook_name`` in TransformerLens spelling, ``hf_hook_name`` as Gemma Scope 2 spells it,
and our own site names beside them), so
``SAE.load_from_disk`` keeps the hook and ``HookedSAETransformer.add_sae`` attaches it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..model.sites import BY_KIND, LAYER_FORMAT, SITES, block_site, split_site, tl_name
from .architectures import AbsTopKSAE, GatedSAE, StandardSAE
from .dictionary import Dictionary, JumpReLUSAE, TopKSAE, Transcoder
from .files import DictionaryFileError, hf_hook, read_json, read_tensors
from .settings import Settings

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
#: The SAELens release the written layout was checked against (``SAE.load_from_disk``).
SAELENS_VERSION = "6.54.0"
#: Where SAELens attaches a dictionary on a site that has no exactly equal TransformerLens name (the
#: site table's ``tl`` aliases cover the rest): an MLP-input transcoder's ``hook_mlp_in``.
_SAELENS_ONLY = {"pre_mlp_norm": "hook_mlp_in"}
_FROM_TL = {**{s.tl: s.kind for s in SITES if s.tl}, **{tl: kind for kind, tl in _SAELENS_ONLY.items()}}
_SAES: dict[str, type[Dictionary]] = {"standard": StandardSAE, "gated": GatedSAE, "jumprelu": JumpReLUSAE,
                                      "topk": TopKSAE, "abstopk": AbsTopKSAE}
#: SAELens transcoder architectures -> (fires by threshold, has W_skip); ``topk_transcoder`` is ours.
_TRANSCODERS = {"transcoder": (False, False), "skip_transcoder": (False, True), "jumprelu_transcoder": (True, False),
                "jumprelu_skip_transcoder": (True, True), "topk_transcoder": (False, False),
                "topk_skip_transcoder": (False, True)}
_KEYS = {"architecture", "d_in", "d_sae", "d_out", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
         "reshape_activations", "metadata", "k", "rescale_acts_by_decoder_norm", "norm_scaling_factor"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _from_tl(hook: str | None) -> str | None:
    """Our site for a TransformerLens-style hook name SAELens configs use (``blocks.3.hook_resid_post``)."""
    if not hook:
        return None
    layer, kind = split_site(hook)
    if kind not in _FROM_TL or (layer is None) == BY_KIND[_FROM_TL[kind]].per_layer:
        return None
    return _FROM_TL[kind] if layer is None else block_site(layer, _FROM_TL[kind])


def tl_hook_name(site: str | None) -> str | None:
    """The TransformerLens-style hook name of one of our sites, for SAELens's metadata.

    >>> tl_hook_name("blocks.3.resid_post")
    'blocks.3.hook_resid_post'
    """
    if not site:
        return None
    try:
        name = tl_name(site)
    except KeyError:  # not one of our sites (a name this toolkit cannot resolve): written as it is
        return site
    layer, kind = split_site(site)
    if name is None and kind in _SAELENS_ONLY and layer is not None:
        name = LAYER_FORMAT.format(layer=layer) + _SAELENS_ONLY[kind]  # TransformerLens's layer prefix is ours
    return name if name is not None else site


def hf_hook_name(site: str | None) -> str | None:
    """The Hugging Face module path of one of our sites (as Gemma Scope 2 names it), or None.

    >>> hf_hook_name("blocks.3.pre_mlp_norm")
    'model.layers.3.pre_feedforward_layernorm'
    """
    from ..model.sites import BY_KIND, HF_LAYER

    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", site or "")
    kind = BY_KIND.get(m.group(2)) if m else None
    if m is None or kind is None or not kind.hf:
        return None
    return kind.hf[0].format(p=HF_LAYER.format(layer=int(m.group(1))))


def _dtype(cfg: dict[str, Any], where: Path) -> torch.dtype:
    name = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if name not in _DTYPES:
        raise DictionaryFileError(f"{where}: dtype {cfg.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _settings(cfg: dict[str, Any], arch: str, where: Path) -> Settings:
    norm = cfg.get("normalize_activations", "none")
    factor = cfg.get("norm_scaling_factor")
    if norm == "expected_average_only_in" and factor is None:
        raise DictionaryFileError(
            f"{where}: normalize_activations='expected_average_only_in' with no scaling factor in the file (SAELens "
            "folds the factor into the weights when training ends, and from_pretrained folds the one its registry "
            "lists; SAE.load_from_disk applies nothing). Fold it (W_enc * s, W_dec / s, b_dec / s, then 'none') or "
            "add \"norm_scaling_factor\": s to cfg.json")
    if norm not in ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in"):
        raise DictionaryFileError(f"{where}: normalize_activations={norm!r} is not supported (none, "
                                  "constant_norm_rescale, layer_norm and expected_average_only_in with its factor are)")
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise DictionaryFileError(f"{where}: reshape_activations={reshape!r} is not supported (none, hook_z are)")
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale and arch not in ("topk", "abstopk"):
        raise DictionaryFileError(f"{where}: rescale_acts_by_decoder_norm is a TopK setting; SAELens's {arch!r} "
                                  "ignores it, so the file is ambiguous")
    transcoder = arch in _TRANSCODERS
    try:
        return Settings(apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", not transcoder)),
                        normalize_activations=norm, rescale_acts_by_decoder_norm=bool(rescale),
                        reshape_activations="none" if transcoder else reshape,
                        scaling_factor=None if factor is None else float(factor))
    except ValueError as e:
        raise DictionaryFileError(f"{where}: {e}") from None


def load_saelens(folder: Path, *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> Dictionary:
    """Read a SAELens folder (see the module docstring); ``dtype`` None keeps the config's."""
    cfg = read_json(folder / SAELENS_CFG)
    weights = folder / SAELENS_WEIGHTS
    if not weights.is_file():
        raise DictionaryFileError(f"{folder} has {SAELENS_CFG} but no {SAELENS_WEIGHTS}")
    arch = cfg.get("architecture", "standard")
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise DictionaryFileError(f"{folder}: metadata must be a JSON object")
    if meta.get("sae_lens_version"):  # a SAELens 6 file: every key is one we know
        unknown = sorted(set(cfg) - _KEYS)
        if unknown:
            raise DictionaryFileError(f"{folder}: {SAELENS_CFG} has settings this reader does not apply: {unknown}")
    elif cfg.get("finetuning_scaling_factor"):
        raise DictionaryFileError(f"{folder}: finetuning_scaling_factor (a pre-6.0 SAELens setting) is not supported")
    if arch not in _SAES and arch not in _TRANSCODERS:
        raise DictionaryFileError(f"{folder}: SAELens architecture {arch!r} is not a sparse dictionary read here "
                                  f"({', '.join([*_SAES, *_TRANSCODERS])} are)")
    settings = _settings(cfg, arch, folder)
    want = dtype or _dtype(cfg, folder)
    t = {k: v.to(want) for k, v in read_tensors(weights).items()}
    site = (meta.get("interp_site") or hf_hook(meta.get("hf_hook_name")) or hf_hook(cfg.get("hf_hook_name"))
            or _from_tl(meta.get("hook_name")) or _from_tl(cfg.get("hook_name")))
    site_out = (meta.get("interp_site_out") or hf_hook(meta.get("hf_hook_name_out"))
                or hf_hook(cfg.get("hf_hook_name_out")) or _from_tl(meta.get("hook_name_out"))
                or _from_tl(cfg.get("hook_name_out")))
    need = ["W_enc", "W_dec", "b_gate" if arch == "gated" else "b_enc", "b_dec"]
    if arch == "gated":
        need += ["b_mag", "r_mag"]
    if arch in ("jumprelu",) or _TRANSCODERS.get(arch, (False,))[0]:
        need.append("threshold")
    if _TRANSCODERS.get(arch, (False, False))[1]:
        need.append("W_skip")
    missing = [k for k in need if k not in t]
    if missing:
        raise DictionaryFileError(f"{weights}: architecture {arch!r} needs {missing}")
    extra = sorted(set(t) - set(need))
    if extra:
        raise DictionaryFileError(f"{weights}: tensors {extra} are not part of a {arch!r} dictionary")
    try:
        if arch == "gated":
            out: Dictionary = GatedSAE(t["W_enc"], t["W_dec"], t["b_gate"], t["b_dec"], b_mag=t["b_mag"],
                                       r_mag=t["r_mag"], site=site, settings=settings)
        elif arch in _SAES:
            more: dict[str, Any] = {"threshold": t["threshold"]} if arch == "jumprelu" else {}
            if arch in ("topk", "abstopk"):
                more = {"k": int(cfg["k"])}
            out = _SAES[arch](t["W_enc"], t["W_dec"], t["b_enc"], t["b_dec"], site=site, settings=settings, **more)
        else:
            skip = t.get("W_skip")
            out = Transcoder(t["W_enc"], t["W_dec"], t["b_enc"], t["b_dec"], threshold=t.get("threshold"),
                             W_skip=None if skip is None else skip.T, k=cfg.get("k") if "topk" in arch else None,
                             site=site, site_out=site_out, settings=settings)
    except (ValueError, KeyError) as e:
        raise DictionaryFileError(f"{folder}: {e}") from None
    return out.to(device)


def _architecture(d: Dictionary, saelens_readable: bool) -> str:
    if not isinstance(d, Transcoder):
        return d.architecture
    if d.k is not None:
        if saelens_readable:
            raise ValueError("SAELens (6.54) has no TopK transcoder: it cannot load one (its 'topk_transcoder' is "
                             "unknown to it). Pass saelens_readable=False to write our own 'topk_transcoder' layout, "
                             "which load_dictionary reads")
        return "topk_skip_transcoder" if d.W_skip is not None else "topk_transcoder"
    return ("jumprelu_" if d.threshold is not None else "") + ("skip_" if d.W_skip is not None else "") + "transcoder"


def save_dictionary(d: Dictionary, path: str | os.PathLike, *, saelens_readable: bool = True) -> Path:
    """Write ``d`` in SAELens's format into the folder ``path``: ``cfg.json`` and
    ``sae_weights.safetensors``, with its settings and sites. Returns the folder.

    What SAELens cannot express is refused: a TopK transcoder (unless ``saelens_readable=False``:
    then our own ``topk_transcoder`` layout, which only this package reads) and an
    ``expected_average_only_in`` scaling factor (fold it into the weights first).

    >>> import tempfile
    >>> sae = JumpReLUSAE.random(4, 8, site="blocks.0.resid_post")
    >>> back = load_saelens(save_dictionary(sae, tempfile.mkdtemp()))
    >>> torch.equal(back.W_dec, sae.W_dec), back.site
    (True, 'blocks.0.resid_post')
    """
    from safetensors.torch import save_file

    arch = _architecture(d, saelens_readable)
    s = d.settings
    if s.scaling_factor is not None:
        raise ValueError("SAELens keeps no expected_average_only_in scaling factor on disk; fold it into the weights "
                         "(W_enc * s, W_dec / s, b_dec / s) and save with normalize_activations='none'")
    if s.rescale_acts_by_decoder_norm and arch not in ("topk", "abstopk"):
        raise ValueError(f"SAELens's {arch!r} has no rescale_acts_by_decoder_norm (only topk and abstopk do)")
    tensors: dict[str, torch.Tensor] = {"W_enc": d.W_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    tensors["b_gate" if arch == "gated" else "b_enc"] = d.b_enc
    for name, t in d.extra_tensors().items():
        tensors[name] = t.T if name == "W_skip" else t  # SAELens stores W_skip [d_out, d_in]
    meta: dict[str, Any] = {"sae_lens_version": SAELENS_VERSION, "hook_name": tl_hook_name(d.site),
                            "hf_hook_name": hf_hook_name(d.site), "interp_site": d.site, "saved_by": "gemma3-interp"}
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": d.d_in, "d_sae": d.d_sae, "dtype": str(d.W_enc.dtype).removeprefix("torch."),
        "device": "cpu", "apply_b_dec_to_input": s.apply_b_dec_to_input,
        "normalize_activations": s.normalize_activations, "reshape_activations": s.reshape_activations,
        "metadata": meta, **d.extra_config(),
    }
    if arch in ("topk", "abstopk"):
        cfg["rescale_acts_by_decoder_norm"] = s.rescale_acts_by_decoder_norm
    if isinstance(d, Transcoder):
        cfg["d_out"] = d.d_out
        meta.update({"hook_name_out": tl_hook_name(d.site_out), "hf_hook_name_out": hf_hook_name(d.site_out),
                     "interp_site_out": d.site_out})
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / SAELENS_WEIGHTS))
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return folder


__all__ = ["SAELENS_CFG", "SAELENS_WEIGHTS", "SAELENS_VERSION", "load_saelens", "save_dictionary", "tl_hook_name",
           "hf_hook_name"]

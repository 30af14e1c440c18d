"""Gemma Scope 2's ``clt/`` folders: ``config.json`` and ``params_layer_{i}.safetensors`` per layer.

Each layer file holds ``w_enc [d_model, w_i]``, ``b_enc [w_i]``, ``threshold [w_i]``,
``w_dec [w_i, n_layers, d_model]`` (all output layers; those before ``i`` unused), ``b_dec [d_model]``
(output layer ``i``'s bias) and, for ``_affine`` folders, ``affine_skip_connection [d_model, d_model]``
(layer ``i``'s MLP input to its own MLP output). The config spells the hooks with ``{all}``
(``model.layers.{all}.pre_feedforward_layernorm.output``) and ``width`` is the total over layers.
Every shape is checked from the file headers before anything is read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .files import DictionaryFileError, hf_hook

if TYPE_CHECKING:
    from .clt import CrossLayerTranscoder

SITE_IN = "blocks.{layer}.pre_mlp_norm"  # what a CLT reads and writes by default, per layer
SITE_OUT = "blocks.{layer}.post_mlp_norm"

LAYER_FILE = re.compile(r"^params_layer_(\d+)\.safetensors$")
CLT_KEYS = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")


_NP_DTYPES = {"F64": (np.float64, None), "F32": (np.float32, None), "F16": (np.float16, None),
              "BF16": (np.uint16, torch.bfloat16)}


def mmap_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a zero-copy view of the memory-mapped file (keys
    lower-cased): indexing one reads only the pages it touches. Copy-on-write, so the file is
    never changed."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _NP_DTYPES:
            raise DictionaryFileError(f"{path}: {key} is stored as {info['dtype']}; CLT weights are read as "
                                      f"{sorted(_NP_DTYPES)}")
        np_dtype, view = _NP_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            t = torch.zeros(shape, dtype=view or torch.from_numpy(np.zeros(0, np_dtype)).dtype)
        else:
            t = torch.from_numpy(np.memmap(path, dtype=np_dtype, mode="c", offset=8 + n + start, shape=shape))
            t = t.view(view) if view is not None else t
        out[key.lower()] = t
    return out


def clt_files(folder: Path) -> list[Path]:
    """The folder's ``params_layer_{i}.safetensors``, by layer number (``_10`` after ``_9``); a gap
    is an error naming the missing file."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := LAYER_FILE.match(p.name))}
    if not found:
        raise DictionaryFileError(f"{folder} holds no params_layer_{{i}}.safetensors (a Gemma Scope 2 CLT folder "
                                  "has one per layer)")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise DictionaryFileError(f"{folder / f'params_layer_{missing[0]}.safetensors'} is missing (the folder has "
                                  f"layers {sorted(found)}; a CLT needs every layer 0..{max(found)}): download the "
                                  "whole folder again")
    return [found[i] for i in sorted(found)]


def _template(name: Any, path: Path, key: str) -> str:
    hook = hf_hook(name)
    if hook is None:
        return SITE_IN if key == "hf_hook_point_in" else SITE_OUT
    if "{all}" not in hook:
        raise DictionaryFileError(f"{path}: {key}={name!r} names one layer; a CLT's hooks are spelled with "
                                  "{all} (model.layers.{all}.pre_feedforward_layernorm.output)")
    return hook.replace("{all}", "{layer}")


def _shapes(files: list[Path]) -> tuple[list[dict[str, tuple[int, ...]]], set[str]]:
    from safetensors import SafetensorError, safe_open

    out, keys_seen = [], set()
    for p in files:
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                out.append({k.lower(): tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise DictionaryFileError(f"{p} is not a readable safetensors file ({e}): download it again") from None
        keys_seen |= set(out[-1])
    return out, keys_seen


def check_clt_folder(folder: Path, config: dict[str, Any]) -> tuple[list[Path], dict[str, Any]]:
    """Check every layer file's keys and shapes (from the headers) against each other and the
    config; returns the files and ``{"widths", "d_model", "skip"}``."""
    files = clt_files(folder)
    n = len(files)
    shapes, _ = _shapes(files)
    axes = {s["w_dec"][1] if len(s.get("w_dec", ())) == 3 else None for s in shapes}
    if len(axes) == 1 and (axis := axes.pop()) is not None and axis > n:
        raise DictionaryFileError(f"{folder / f'params_layer_{n}.safetensors'} is missing: every decoder writes to "
                                  f"{axis} layers but the folder has params_layer_0..{n - 1}; download the whole "
                                  "folder again")
    skip_flags = ["affine_skip_connection" in s for s in shapes]
    affine = config.get("affine_connection")
    for p, s, has in zip(files, shapes, skip_flags):
        lacking = [k for k in CLT_KEYS if k not in s]
        if lacking:
            raise DictionaryFileError(f"{p} lacks {lacking} (has {sorted(s)}); a CLT layer file holds w_enc, b_enc, "
                                      "threshold, w_dec, b_dec (and affine_skip_connection for _affine folders)")
        if affine is not None and bool(affine) != has:
            raise DictionaryFileError(f"{p}: config.json says affine_connection={affine!r} but the file "
                                      f"{'holds' if has else 'lacks'} affine_skip_connection; the config and the "
                                      "tensors must agree (re-download the folder)")
    if len(set(skip_flags)) > 1:
        raise DictionaryFileError(f"{folder}: some layer files hold affine_skip_connection and some do not")
    d_model = shapes[0]["w_enc"][0] if len(shapes[0]["w_enc"]) == 2 else -1
    widths = []
    for i, (p, s) in enumerate(zip(files, shapes)):
        if len(s["w_enc"]) != 2 or s["w_enc"][0] != d_model:
            raise DictionaryFileError(f"{p}: w_enc has shape {list(s['w_enc'])}, expected [d_model={d_model}, w_{i}]")
        w = s["w_enc"][1]
        want = {"b_enc": (w,), "threshold": (w,), "b_dec": (d_model,), "w_dec": (w, n, d_model)}
        if skip_flags[i]:
            want["affine_skip_connection"] = (d_model, d_model)
        for k, shape in want.items():
            if s[k] != shape:
                hint = ""
                if k == "w_dec" and len(s[k]) == 3 and s[k][1] != n:
                    hint = (f" (its output axis has {s[k][1]} layers but the folder has {n} layer files: a CLT "
                            "decodes to every layer; check that no layer file is missing or extra)")
                raise DictionaryFileError(f"{p}: {k} has shape {list(s[k])}, expected {list(shape)}{hint}")
        widths.append(w)
    width = config.get("width")
    if width is not None and width != sum(widths):
        raise DictionaryFileError(f"{folder / 'config.json'}: width={width!r} but the layer files hold {sum(widths)} "
                                  f"features in all ({widths[:4]}{'...' if n > 4 else ''} per layer); the config "
                                  "and the tensors must agree (re-download the folder)")
    out: dict[str, Any] = {"widths": widths, "d_model": d_model, "skip": skip_flags[0]}
    if config.get("architecture") == "topk":  # this toolkit's TopK CLTs (check_config has checked k)
        out["k"] = config["k"]
    return files, out


def load_clt(cls: type[CrossLayerTranscoder], folder: Path, config: dict[str, Any], *, lazy: bool = True,
             dtype: torch.dtype = torch.float32) -> CrossLayerTranscoder:
    """Read a Gemma Scope 2 ``clt/`` folder. ``lazy``: keep the weights in the memory-mapped files
    (each use reads its slices, in ``dtype``); else read them all now, in ``dtype`` (the decoder
    entries before each layer are dropped). ``cls``: the class to build (:class:`CrossLayerTranscoder`)."""
    files, shapes = check_clt_folder(folder, config)
    sites: dict[str, Any] = {"site": _template(config.get("hf_hook_point_in"), folder, "hf_hook_point_in"),
             "site_out": _template(config.get("hf_hook_point_out"), folder, "hf_hook_point_out")}
    if lazy:
        return cls.lazy_from(files, shapes, **sites).to(dtype=dtype)
    from safetensors import safe_open

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*CLT_KEYS, "affine_skip_connection")}
    for i, p in enumerate(files):
        with safe_open(str(p), framework="pt", device="cpu") as f:
            names = {k.lower(): k for k in f.keys()}
            for k in parts:
                if k == "w_dec":
                    parts[k].append(f.get_slice(names[k])[:, i:].to(dtype))
                elif k in names:
                    parts[k].append(f.get_tensor(names[k]).to(dtype))
    return cls(parts["w_enc"], parts["w_dec"], parts["b_enc"], parts["b_dec"], parts["threshold"],
                                parts["affine_skip_connection"] if shapes["skip"] else None, k=shapes.get("k"),
                                **sites)


def save_clt(clt: CrossLayerTranscoder, folder: Any) -> Path:
    """Write ``clt`` in Gemma Scope 2's ``clt/`` layout (float32 files; ``w_dec``'s unused entries zero).
    A TopK CLT (``clt.k`` set; Gemma Scope 2 releases none) is written the same way with
    ``"architecture": "topk"`` and ``"k"`` in ``config.json``, which this toolkit reads back.

    >>> import tempfile
    >>> from interp.features import CrossLayerTranscoder
    >>> folder = save_clt(CrossLayerTranscoder.random(3, 8, [4, 5, 6]), tempfile.mkdtemp())
    >>> [p.name for p in clt_files(folder)]
    ['params_layer_0.safetensors', 'params_layer_1.safetensors', 'params_layer_2.safetensors']
    >>> check_clt_folder(folder, {"width": 15})[1]
    {'widths': [4, 5, 6], 'd_model': 8, 'skip': False}
    >>> load_clt(CrossLayerTranscoder, folder, {}, lazy=False).widths
    [4, 5, 6]
    """
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    n, d = clt.n_layers, clt.d_model
    for i in range(n):
        w, b, thr = clt.encoder(i)
        dec = torch.zeros(clt.widths[i], n, d)
        for o in range(i, n):
            dec[:, o] = clt.decoder(i, o).float().cpu()
        tensors = {"w_enc": w, "b_enc": b, "threshold": thr, "w_dec": dec, "b_dec": clt.bias(i)}
        skip = clt.skip_weight(i)
        if skip is not None:
            tensors["affine_skip_connection"] = skip
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                  str(out / f"params_layer_{i}.safetensors"))
    hf = {SITE_IN: "model.layers.{all}.pre_feedforward_layernorm.output",
          SITE_OUT: "model.layers.{all}.post_feedforward_layernorm.output"}
    hooks = {key: hf.get(t, t.replace("{layer}", "{all}"))
             for key, t in (("hf_hook_point_in", clt.site), ("hf_hook_point_out", clt.site_out))}
    config: dict[str, Any] = {**hooks, "width": clt.d_sae, "architecture": "jump_relu",
                              "affine_connection": clt.has_skip, "type": "clt"}
    if clt.k is not None:
        config.update(architecture="topk", k=clt.k)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


__all__ = ["clt_files", "check_clt_folder", "load_clt", "save_clt"]

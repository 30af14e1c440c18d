"""Checkpoint loading: Hugging Face directories (single or sharded, text or multimodal),
gemma_pytorch pickles, GGUF files, the hub, and the embedded demo model.

Order of work, so that a bad or hostile checkpoint fails before anything is allocated:
read the configuration (JSON, checked field by field), read the tensors' names, shapes and
dtypes (headers only), check that the layer count the configuration states is the one the
tensor names show, build the configuration, check every name, shape and dtype against it,
check the model fits in memory, and only then build the model on ``meta`` and fill it tensor
by tensor (memory-mapped, no second copy; the tied embedding is the only unembedding).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    TensorSource,
    check_layer_count,
    check_memory,
    check_source,
    inside,
    layer_count,
    resolve_device,
    resolve_dtype,
    safetensors_source,
    split_fused_qkv,
    state_dict_source,
)
from .config import ConfigError, Gemma3Config
from .hf_config import read_config_json

PROJECT = "gemma3-interp"
CHECK_FINITE_BELOW = 4 << 30  # check_finite=None: check weights of checkpoints smaller than this (bytes)


def build_from_source(cls: Any, cfg: Gemma3Config, source: TensorSource, dtype: torch.dtype,
                      device: str | torch.device, tokenizer: Any = None, check_finite: bool | None = None) -> Any:
    """A model built on ``meta`` and filled tensor by tensor from ``source`` (no second copy),
    after every name, shape and dtype and the memory needed were checked. ``check_finite``
    (default: for checkpoints under 4 GiB) reports NaN or inf weights by name."""
    check_source(cfg, source)
    check_memory(cfg, dtype, device)
    if check_finite is None:
        check_finite = source.numel() * 4 < CHECK_FINITE_BELOW
    with torch.device("meta"):
        model = cls(cfg, tokenizer)
    bad: list[str] = []
    for name, _ in list(model.named_parameters()):
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        tensor = source.loaders[name]().to(device=device, dtype=dtype)
        if check_finite and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    if bad:
        raise CheckpointError(f"{source.origin} holds NaN or inf in {len(bad)} tensor(s): {bad[:10]}; the file is "
                              "corrupt (or pass check_finite=False to load it anyway)")
    return model.eval()


def load_pretrained(cls: Any, src: str | os.PathLike[str], dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", config: Gemma3Config | str | None = None,
                    tokenizer: Any = None, check_finite: bool | None = None) -> Any:
    """Resolve ``src`` (see ``Gemma3.from_pretrained``) and build the model from it."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    if isinstance(config, str):
        config = Gemma3Config.preset(config)
    if str(src) == "demo":
        from .demo import demo_dir

        src = demo_dir()
    path = Path(src).expanduser()
    if not path.exists():
        if _looks_like_hub_id(str(src)) and not Path(str(src).split("/")[0]).is_dir():
            path = download_from_hub(str(src))
        else:
            import difflib

            near = difflib.get_close_matches(str(src), ["demo"], n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r} (the embedded Gemma 3 270M)?" if near else (
                "; 'demo' loads the embedded Gemma 3 270M")
            raise FileNotFoundError(
                f"{src!r} is neither a local file or directory nor a hub id like 'google/gemma-3-1b-pt'{hint}")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import read_gguf
        from .tokenizer import Tokenizer

        ckpt = read_gguf(path, dtype=torch.float32)
        source = state_dict_source(ckpt.tensors, origin=path.name)
        if config is not None:
            check_layer_count(config.n_layers, source, "config=")
        tok = tokenizer or Tokenizer.from_bytes(ckpt.tokenizer_model)
        return build_from_source(cls, config or ckpt.config, source, dtype, device, tok, check_finite)
    if path.is_file() and path.suffix == ".safetensors":
        folder, files = path.parent, [path]
    elif path.is_file():  # a gemma_pytorch pickle
        return _load_gemma_pytorch(cls, path, config, dtype, device, tokenizer, check_finite)
    else:
        folder, files = path, _safetensors_files(path)
    source = safetensors_source(files)
    if config is None:
        hf = read_config_json(folder)
        text = hf["text_config"] if isinstance(hf.get("text_config"), dict) else hf
        stated = text.get("num_hidden_layers")
        if isinstance(stated, int) and not isinstance(stated, bool):
            check_layer_count(stated, source, f"{folder / 'config.json'} (num_hidden_layers)")
        try:
            config = Gemma3Config.from_hf(hf)
        except ConfigError as e:
            raise ConfigError(f"{folder / 'config.json'}: {e}") from None
    else:
        check_layer_count(config.n_layers, source, "config=")
    tok = tokenizer or _tokenizer_in(folder)
    return build_from_source(cls, config, source, dtype, device, tok, check_finite)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = set(weight_map.values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a shard index (a JSON object with a 'weight_map' of tensor "
                                  f"-> file): {type(e).__name__}: {e}") from None
        if not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{index}: every weight_map entry must be a file name")
        files = sorted(inside(folder, n) for n in names)
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index} names shard(s) that are not there: {absent}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors in {folder}; expected a Hugging Face model directory "
            "(config.json, model.safetensors or shards with model.safetensors.index.json, tokenizer.model)")
    return files


def _tokenizer_in(folder: Path) -> Any:
    file = folder / "tokenizer.model"
    if not file.exists():
        return None
    from .tokenizer import Tokenizer

    return Tokenizer.from_file(file)


def infer_config(source: TensorSource) -> Gemma3Config:
    """The released preset whose shapes match a state dict (for files without config.json)."""
    n_layers = layer_count(source.shapes)
    d_model = source.shapes.get("embed.weight", (0, 0))[1]
    for name in ("270m", "1b", "4b", "12b", "27b"):
        cfg = Gemma3Config.preset(name)
        if (cfg.n_layers, cfg.d_model) == (n_layers, d_model):
            vocab = source.shapes["embed.weight"][0]
            return cfg if vocab == cfg.vocab_size else cfg.replace(vocab_size=vocab)
    raise ConfigError(f"no Gemma 3 preset has {n_layers} layers of width {d_model}; pass config=Gemma3Config(...)")


def _load_gemma_pytorch(cls: Any, path: Path, config: Gemma3Config | None, dtype: torch.dtype,
                        device: str | torch.device, tokenizer: Any, check_finite: bool | None) -> Any:
    try:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            raw = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - report any unreadable pickle the same way
        raise CheckpointError(
            f"cannot read {path} as a gemma_pytorch checkpoint (loaded with weights_only=True; "
            f"arbitrary pickles are refused): {e}") from e
    state = raw.get("model_state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict (expected a dict under 'model_state_dict')")
    probe = state_dict_source(state, origin=path.name)
    if config is None:
        config = infer_config(probe)
    else:
        check_layer_count(config.n_layers, probe, "config=")
    source = state_dict_source(split_fused_qkv(state, config), origin=path.name)
    tok = tokenizer or _tokenizer_in(path.parent)
    return build_from_source(cls, config, source, dtype, device, tok, check_finite)


# ---------------------------------------------------------------------- hub
def _looks_like_hub_id(src: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", src)) and not src.startswith((".", "/"))


def download_from_hub(repo_id: str) -> Path:
    """Download config, safetensors and tokenizer of ``repo_id`` with huggingface_hub.

    Gated models (all of Gemma) need a token: ``HF_TOKEN`` in the environment or
    ``huggingface-cli login``, and the licence accepted on the model page.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(
            f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed: "
            f"pip install '{PROJECT}[hub]' (or pass a local directory)") from e
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model"],
            token=os.environ.get("HF_TOKEN") or None,
        )
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all need the same advice
        raise RuntimeError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the network, the id, and for gated models set HF_TOKEN and accept the licence "
            "on the model page; or pass a local directory.") from e
    return Path(folder)


__all__ = ["load_pretrained", "build_from_source", "infer_config", "download_from_hub", "CheckpointError",
           "check_memory", "CHECK_FINITE_BELOW"]

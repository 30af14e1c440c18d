"""Checkpoint loading: Hugging Face directories (single or sharded, text or multimodal),
gemma_pytorch pickles, GGUF files, the hub, and the embedded demo model.

Every format is first reduced to a :class:`TensorSource` (our parameter name -> shape and a
loader), checked against the model (missing, unexpected and misshaped tensors are listed in one
error), then loaded one tensor at a time into a model built on the ``meta`` device. Nothing is
held twice: safetensors are memory-mapped, each tensor is converted and placed, and the tied
embedding is the only copy of the unembedding.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import ConfigError, Gemma3Config

PROJECT = "gemma3-interp"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message lists what is wrong."""


@dataclass
class TensorSource:
    """Our parameter names mapped to (shape, zero-argument loader)."""

    shapes: dict[str, tuple[int, ...]]
    loaders: dict[str, Callable[[], torch.Tensor]]
    ignored: list[str]


# ---------------------------------------------------------------------- name mapping
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_PARTS = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "pre_mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    # gemma_pytorch spellings
    "self_attn.query_norm.weight": "attn.q_norm.weight",
    "self_attn.key_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
_VISION = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector|siglip_vision_model|mm_)")
_TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def our_name(hf_name: str) -> str | None:
    """Map a Hugging Face (or gemma_pytorch) tensor name to ours; None for tensors we skip.

    >>> our_name("model.layers.3.post_feedforward_layernorm.weight")
    'blocks.3.post_mlp_norm.weight'
    >>> our_name("language_model.model.embed_tokens.weight")
    'embed.weight'
    """
    if hf_name in _TIED_HEADS or _VISION.match(hf_name) or hf_name.endswith("freqs_cis"):
        return None  # tied head, vision tower, gemma_pytorch's RoPE tables: not weights we need
    name = hf_name
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            name = "model." + name[len(prefix):]
            break
    if name in ("model.embed_tokens.weight", "embedder.weight", "text_token_embedder.weight",
                "model.embedder.weight", "model.text_token_embedder.weight"):
        return "embed.weight"
    if name == "model.norm.weight":
        return "final_norm.weight"
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _HF_PARTS:
        return f"blocks.{m.group(1)}.{_HF_PARTS[m.group(2)]}"
    return hf_name  # unknown: reported as unexpected


# ---------------------------------------------------------------------- sources
def safetensors_source(files: list[Path]) -> TensorSource:
    """Memory-mapped safetensors file(s), HF names mapped to ours."""
    from safetensors import safe_open

    shapes, loaders, ignored = {}, {}, []
    for file in files:
        handle = safe_open(str(file), framework="pt")
        for key in handle.keys():
            ours = our_name(key)
            if ours is None:
                ignored.append(key)
                continue
            shapes[ours] = tuple(handle.get_slice(key).get_shape())
            loaders[ours] = (lambda h=handle, k=key: h.get_tensor(k))
    return TensorSource(shapes, loaders, ignored)


def state_dict_source(state: dict[str, torch.Tensor]) -> TensorSource:
    """An in-memory state dict in HF or gemma_pytorch naming (fused qkv is split by rows)."""
    shapes, loaders, ignored = {}, {}, []
    for key, tensor in state.items():
        if key.endswith("self_attn.qkv_proj.weight"):
            continue  # split below, once the head sizes are known
        ours = our_name(key)
        if ours is None or not isinstance(tensor, torch.Tensor):
            ignored.append(key)
            continue
        shapes[ours], loaders[ours] = tuple(tensor.shape), (lambda t=tensor: t)
    return TensorSource(shapes, loaders, ignored)


def split_fused_qkv(state: dict[str, torch.Tensor], cfg: Gemma3Config) -> dict[str, torch.Tensor]:
    """gemma_pytorch's ``qkv_proj`` rows are q, then k, then v: split them into HF names."""
    out = {}
    sizes = [cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head]
    for key, tensor in state.items():
        if not key.endswith("self_attn.qkv_proj.weight"):
            out[key] = tensor
            continue
        if tensor.shape[0] != sum(sizes):
            raise CheckpointError(f"{key} has {tensor.shape[0]} rows; q+k+v needs {sum(sizes)} for this config")
        stem = key[: -len("qkv_proj.weight")]
        for part, t in zip(("q_proj", "k_proj", "v_proj"), torch.split(tensor, sizes, dim=0)):
            out[f"{stem}{part}.weight"] = t
    return out


# ---------------------------------------------------------------------- checks and assembly
def check_source(model: nn.Module, source: TensorSource) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected and misshaped tensor."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(source.shapes))
    unexpected = sorted(set(source.shapes) - set(expected))
    misshaped = sorted(
        f"{n}: checkpoint {source.shapes[n]} vs model {expected[n]}"
        for n in set(expected) & set(source.shapes) if source.shapes[n] != expected[n]
    )
    if missing or unexpected or misshaped:
        lines = ["the checkpoint does not match the model configuration:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        lines.append("check that config.json belongs to these weights (or pass config=...)")
        raise CheckpointError("\n".join(lines))


def build_from_source(cls, cfg: Gemma3Config, source: TensorSource, dtype: torch.dtype,
                      device: str | torch.device, tokenizer: Any = None):
    """A model built on ``meta`` and filled tensor by tensor from ``source`` (no second copy)."""
    with torch.device("meta"):
        model = cls(cfg, tokenizer)
    check_source(model, source)
    for name, _ in list(model.named_parameters()):
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        tensor = source.loaders[name]().to(device=device, dtype=dtype)
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    return model.eval()


# ---------------------------------------------------------------------- entry point
def load_pretrained(cls, src: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", config: Gemma3Config | str | None = None,
                    tokenizer: Any = None):
    """Resolve ``src`` (see ``Gemma3.from_pretrained``) and build the model from it."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype {dtype} is not supported: use torch.float32 or torch.bfloat16 "
                         "(float16 overflows on Gemma 3 activations)")
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
            raise FileNotFoundError(
                f"{src!r} is neither a local file or directory nor a hub id like 'google/gemma-3-1b-pt'")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import read_gguf
        from .tokenizer import Tokenizer

        ckpt = read_gguf(path, dtype=torch.float32)
        source = state_dict_source(ckpt.tensors)
        tok = tokenizer or Tokenizer.from_bytes(ckpt.tokenizer_model)
        return build_from_source(cls, config or ckpt.config, source, dtype, device, tok)
    if path.is_file() and path.suffix == ".safetensors":
        folder, files = path.parent, [path]
    elif path.is_file():  # a gemma_pytorch pickle
        return _load_gemma_pytorch(cls, path, config, dtype, device, tokenizer)
    else:
        folder, files = path, _safetensors_files(path)
    cfg = config or Gemma3Config.from_hf(folder)
    tok = tokenizer or _tokenizer_in(folder)
    return build_from_source(cls, cfg, safetensors_source(files), dtype, device, tok)


def _safetensors_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json",):
        index = folder / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
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


def _tokenizer_in(folder: Path):
    file = folder / "tokenizer.model"
    if not file.exists():
        return None
    from .tokenizer import Tokenizer

    return Tokenizer.from_file(file)


def infer_config(shapes: dict[str, tuple[int, ...]]) -> Gemma3Config:
    """The released preset whose shapes match a state dict (for files without config.json)."""
    n_layers = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    d_model = shapes.get("embed.weight", (0, 0))[1]
    for name in ("270m", "1b", "4b", "12b", "27b"):
        cfg = Gemma3Config.preset(name)
        if (cfg.n_layers, cfg.d_model) == (n_layers, d_model):
            vocab = shapes["embed.weight"][0]
            return cfg if vocab == cfg.vocab_size else cfg.replace(vocab_size=vocab)
    raise ConfigError(f"no Gemma 3 preset has {n_layers} layers of width {d_model}; pass config=Gemma3Config(...)")


def _load_gemma_pytorch(cls, path: Path, config, dtype, device, tokenizer):
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
    cfg = config
    if cfg is None:
        probe = state_dict_source(state)
        cfg = infer_config(probe.shapes)
    source = state_dict_source(split_fused_qkv(state, cfg))
    tok = tokenizer or _tokenizer_in(path.parent)
    return build_from_source(cls, cfg, source, dtype, device, tok)


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

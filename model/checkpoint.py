"""Checkpoint tensors before they become a model: names, shapes, dtypes and sizes, all checked
before anything is allocated.

Every format is reduced to a :class:`TensorSource` (our parameter name -> shape, dtype and a
loader that reads the tensor only when called). :func:`check_layer_count` and
:func:`check_source` compare it with a configuration using only names and shapes, and
:func:`check_memory` compares the model's size with the memory the device has.

>>> from interp.model.config import Gemma3Config
>>> cfg = Gemma3Config(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=1, d_head=4, vocab_size=9)
>>> expected_shapes(cfg)["blocks.0.attn.q_proj.weight"]
(8, 8)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Gemma3Config
from .memory import available_memory, format_bytes
from .sites import LAYER_FORMAT


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or cannot be read: the message says what and where."""


@dataclass
class TensorSource:
    """Our parameter names mapped to shape, dtype (a string such as ``"BF16"``) and a loader."""

    shapes: dict[str, tuple[int, ...]]
    loaders: dict[str, Callable[[], torch.Tensor]]
    ignored: list[str] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)
    origin: str = "the checkpoint"

    def numel(self) -> int:
        """Number of elements in all tensors."""
        total = 0
        for shape in self.shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_TORCH_FLOAT = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}

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
_OUR_LAYER = re.compile(r"^blocks\.(\d+)\.")


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
        return LAYER_FORMAT.format(layer=m.group(1)) + _HF_PARTS[m.group(2)]  # parameter names share the prefix
    return hf_name  # unknown: reported as unexpected


def expected_shapes(cfg: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape for ``cfg`` (our names), without building a model."""
    d, f, hd = cfg.d_model, cfg.d_mlp, cfg.d_head
    per_layer = {
        "input_norm.weight": (d,), "post_attn_norm.weight": (d,), "pre_mlp_norm.weight": (d,),
        "post_mlp_norm.weight": (d,),
        "attn.q_proj.weight": (cfg.n_heads * hd, d), "attn.k_proj.weight": (cfg.n_kv_heads * hd, d),
        "attn.v_proj.weight": (cfg.n_kv_heads * hd, d), "attn.o_proj.weight": (d, cfg.n_heads * hd),
        "attn.q_norm.weight": (hd,), "attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
    }
    out: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        out.update({LAYER_FORMAT.format(layer=i) + k: v for k, v in per_layer.items()})
    out["final_norm.weight"] = (d,)
    return out


def layer_count(names: Any) -> int:
    """Number of layers named in a set of our parameter names (highest ``blocks.{i}`` + 1)."""
    return 1 + max((int(m.group(1)) for n in names if (m := _OUR_LAYER.match(n))), default=-1)


# ---------------------------------------------------------------------- sources
def safetensors_source(files: list[Path]) -> TensorSource:
    """Memory-mapped safetensors file(s), HF names mapped to ours (headers only are read here)."""
    from safetensors import SafetensorError, safe_open

    source = TensorSource({}, {}, origin=", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else ""))
    for file in files:
        try:
            handle: Any = safe_open(str(file), framework="pt")
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it may be truncated or "
                                  "corrupt: download or copy it again") from None
        for key in keys:
            ours = our_name(key)
            if ours is None:
                source.ignored.append(key)
                continue
            info = handle.get_slice(key)
            source.shapes[ours] = tuple(info.get_shape())
            source.dtypes[ours] = str(info.get_dtype())

            def load(h: Any = handle, k: str = key, f: Path = file) -> torch.Tensor:
                try:
                    tensor: torch.Tensor = h.get_tensor(k)
                    return tensor
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"cannot read tensor {k!r} from {f} ({e}); the file may be truncated "
                                          "or corrupt") from None

            source.loaders[ours] = load
    return source


def state_dict_source(state: dict[str, Any], origin: str = "the checkpoint") -> TensorSource:
    """An in-memory state dict in HF or gemma_pytorch naming (a fused qkv is split by
    :func:`split_fused_qkv` first)."""
    source = TensorSource({}, {}, origin=origin)
    for key, tensor in state.items():
        if key.endswith("self_attn.qkv_proj.weight"):
            continue  # split by split_fused_qkv, once the head sizes are known
        ours = our_name(key)
        if ours is None or not isinstance(tensor, torch.Tensor):
            source.ignored.append(key)
            continue
        source.shapes[ours], source.loaders[ours] = tuple(tensor.shape), _constant(tensor)
        source.dtypes[ours] = _TORCH_FLOAT.get(tensor.dtype, str(tensor.dtype).removeprefix("torch."))
    return source


def _constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


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


# ---------------------------------------------------------------------- checks
def check_layer_count(n_layers: int, source: TensorSource, where: str) -> None:
    """The configuration's layer count must be the one the tensor names show (checked before
    the configuration builds anything per layer)."""
    found = layer_count(source.shapes)
    if found != n_layers:
        raise CheckpointError(f"{where} says {n_layers:,} layers but {source.origin} holds tensors for {found}; "
                              "the configuration does not belong to these weights")


def check_source(cfg: Gemma3Config, source: TensorSource) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected, misshaped and
    non-float tensor (names and shapes only; nothing is read)."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(source.shapes))
    unexpected = sorted(set(source.shapes) - set(expected))
    misshaped = sorted(f"{n}: checkpoint {source.shapes[n]} vs model {expected[n]}"
                       for n in set(expected) & set(source.shapes) if source.shapes[n] != expected[n])
    not_float = sorted(f"{n} ({source.dtypes[n]})" for n in set(expected) & set(source.dtypes)
                       if source.dtypes[n] not in FLOAT_DTYPES)
    if missing or unexpected or misshaped or not_float:
        lines = [f"{source.origin} does not match the model configuration:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped),
                             ("not floating point (weights must be F16, BF16, F32 or F64)", not_float)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        lines.append("check that config.json belongs to these weights (or pass config=...)")
        raise CheckpointError("\n".join(lines))


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A model dtype from a torch dtype or its name (``"bfloat16"``, ``"torch.bfloat16"``, ``"bf16"``).

    >>> resolve_dtype("bfloat16"), resolve_dtype(torch.float32)
    (torch.bfloat16, torch.float32)
    """
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not a dtype this model runs in: use torch.float32 (or 'float32') "
                             "or torch.bfloat16 (or 'bfloat16'); float16 overflows on Gemma 3 activations")
        return DTYPE_NAMES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype {dtype} is not supported: use torch.float32 or torch.bfloat16 "
                         "(float16 overflows on Gemma 3 activations)")
    return dtype


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this torch build can use, or an error that says why not.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name ({e}); use 'cpu', 'cuda', 'cuda:1' or "
                         "'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "has no CUDA support (a CPU build)" if torch.version.cuda is None else "finds no usable GPU"
        raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) {build}; use device='cpu', or "
                         "install a CUDA build of torch on a machine with an NVIDIA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: there are {torch.cuda.device_count()} GPUs (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r}: MPS is not available here; use device='cpu'")
    return dev


def check_memory(cfg: Gemma3Config, dtype: torch.dtype, device: str | torch.device, what: str = "the weights") -> None:
    """Refuse (with the numbers) a model larger than the memory free on ``device``."""

    need = cfg.param_count() * torch.empty((), dtype=dtype).element_size()
    free = available_memory(device)
    if free is not None and need > free:
        raise MemoryError(f"{what} of this configuration ({cfg.param_count():,} parameters in {dtype}) need "
                          f"{format_bytes(need)}, but {device} has {format_bytes(free)} free")


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, refusing a name that leads outside ``folder`` (``..``, absolute, links)."""
    path = (folder / name).resolve()
    root = folder.resolve()
    if os.path.isabs(name) or not path.is_relative_to(root):
        raise CheckpointError(f"the shard index names {name!r}, which is outside the model folder {folder}; "
                              "refusing to read it")
    return path


__all__ = ["CheckpointError", "TensorSource", "FLOAT_DTYPES", "our_name", "expected_shapes", "layer_count",
           "safetensors_source", "state_dict_source", "split_fused_qkv", "check_layer_count", "check_source",
           "check_memory", "inside", "resolve_dtype", "resolve_device"]

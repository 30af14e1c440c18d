"""Read llama.cpp GGUF files of Gemma 3 into Hugging Face-named float tensors, a config and a
SentencePiece ``tokenizer.model``; write them out as a Hugging Face directory.

>>> ckpt = read_gguf("gemma-3-270m-q4_k_m.gguf")                      # doctest: +SKIP
>>> ckpt.config.n_layers, ckpt.tensors["model.norm.weight"].shape     # doctest: +SKIP
(18, torch.Size([640]))
>>> write_hf_dir(ckpt, "gemma-3-270m")                                # doctest: +SKIP
PosixPath('gemma-3-270m')

Needs the optional ``gguf`` package (``pip install 'gemma3-interp[demo]'``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, Gemma3Config

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'gemma3-interp[demo]'"

# GGUF per-block tensor name -> Hugging Face per-layer name.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class GGUFError(ValueError):
    """A GGUF file that is not a readable Gemma 3 checkpoint."""


class GGUFDependencyError(ImportError):
    """The optional ``gguf`` package is not installed."""


@dataclass
class GGUFCheckpoint:
    """What a Gemma 3 GGUF holds, in this project's terms.

    ``tensors`` uses Hugging Face names (``model.layers.N.self_attn.q_proj.weight`` ...), stores
    norm weights as offsets from 1 like HF checkpoints, and has no ``lm_head`` (tied to
    ``model.embed_tokens.weight``). ``tokenizer_model`` is a SentencePiece ``tokenizer.model``.
    """

    config: Gemma3Config
    tensors: dict[str, torch.Tensor]
    tokenizer_model: bytes


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a Gemma 3 GGUF tensor.

    >>> hf_name("blk.3.ffn_norm.weight")
    'model.layers.3.pre_feedforward_layernorm.weight'
    >>> hf_name("token_embd.weight")
    'model.embed_tokens.weight'
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise GGUFError(f"unexpected tensor {gguf_name!r} in a Gemma 3 GGUF")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"


def read_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
              progress: bool = False) -> GGUFCheckpoint:
    """Read a llama.cpp Gemma 3 GGUF: dequantized tensors (cast to ``dtype``), config and tokenizer.

    Every quantization the ``gguf`` package knows (Q4_K, Q5_0, Q6_K, Q8_0, F16, ...) is
    dequantized to float32, the +1 llama.cpp bakes into every ``*norm.weight`` is subtracted in
    float32, and only then is the result cast to ``dtype``. The metadata is checked against the
    tensor names (layer count) and every configuration bound before anything is dequantized.
    ``progress`` shows a progress bar.

    >>> ckpt = read_gguf("gemma-3-270m-q4_k_m.gguf", dtype=torch.bfloat16)   # doctest: +SKIP
    """
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise GGUFError(
            f"{os.fspath(path)!r} holds a {arch!r} model, not Gemma 3 (general.architecture must be 'gemma3')"
        )
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{os.fspath(path)!r} has no token_embd.weight tensor")
    vocab = int(names["token_embd.weight"].shape.tolist()[-1])
    try:  # the configuration is checked against the tensor names before anything is dequantized
        config = gemma3_config_from_gguf(reader, vocab_size=vocab)
    except (GGUFError, ConfigError) as e:
        raise GGUFError(f"{os.fspath(path)}: {e}") from None
    from gguf.quants import dequantize

    tensors: dict[str, torch.Tensor] = {}
    items = reader.tensors
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="dequantizing", unit="tensor", leave=False)
    for t in items:
        name = hf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        array = dequantize(t.data, t.tensor_type).reshape(shape).astype("float32", copy=False)
        if not array.flags.writeable:  # float32 tensors come straight from the read-only memmap
            array = array.copy()
        tensor = torch.from_numpy(array)
        if name.endswith("norm.weight"):
            tensor = tensor - 1.0
        tensors[name] = tensor.to(dtype).contiguous()
    return GGUFCheckpoint(config=config, tensors=tensors, tokenizer_model=sentencepiece_model_from_gguf(reader))


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A ``gguf.GGUFReader`` for ``path``, with clear errors for missing, foreign or truncated files."""
    try:
        import gguf
    except ImportError:
        raise GGUFDependencyError(f"reading GGUF files needs the 'gguf' package: {INSTALL_HINT}") from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path!r} is not a GGUF file (it does not start with the 'GGUF' magic bytes)")
    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds of error on a damaged header
        raise GGUFError(f"{path!r} is truncated or corrupt ({type(e).__name__}: {e}); "
                        "download or copy it again") from None
    if end > size:
        raise GGUFError(
            f"{path!r} is truncated: its tensors need {end} bytes but the file has {size}; download or copy it again"
        )
    return reader


def gemma3_config_from_gguf(reader: Any, vocab_size: int) -> Gemma3Config:
    """A :class:`Gemma3Config` from ``gemma3.*`` metadata (what the GGUF lacks uses Gemma 3's rules).

    The local RoPE base (10,000) and the every-6th-layer-global pattern are fixed by llama.cpp
    for Gemma 3. ``query_pre_attn_scalar`` follows llama.cpp too: ``attention.scale`` if present,
    else d_model / n_heads for the 62-layer 27B, else the head dimension.
    """
    def get(key: str, default: Any = None) -> Any:
        value = _field(reader, f"gemma3.{key}", default)
        if value is None:
            raise GGUFError(f"the GGUF metadata lacks gemma3.{key}")
        return value

    n_layers = int(get("block_count"))
    found = 1 + max((int(m.group(1)) for t in reader.tensors if (m := _BLOCK_RE.fullmatch(t.name))), default=-1)
    if n_layers != found:
        raise GGUFError(f"gemma3.block_count says {n_layers:,} layers but the file holds tensors for {found}")
    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    if n_heads <= 0 or d_model <= 0:
        raise GGUFError(f"gemma3.embedding_length ({d_model}) and gemma3.attention.head_count ({n_heads}) "
                        "must be positive")
    d_head = int(get("attention.key_length", d_model // n_heads))
    scale = _field(reader, "gemma3.attention.scale")
    if scale:
        scalar = _f32(scale) ** -2
    elif n_layers == 62:
        scalar = float(d_model // n_heads)
    else:
        scalar = float(d_head)
    factor = 1.0
    if _field(reader, "gemma3.rope.scaling.type", "none") == "linear":
        factor = _f32(get("rope.scaling.factor"))
    fields = dict(
        n_layers=n_layers,
        d_model=d_model,
        d_mlp=int(get("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        d_head=d_head,
        vocab_size=int(vocab_size),
        window=int(get("attention.sliding_window")),
        rope_local_base=10_000.0,
        rope_global_base=_f32(get("rope.freq_base", 1_000_000.0)),
        rope_global_factor=factor,
        query_pre_attn_scalar=scalar,
        eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_positions=int(get("context_length")),
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
    )
    try:
        return Gemma3Config(**fields)  # type: ignore[arg-type]
    except ConfigError as e:
        field = str(e).split(" ", 1)[0].split("=", 1)[0]
        key = _GGUF_KEYS.get(field)
        raise GGUFError(f"metadata {key}: {e}" if key else str(e)) from None


# our config field -> the GGUF metadata key it comes from (to name the key in errors)
_GGUF_KEYS = {
    "n_layers": "gemma3.block_count", "d_model": "gemma3.embedding_length", "d_mlp": "gemma3.feed_forward_length",
    "n_heads": "gemma3.attention.head_count", "n_kv_heads": "gemma3.attention.head_count_kv",
    "d_head": "gemma3.attention.key_length", "window": "gemma3.attention.sliding_window",
    "rope_global_base": "gemma3.rope.freq_base", "rope_global_factor": "gemma3.rope.scaling.factor",
    "eps": "gemma3.attention.layer_norm_rms_epsilon", "max_positions": "gemma3.context_length",
    "query_pre_attn_scalar": "gemma3.attention.scale",
}


# llama.cpp token types (gguf.TokenType) -> SentencePiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_model_from_gguf(reader: Any) -> bytes:
    """Rebuild Gemma 3's SentencePiece ``tokenizer.model`` from a GGUF's vocabulary.

    llama.cpp marks every added token CONTROL with score -1000 and writes the 30 whitespace-run
    pieces with plain spaces; this undoes both (CONTROL for pad/eos/bos, UNKNOWN for unk,
    USER_DEFINED for the rest, score 0). Pieces, scores and types are then Gemma 3's, so ids
    match the original tokenizer; the file is not byte-identical to Google's (sha256
    1299c11d...e79c, 8 bytes longer), whose trainer/normalizer option fields are unknown.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = _strings(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if not (len(tokens) == len(scores) == len(types)):
        raise GGUFError("the GGUF tokenizer arrays (tokens, scores, token_type) differ in length")
    ids = {name: int(_field(reader, f"tokenizer.ggml.{name}_token_id", default))
           for name, default in (("padding", 0), ("eos", 1), ("bos", 2), ("unknown", 3))}
    control = {ids["padding"], ids["eos"], ids["bos"]}

    proto = pb.ModelProto()  # type: ignore[attr-defined]
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        p = proto.pieces.add()
        if kind == _NORMAL:
            p.piece, p.score = piece, float(score)
            continue
        p.score = 0.0
        if kind == _BYTE:
            p.piece, p.type = piece, _BYTE
        elif i == ids["unknown"]:
            p.piece, p.type = piece, _UNKNOWN
        elif i in control:
            p.piece, p.type = piece, _CONTROL
        elif kind in (_CONTROL, _USER_DEFINED, _UNUSED):
            p.piece, p.type = piece.replace(" ", "\u2581"), _USER_DEFINED
        else:
            raise GGUFError(f"token {i} ({piece!r}) has unknown llama.cpp token type {kind}")
    t = proto.trainer_spec
    t.model_type = pb.TrainerSpec.BPE  # type: ignore[attr-defined]
    t.vocab_size = len(tokens)
    t.split_digits = True
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    for name, i in (("unk", ids["unknown"]), ("bos", ids["bos"]), ("eos", ids["eos"]), ("pad", ids["padding"])):
        setattr(t, f"{name}_piece", proto.pieces[i].piece)
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = False
    n.remove_extra_whitespaces = False
    return bytes(proto.SerializeToString())


def write_hf_dir(ckpt: GGUFCheckpoint, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors`` (HF names, tied embedding stored once), ``config.json`` and
    ``tokenizer.model`` into ``out_dir`` (created if needed); returns its path.

    >>> write_hf_dir(read_gguf("gemma-3-270m-q4_k_m.gguf"), "out")        # doctest: +SKIP
    PosixPath('out')
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in ckpt.tensors.items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = ckpt.config.to_hf()
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) == 1:
        hf["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer.model").write_bytes(ckpt.tokenizer_model)
    return out


# ---------------------------------------------------------------------- metadata helpers
def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as e:  # noqa: BLE001 - a damaged field fails in many ways; all mean the same
        raise GGUFError(f"the GGUF metadata value {key!r} is unreadable ({e})") from None


def _strings(reader: Any, key: str) -> list[str]:
    field = reader.fields.get(key)
    if field is None:
        raise GGUFError(f"the GGUF has no {key} (it carries no tokenizer)")
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    import numpy as np

    return float(str(np.float32(value)))

"""Small, deliberately broken checkpoints for ``test_hostile_files.py``, and a memory-capped loader.

Everything is generated: a Hugging Face directory (``config.json`` + ``model.safetensors``)
written from a tiny random model, a llama.cpp-style GGUF written with ``gguf.GGUFWriter``, and
helpers that damage them (edit ``config.json``, change one tensor, cut the file). Hostile files
that could exhaust memory or hang are loaded by :func:`load_capped` in a child process with an
address-space cap and a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hf_reference import hf_state_dict
from safetensors.torch import save_file

from interp.model import Gemma3, Gemma3Config

DELETE = object()  # a config_overrides value: drop the key from config.json

# ---------------------------------------------------------------------- Hugging Face directories


def hf_config_json(cfg: Gemma3Config, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cfg.to_hf()`` with ``overrides`` applied (a value of :data:`DELETE` removes the key)."""
    hf = cfg.to_hf()
    for key, value in (overrides or {}).items():
        if value is DELETE:
            hf.pop(key, None)
        else:
            hf[key] = value
    return hf


def write_hf_dir(folder: Path, model: Gemma3, config_overrides: dict[str, Any] | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """``folder`` with ``config.json`` (``model.cfg`` plus overrides) and ``model.safetensors``
    (``state``, default the model's weights under Hugging Face names)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model) if state is None else state
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config_json(model.cfg, config_overrides)), encoding="utf-8")
    return folder


# ---------------------------------------------------------------------- GGUF

GGUF_CFG = Gemma3Config(n_layers=2, d_model=32, d_mlp=64, n_heads=2, n_kv_heads=1, d_head=8,
                        vocab_size=300, window=4, max_positions=64, query_pre_attn_scalar=8.0)


def _tiny_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-shaped vocabulary of ``n`` pieces (specials, 256 bytes, a few letters)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "  ", "   "]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    types = [3] * 7 + [4, 4] + [6] * 256
    letters = ["\u2581", "a", "b", "c", "\u2581a", "ab"]
    tokens += letters + [f"x{i}" for i in range(n - len(tokens) - len(letters))]
    types += [1] * (n - len(types))
    scores = [-1000.0] * 9 + [0.0] * 256 + [-float(i) for i in range(n - 265)]
    return tokens, scores, types


def write_gguf(path: Path, cfg: Gemma3Config = GGUF_CFG, *, arch: str = "gemma3", scale: float = 0.05,
               q8_0: tuple[str, ...] = (), block_count: int | None = None, context_length: int | None = None,
               embedding_length: int | None = None, poison: dict[str, float] | None = None, seed: int = 0,
               expected: dict[str, np.ndarray] | None = None) -> Path:
    """A float32 GGUF laid out like llama.cpp's Gemma 3 output (norm weights with the +1 baked in).

    Weights are ``scale`` x standard normal; ``q8_0`` names tensors stored quantized (Q8_0: rows
    of 32). ``block_count``, ``context_length`` and ``embedding_length`` override the metadata only
    (the tensors still follow ``cfg``); ``poison`` maps a GGUF tensor name to a value written into
    its first element (NaN, inf). ``expected``, when given, receives the Hugging Face-named arrays a
    faithful reader must return (norms without the +1, quantized tensors dequantized).
    """
    import gguf

    from interp.model.gguf import hf_name

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers if block_count is None else block_count)
    w.add_embedding_length(cfg.d_model if embedding_length is None else embedding_length)
    w.add_feed_forward_length(cfg.d_mlp)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.d_head)
    w.add_value_length(cfg.d_head)
    w.add_sliding_window(cfg.window)
    w.add_rope_freq_base(cfg.rope_global_base)
    w.add_layer_norm_rms_eps(cfg.eps)
    w.add_context_length(cfg.max_positions if context_length is None else context_length)
    tokens, scores, types = _tiny_vocab(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    D, F, hd = cfg.d_model, cfg.d_mlp, cfg.d_head
    shapes = {"token_embd.weight": (cfg.vocab_size, D), "output_norm.weight": (D,)}
    for i in range(cfg.n_layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.attn_q.weight": (cfg.n_heads * hd, D),
            f"blk.{i}.attn_k.weight": (cfg.n_kv_heads * hd, D), f"blk.{i}.attn_v.weight": (cfg.n_kv_heads * hd, D),
            f"blk.{i}.attn_output.weight": (D, cfg.n_heads * hd), f"blk.{i}.attn_q_norm.weight": (hd,),
            f"blk.{i}.attn_k_norm.weight": (hd,), f"blk.{i}.post_attention_norm.weight": (D,),
            f"blk.{i}.ffn_norm.weight": (D,), f"blk.{i}.post_ffw_norm.weight": (D,),
            f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D), f"blk.{i}.ffn_down.weight": (D, F),
        }
    for name, shape in shapes.items():
        value = (rng.standard_normal(shape) * scale).astype(np.float32)
        written = value + np.float32(1.0) if name.endswith("norm.weight") else value  # llama.cpp bakes the +1 in
        if poison and name in poison:
            written = written.copy()
            written.reshape(-1)[0] = np.float32(poison[name])
        if name in q8_0:
            q = gguf.quants.quantize(written, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            value = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(shape)
        else:
            w.add_tensor(name, written)
        if expected is not None:
            expected[hf_name(name)] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------- damage


def cut(path: Path, keep: int) -> Path:
    """Truncate ``path`` in place to its first ``keep`` bytes (negative: drop that many)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def mapped_or_open(path: Path) -> list[str]:
    """This process's memory maps and open file descriptors that refer to ``path`` (Linux)."""
    target = str(Path(path).resolve())
    found = [line.strip() for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(target)]
    fd_dir = Path("/proc/self/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) == target:
                found.append(f"fd {fd.name}")
        except OSError:
            pass
    return found


# ---------------------------------------------------------------------- a memory-capped child process

# Enough for the interpreter, torch and a tiny model (torch's import maps ~0.65 GiB); far below
# what a model of 10**5 or 10**9 layers, or any real-sized allocation driven by a hostile file, needs.
MEMORY_CAP = 2 << 30
TIMEOUT_S = 60

_LOADER = textwrap.dedent("""
    import resource, sys
    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    torch.set_num_threads(1)
    from interp.model import Gemma3
    m = Gemma3.from_pretrained(sys.argv[2])
    print("LOADED", m.cfg.n_layers, flush=True)
""")


@dataclass
class ChildResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def exception(self) -> tuple[str, str]:
        """``(qualified type, message)`` of the exception that ended the child: the last stderr
        line of the form ``module.SomeError: ...`` and everything after it (messages may span
        lines); ``("", "")`` when there is none."""
        lines = self.stderr.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): ?(.*)$", lines[i])
            if m:
                return m.group(1), "\n".join([m.group(2), *lines[i + 1:]])
        return "", ""


def load_capped(src: str | os.PathLike, cap: int = MEMORY_CAP, timeout: float = TIMEOUT_S) -> ChildResult:
    """``Gemma3.from_pretrained(src)`` in a fresh interpreter whose address space is capped at
    ``cap`` bytes and which is killed after ``timeout`` seconds (``subprocess.TimeoutExpired``)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(cap), os.fspath(src)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return ChildResult(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


@contextlib.contextmanager
def address_space_headroom(extra: int = 1 << 30) -> Iterator[None]:
    """Lower this process's soft RLIMIT_AS to what it maps now plus ``extra`` bytes, then restore
    it: a check that wrongly allocates per layer (or per position) for a hostile size raises
    MemoryError inside the test instead of exhausting the machine. Linux only."""
    import resource

    size = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            size = int(line.split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

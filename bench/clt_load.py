"""Loading a Gemma Scope 2 cross-layer transcoder: eager against lazy (part 6 of bench.features).

Writes a CLT of the released Gemma 3 270M size in the published ``clt/`` layout (18 layers,
d_model 640, 262,080 features = 14,560 per layer, float32 ``params_layer_{i}.safetensors`` with
``w_dec [14560, 18, 640]``: about 12.6 GB on disk; random weights), then, each in a fresh
subprocess so that peaks do not mix, measures

- **load**: ``CrossLayerTranscoder.load(folder, lazy=..., dtype=...)`` wall time, and
- **first use**: encoding 8 tokens at every layer and decoding every MLP output from them,
- **peak RSS** of the process (``VmHWM``: it counts the file pages a memory map touched, which
  the kernel can drop) and the memory it **owns** (``RssAnon``) before loading and after both.

The files were just written, so they sit in the page cache (a warm read; a cold read from disk
is slower for the eager load, and for lazy first use). ``--clt-layers``/``--clt-width`` shrink it
for a smoke run.

Run alone: ``python -m bench.clt_load`` (``--clt-layers 4 --clt-width 2048`` to smoke).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

D_MODEL_270M, LAYERS_270M, WIDTH_270M = 640, 18, 262080


def write_folder(folder: Path, n_layers: int, d_model: int, width: int, seed: int = 0) -> float:
    """The published layout with random weights; returns the GB written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    w = width // n_layers
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for i in range(n_layers):
        t = {"w_enc": torch.randn(d_model, w, generator=gen), "b_enc": torch.zeros(w),
             "threshold": torch.full((w,), 0.5), "w_dec": torch.rand(w, n_layers, d_model, generator=gen) - 0.5,
             "b_dec": torch.zeros(d_model)}
        save_file(t, str(folder / f"params_layer_{i}.safetensors"))
        total += sum(v.numel() * 4 for v in t.values())
        del t
    config = {"hf_hook_point_in": "model.layers.{all}.pre_feedforward_layernorm.output",
              "hf_hook_point_out": "model.layers.{all}.post_feedforward_layernorm.output", "width": w * n_layers,
              "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 150,
              "affine_connection": False, "type": "clt"}
    (folder / "config.json").write_text(json.dumps(config))
    return total / 1e9


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field in GB (VmHWM: peak RSS of this process image, reset by
    exec unlike ``ru_maxrss``; RssAnon: memory the process owns, not file pages it maps)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e6
    raise KeyError(field)


def measure(folder: str, lazy: bool, dtype: str) -> dict:
    """In this process: load, first use, peak RSS and owned memory (GB)."""
    from interp.features import CrossLayerTranscoder

    torch.set_num_threads(1)
    before = _status("RssAnon")
    t0 = time.perf_counter()
    clt = CrossLayerTranscoder.load(folder, lazy=lazy, dtype=getattr(torch, dtype))
    loaded = time.perf_counter() - t0
    xs = [torch.randn(8, clt.d_model) for _ in range(clt.n_layers)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        clt(xs)
    used = time.perf_counter() - t0
    return {"load_s": loaded, "use_s": used, "peak_gb": _status("VmHWM"), "anon_gb": _status("RssAnon"),
            "before_gb": before}


def clt_load_table(layers: int = LAYERS_270M, width: int = WIDTH_270M, d_model: int = D_MODEL_270M,
                   workdir: str | None = None, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> str:
    root = Path(tempfile.mkdtemp(prefix="bench-clt-", dir=workdir))
    try:
        t0 = time.perf_counter()
        gb = write_folder(root / "clt", layers, d_model, width)
        lines = [f"CLT: {layers} layers, d_model {d_model}, {width // layers * layers:,} features, {gb:.2f} GB of "
                 f"float32 files (written in {time.perf_counter() - t0:.0f} s; warm page cache).", "",
                 "| mode | dtype | load (s) | first use: 8 tokens, all layers (s) | peak RSS (GB) | owned after "
                 "(GB) | owned before load (GB) |", "|---|---|---:|---:|---:|---:|---:|"]
        for dtype in dtypes:
            for lazy in (True, False):
                out = subprocess.run([sys.executable, "-m", "bench.clt_load", "--measure", str(root / "clt"),
                                      "--lazy", str(int(lazy)), "--dtype", dtype], capture_output=True, text=True,
                                     cwd=Path(__file__).resolve().parent.parent, check=False)
                if out.returncode != 0:
                    lines.append(f"| {'lazy' if lazy else 'eager'} | {dtype} | failed: "
                                 f"{out.stderr.strip().splitlines()[-1:]} | | | |")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                lines.append(f"| {'lazy' if lazy else 'eager'} | {dtype} | {r['load_s']:.3f} | {r['use_s']:.3f} | "
                             f"{r['peak_gb']:.2f} | {r['anon_gb']:.2f} | {r['before_gb']:.2f} |")
        return "\n".join(lines)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clt-layers", type=int, default=LAYERS_270M)
    parser.add_argument("--clt-width", type=int, default=WIDTH_270M, help="features over all layers")
    parser.add_argument("--clt-d-model", type=int, default=D_MODEL_270M)
    parser.add_argument("--clt-dtypes", default="float32,bfloat16")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lazy", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, bool(args.lazy), args.dtype)))
        return
    print(clt_load_table(args.clt_layers, args.clt_width, args.clt_d_model, args.workdir,
                         tuple(args.clt_dtypes.split(","))))


if __name__ == "__main__":
    main()

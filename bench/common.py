"""Shared helpers of the benchmarks: timing, memory, reference models, markdown tables.

Timing: every contender is warmed up, then run in interleaved rounds (each round runs every
contender once, in an order rotated by one each round, so drift and order effects hit all of
them alike). A time is the median over rounds; a ratio ``a / b`` is the median over rounds of
the per-round ratio (paired, so a slow round slows both).

Memory, CPU: Linux keeps a high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
RSS. ``PeakMemory`` collects garbage, returns freed heap to the OS (``malloc_trim``), resets the
mark, runs the code, and reports ``VmHWM - RSS before``: the exact peak extra resident memory.
Where ``clear_refs`` is not writable it falls back to sampling RSS with psutil every 1 ms (may
miss a short peak; the output says which method was used). Memory, CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Loading memory is measured in a fresh subprocess each (``run_child``), as that process's own
``VmHWM``. Not ``ru_maxrss``: Linux carries it over fork + exec, so a child of a big benchmark
process would report the parent's peak.

The reference models share our weight tensors (no copy): ``hf_model_sharing`` builds a
``transformers.Gemma3ForCausalLM`` without initialising its weights and points every parameter
at the corresponding tensor of our ``Gemma3``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- arguments
def parse_ints(text: str) -> list[int]:
    """``"64,256"`` -> ``[64, 256]``."""
    return [int(t) for t in text.split(",") if t.strip()]


def add_common_args(parser) -> None:
    """The options every benchmark takes."""
    parser.add_argument("--layers", type=int, default=None,
                        help="override n_layers of the 1B configuration (smoke runs); default: 26, the real 1B")
    parser.add_argument("--seqs", type=parse_ints, default=[64, 256], help="sequence lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each contender first")
    parser.add_argument("--seed", type=int, default=0)


def bench_config(layers: int | None):
    """The real Gemma 3 1B configuration, optionally with fewer layers (same widths, same vocab)."""
    from interp.model import Gemma3Config

    cfg = Gemma3Config.preset("1b")
    return cfg if layers is None else cfg.replace(n_layers=layers)


# ---------------------------------------------------------------------- timing
def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(contenders: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each contender, ``repeats`` samples each, taken in rotated rounds.

    Results of a call are dropped before the next call starts.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            out = contenders[name]()
            synchronize(device)
            del out
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()
            synchronize(device)
            t0 = time.perf_counter()
            out = contenders[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - t0)
            del out
    return samples


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]`` (samples from the same round)."""
    return statistics.median(x / y for x, y in zip(a, b))


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median of the samples: how noisy the machine was."""
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0


# ---------------------------------------------------------------------- memory
def proc_status(*keys: str) -> dict[str, int]:
    """The memory fields of ``/proc/self/status`` in bytes (VmRSS, VmHWM, RssAnon, RssFile, ...):
    those named in ``keys`` (reading stops once they are found; one missing is an error), or all."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if keys and key not in keys:
                continue
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
                if keys and len(out) == len(keys):
                    break
    missing = [k for k in keys if k not in out]
    if missing:
        raise RuntimeError(f"no {', '.join(missing)} in /proc/self/status")
    return out


def rss_bytes() -> int:
    return proc_status("VmRSS")["VmRSS"]


def hwm_bytes() -> int:
    return proc_status("VmHWM")["VmHWM"]


def reset_hwm() -> bool:
    """Reset the peak-RSS mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS before a measurement is honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.extra`` = peak bytes above the start.

    ``pm.method`` says how it was measured (see the module docstring).
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.extra = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.start = rss_bytes()
        if reset_hwm():
            self.method = "VmHWM reset via /proc/self/clear_refs"
        else:
            import psutil

            proc = psutil.Process()
            self._peak = self.start
            self.method = "psutil RSS sampled every 1 ms"

            def sample():
                while not self._stop.is_set():
                    self._peak = max(self._peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.start
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
            self.extra = self._peak - self.start
        else:
            self.extra = hwm_bytes() - self.start


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a tensor, mapping (e.g. an activation cache), list or tuple."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping) or hasattr(obj, "items"):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def nominal_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of ``numel * element_size`` (counts a tensor stored under two names twice)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what is really held in memory)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(s.device.type, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


# ---------------------------------------------------------------------- subprocesses
def run_child(args: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python <args>`` from the repository root; return the JSON dict on its last stdout line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"child {' '.join(args)} printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------- reference models
HF_ARCHITECTURE = "Gemma3ForCausalLM"


def hf_config(cfg, attn_implementation: str):
    """``transformers.Gemma3TextConfig`` equal to our ``Gemma3Config``."""
    import transformers

    kwargs = {k: v for k, v in cfg.to_hf().items() if k not in ("model_type", "architectures")}
    hc = transformers.Gemma3TextConfig(**kwargs)
    hc._attn_implementation = attn_implementation
    return hc


def hf_model_sharing(model, attn_implementation: str = "sdpa"):
    """A ``transformers.Gemma3ForCausalLM`` whose parameters *are* ``model``'s tensors (no copy).

    Built with weight initialisation switched off (its own parameters are never touched, so
    they cost no resident memory before being replaced); ``lm_head`` is the embedding, as in
    the checkpoints. Buffers (RoPE frequencies, embedding scale) are HF's own.
    """
    import transformers

    from interp.model.checkpoint import our_name

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layout
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        hf = transformers.Gemma3ForCausalLM(hf_config(model.cfg, attn_implementation))
    ours = dict(model.named_parameters())
    for name, _ in list(hf.named_parameters(remove_duplicate=False)):
        mine = "embed.weight" if name == "lm_head.weight" else our_name(name)
        if mine not in ours:
            raise KeyError(f"no parameter of ours for HF {name!r} (mapped to {mine!r})")
        module_path, _, leaf = name.rpartition(".")
        hf.get_submodule(module_path)._parameters[leaf] = torch.nn.Parameter(ours[mine], requires_grad=False)
    hf.to(model.device)  # buffers only: the parameters are already there
    return hf.eval().requires_grad_(False)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------- output
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def environment() -> str:
    """One paragraph on what the numbers were measured on."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return (f"python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {version('transformers')}, "
            f"transformer-lens {version('transformer-lens')}; CPU {cpu} x {os.cpu_count()}; "
            f"load average {load}")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def ratio(x: float) -> str:
    return f"{x:.3f}"

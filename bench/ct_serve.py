"""circuit-tracer's side of ``bench/circuits.py``: a server that runs INSIDE the circuit-tracer venv.

Like ``bench/ct_side.py`` (whose tokenizer helper it uses) it imports nothing from this
repository. It loads circuit-tracer's ``ReplacementModel`` (nnsight backend, CPU, float32) once,
from a local Hugging Face Gemma 3 folder and either per-layer transcoders (``--transcoders
config.yaml``, circuit-tracer's ``transcoder_set`` layout) or a cross-layer transcoder in Gemma
Scope 2's ``clt/`` layout (``--clt DIR``: ``params_layer_{i}.safetensors``, as our
``CrossLayerTranscoder.save`` writes it), then answers requests, one JSON object per stdin line::

    {"prompt": [2, ...], "logits": [ids], "batch": 64, "max_feature_nodes": 4096,
     "update_interval": 4, "out": "graph.safetensors" or null}

For each it runs ``circuit_tracer.attribute`` once and replies on stdout with one line
``@@CT {json}``: ``seconds`` (wall time of the call), ``peak_extra`` (bytes: the process's peak
resident set during the call above its resident set before it, after ``gc.collect`` and
``malloc_trim``, the high-water mark reset through ``/proc/self/clear_refs``, as
``bench.common.PeakMemory``), ``method``, ``active_features``, ``selected_features``. With
``out``, the graph is written there (safetensors, no pickle): ``adjacency``, ``active_features
[k, 3]``, ``selected_features``, ``logit_ids``. An empty line or ``quit`` ends it.

The CLT is read with ``load_gemma_scope_2_clt`` and told its hooks: ``mlp.hook_in`` (the output
of ``pre_feedforward_layernorm``, our ``blocks.L.pre_mlp_norm``) and ``hook_mlp_out`` (the
output of ``post_feedforward_layernorm``, our ``blocks.L.post_mlp_norm``); its defaults
(``hook_resid_mid`` -> ``hook_mlp_out``) would read the residual stream *before* the norm.
circuit-tracer 0.5.0's ``load_gemma_scope_2_clt(paths)`` reads layers ``range(max(paths))``, i.e.
one fewer than it is given when the keys are ``0..n-1`` (as its own config loader builds them), so
the last layer would be lost; we pass one extra key (a copy of the last path, never read) and
check that all ``n`` layers were loaded.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ct_side import ensure_tokenizer  # noqa: E402


def reply(obj: dict) -> None:
    sys.stdout.write("@@CT " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_start() -> tuple[int, str]:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    start = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return start, "VmHWM reset via /proc/self/clear_refs"
    except OSError:
        return start, "VmHWM not reset (clear_refs refused): peak since the process started"


def load(args: argparse.Namespace):
    import torch
    import yaml
    from circuit_tracer import ReplacementModel

    device = torch.device("cpu")
    if args.clt:
        from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt

        folder = Path(args.clt)
        files = sorted(folder.glob("params_layer_*.safetensors"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        paths = {i: str(p) for i, p in enumerate(files)}
        paths[len(files)] = paths[len(files) - 1]  # range(max(paths)) reads 0..n-1 (see the docstring)
        transcoders = load_gemma_scope_2_clt(paths, feature_input_hook="mlp.hook_in",
                                             feature_output_hook="hook_mlp_out", scan="interp-random-clt",
                                             device=device, dtype=torch.float32)
        if transcoders.n_layers != len(files):
            raise RuntimeError(f"load_gemma_scope_2_clt loaded {transcoders.n_layers} of {len(files)} layers")
    else:
        from circuit_tracer.utils.hf_utils import load_transcoders

        config = yaml.safe_load(Path(args.transcoders).read_text())
        transcoders = load_transcoders(config, device=device, dtype=torch.float32, lazy_encoder=False,
                                       lazy_decoder=False)
    model = ReplacementModel.from_pretrained_and_transcoders(args.model, transcoders, backend="nnsight",
                                                             device=device, dtype=torch.float32)
    return model, transcoders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint folder (Gemma3ForCausalLM)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--transcoders", help="circuit-tracer transcoder_set config.yaml (local paths)")
    g.add_argument("--clt", help="Gemma Scope 2 clt/ folder (params_layer_{i}.safetensors)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    ensure_tokenizer(Path(args.model), int(cfg["vocab_size"]))

    import circuit_tracer
    import nnsight
    import transformers
    from circuit_tracer import attribute
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    model, transcoders = load(args)
    reply({"ready": True, "load_s": time.perf_counter() - t0, "circuit_tracer": circuit_tracer.__version__,
           "nnsight": nnsight.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "zero_positions": str(model.zero_positions),
           "feature_input_hook": transcoders.feature_input_hook,
           "feature_output_hook": transcoders.feature_output_hook, "rss": status("VmRSS")})
    for line in sys.stdin:
        line = line.strip()
        if not line or line == "quit":
            break
        req = json.loads(line)
        ids = torch.tensor(req["prompt"])
        logit_ids = torch.tensor(req["logits"])
        start, method = peak_start()
        t0 = time.perf_counter()
        graph = attribute(ids, model, attribution_targets=logit_ids, batch_size=req["batch"],
                          max_feature_nodes=req.get("max_feature_nodes"),
                          update_interval=req.get("update_interval", 4), verbose=False)
        seconds = time.perf_counter() - t0
        peak = status("VmHWM") - start
        out = {"seconds": seconds, "peak_extra": peak, "method": method,
               "active_features": int(graph.active_features.shape[0]),
               "selected_features": int(graph.selected_features.shape[0])}
        if req.get("out"):
            save_file({"adjacency": graph.adjacency_matrix.float().contiguous(),
                       "active_features": graph.active_features.long().contiguous(),
                       "selected_features": graph.selected_features.long().contiguous(),
                       "logit_ids": torch.tensor([t.vocab_idx for t in graph.logit_targets]).long()},
                      req["out"])
        del graph
        reply(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

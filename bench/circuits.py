"""Attribution graphs on the demo model (the real Gemma 3 270M: 18 layers, d_model 640, fp32, CPU):
``interp.attribution_graph`` against circuit-tracer's ``attribute`` (0.5.0, nnsight backend), side
by side on the same prompts, dictionaries, logit tokens and budgets.

Dictionaries (random weights, Gemma Scope 2 shapes; thresholds calibrated on the longest prompt):

- ``plt``: 18 per-layer JumpReLU transcoders of ``--d-sae`` features (default 16,384, Gemma Scope
  2's width) reading ``blocks.L.pre_mlp_norm`` and writing ``blocks.L.post_mlp_norm``
  (circuit-tracer: ``mlp.hook_in`` -> ``hook_mlp_out``, written in its ``transcoder_set`` layout);
- ``clt``: one cross-layer transcoder, ``--width`` features per layer (default 4,096), same sites,
  written with our ``CrossLayerTranscoder.save`` (Gemma Scope 2's ``clt/`` layout) and read by
  circuit-tracer's ``load_gemma_scope_2_clt`` with ``mlp.hook_in`` / ``hook_mlp_out`` (see
  ``bench/ct_serve.py``). Not 16,384: at that width one eager float32 CLT is about 7 GB (ours
  keeps the used half of the decoder; circuit-tracer's Gemma Scope 2 loader keeps the whole
  ``[w, 18, 18, 640]`` stack, about 13.6 GB, and needs twice that while loading), and both
  processes hold one on a 24 GB machine. A graph's cost depends on the active features (fixed
  by the L0, not the width), apart from reading their encoder and decoder rows.

Every layer's threshold is one number, set so that ``--l0`` features (default 50) fire per token
and layer on the longest prompt (position 0 left out: both libraries drop BOS features).

Prompts: the first 16, 32, 64 tokens (BOS first) of the standard library's docstrings. Logit
tokens: the model's most likely next tokens until 95% probability, at most 10, chosen once and
given to both. Both get the same ``--max-feature-nodes`` (default 4,096), ``--batch-size``
(default 64) and ``update_interval`` 4; ours runs with ``bos_features=False`` (circuit-tracer
zeroes position 0).

Measurement: circuit-tracer runs in a subprocess of its own venv (``/work/ctvenv``, see
``bench/circuit_tracer_check.py`` for how to build it) that loads its model and dictionaries once
and answers requests (``bench/ct_serve.py``). Each library gets one untimed warm-up call on the
shortest prompt (with a budget of one batch of feature rows: it pays the one-time setup), then
one timed call per prompt, the two libraries alternating (the first to run changes with each
prompt), each with the same torch thread count; the other process waits meanwhile.
``seconds``: wall time of the one call. ``peak extra``: resident memory peak during the
call above the resident set before it (``bench.common.PeakMemory`` for ours; the same method
inside circuit-tracer's process); it includes the returned graph. ``estimate``: our
``estimate_bytes`` for the call. ``check``: our ``Graph`` exactness, the largest ``|edges +
constant - value|`` relative to the node's scale.

Agreement (circuit-tracer's graph written to a file and read back): ``shared selected``: of the
features circuit-tracer gave rows, how many ours gave rows too (the rankings differ a little by
design: circuit-tracer's logit rows are demeaned, ``logit_t - mean_v logit_v``, ours are raw
logits, and its embedding edges are ``1/sqrt(d_model)`` of ours, see
``bench/circuit_tracer_check.py``; both rank by partial influence through those rows). ``max row
diff``: over the features both selected, the largest difference between their rows, relative to
the largest edge in those rows, on the columns both graphs have in common: the features both
selected and the token embeddings (ours divided by ``sqrt(d_model)``); and ``logit diff rows``:
the same for the differences of logit rows ``row_t - row_t0`` (the demeaning cancels). Not
comparable: the error columns (ours fold the features left out of the budget into their error
nodes so the graph stays exact; circuit-tracer drops their edges), position 0's error node
(circuit-tracer zeroes it), single logit rows (demeaned in theirs), and features only one of the
two selected.

Run (full: not measured on the 2-core CI machine, where it would take hours; circuit-tracer's CLT
calls alone took 106 s and 184 s at a budget of 256 nodes and 16 and 32 tokens, and the full run
has 16 times the budget; what was measured there is in ``bench/README.md``)::

    python -m bench.circuits

Smoke run (about 4 minutes on that machine; add ``--dicts plt,clt --width 2048`` for the CLT too,
about 9 minutes)::

    python -m bench.circuits --dicts plt --lengths 16 --max-feature-nodes 256 --d-sae 2048

Without circuit-tracer's venv the script prints ``circuit-tracer not available: <reason>`` and our
rows only, and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import interp
from bench.common import PeakMemory, environment, markdown_table, mib, parse_ints
from interp.circuits import estimate_bytes
from interp.data import stdlib_corpus

CT_PYTHON = "/work/ctvenv/bin/python"
HERE = Path(__file__).resolve().parent


def prompt_ids(model: interp.Gemma3, length: int) -> torch.Tensor:
    """The first ``length`` tokens (BOS first) of the standard library's docstrings."""
    ids: list[int] = []
    for doc in stdlib_corpus().documents():
        ids += model.tokenizer.encode(doc, bos=not ids)
        if len(ids) >= length:
            return torch.tensor(ids[:length])
    raise ValueError(f"the corpus has fewer than {length} tokens")


# ---------------------------------------------------------------------------------------- dictionaries
def mlp_inputs(model: interp.Gemma3, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's ``pre_mlp_norm`` on the prompt, positions 1.. (BOS left out), float32."""
    names = [f"blocks.{i}.pre_mlp_norm" for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[None], names=names)
    return [cache[n][0, 1:].float() for n in names]


def calibrated_threshold(pre: torch.Tensor, l0: int) -> float:
    """One threshold for a layer: ``l0`` features per token fire on ``pre [tokens, width]``."""
    k = l0 * pre.shape[0]
    top = pre.flatten().topk(k + 1).values
    thr = float(top[k - 1] + top[k]) / 2
    if thr <= 0:
        raise ValueError("calibrated threshold <= 0: lower --l0 (circuit-tracer's JumpReLU has no ReLU)")
    return thr


def per_layer_transcoders(model: interp.Gemma3, xs: list[torch.Tensor], d_sae: int, l0: int, seed: int) -> list:
    from interp.features import Transcoder

    d = model.cfg.d_model
    out = []
    for layer, x in enumerate(xs):
        gen = torch.Generator().manual_seed(seed * 1000 + layer)
        w_enc = torch.randn(d, d_sae, generator=gen) / math.sqrt(d)
        w_dec = torch.randn(d_sae, d, generator=gen) / math.sqrt(d)
        b_dec = 0.01 * torch.randn(d, generator=gen)
        thr = calibrated_threshold(x @ w_enc, l0)
        out.append(Transcoder(w_enc, w_dec, torch.zeros(d_sae), b_dec, threshold=torch.full((d_sae,), thr),
                              site=f"blocks.{layer}.pre_mlp_norm", site_out=f"blocks.{layer}.post_mlp_norm"))
    return out


def cross_layer_transcoder(model: interp.Gemma3, xs: list[torch.Tensor], width: int, l0: int, seed: int):
    from interp.features import CrossLayerTranscoder

    n, d = model.cfg.n_layers, model.cfg.d_model
    enc, dec, thr = [], [], []
    for layer, x in enumerate(xs):
        gen = torch.Generator().manual_seed(seed * 1000 + 500 + layer)
        w_enc = torch.randn(d, width, generator=gen) / math.sqrt(d)
        enc.append(w_enc)
        dec.append(torch.randn(width, n - layer, d, generator=gen) / math.sqrt(d * (n - layer)))
        thr.append(torch.full((width,), calibrated_threshold(x @ w_enc, l0)))
    gen = torch.Generator().manual_seed(seed * 1000 + 999)
    b_dec = [0.01 * torch.randn(d, generator=gen) for _ in range(n)]
    return CrossLayerTranscoder(enc, dec, [torch.zeros(width) for _ in range(n)], b_dec, thr)


# ---------------------------------------------------------------------------------------- circuit-tracer
class Unavailable(RuntimeError):
    """circuit-tracer cannot run here; the message says why."""


class CircuitTracer:
    """The ``bench/ct_serve.py`` subprocess: one model and one set of dictionaries, many calls."""

    def __init__(self, python: str, model_dir: Path, dict_args: list[str], threads: int):
        if not Path(python).exists():
            raise Unavailable(f"{python} not found (build the venv: see bench/circuit_tracer_check.py)")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
                   TQDM_DISABLE="1")
        env.pop("PYTHONPATH", None)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, str(HERE / "ct_serve.py"), "--model", str(model_dir), *dict_args,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)
        self.meta = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@CT "):
                return json.loads(line[5:])
        self.proc.wait(timeout=10)
        self.stderr.seek(0)
        tail = self.stderr.read()[-3000:]
        raise Unavailable(f"its process ended ({self.proc.returncode}) without an answer:\n{tail}")

    def attribute(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


# ---------------------------------------------------------------------------------------- comparison
def node_keys(g: Any) -> dict[tuple, int]:
    return {(nd.kind, nd.layer if nd.kind in ("feature", "error") else None, nd.pos if nd.kind != "logit" else None,
             nd.index if nd.kind in ("feature", "logit") else None): i for i, nd in enumerate(g.nodes)}


def compare(g: Any, ct: dict[str, torch.Tensor], n_layers: int, seq: int, d_model: int) -> dict[str, Any]:
    """Shared selected features and the largest differences between comparable rows."""
    adj_ct = ct["adjacency"].double()
    selected = ct["active_features"][ct["selected_features"]].tolist()
    logit_ct = ct["logit_ids"].tolist()
    ct_keys = [("feature", la, p, f) for la, p, f in selected]
    ct_keys += [("error", la, p, None) for la in range(n_layers) for p in range(seq)]
    ct_keys += [("embedding", None, p, None) for p in range(seq)]
    ct_keys += [("logit", None, None, t) for t in logit_ct]
    assert len(ct_keys) == adj_ct.shape[0], (len(ct_keys), adj_ct.shape)
    ours = node_keys(g)
    ct_at = {k: i for i, k in enumerate(ct_keys)}
    shared = [k for k in ct_keys if k[0] == "feature" and k in ours]
    emb = [k for k in ct_keys if k[0] == "embedding"]
    logits = [k for k in ct_keys if k[0] == "logit" and k in ours]
    cols_o = torch.tensor([ours[k] for k in shared + emb])
    cols_t = torch.tensor([ct_at[k] for k in shared + emb])
    scale = torch.ones(len(cols_o), dtype=torch.float64)
    scale[len(shared):] = 1 / math.sqrt(d_model)
    adj_o = g.adjacency.double()

    def rel(rows_o: torch.Tensor, rows_t: torch.Tensor) -> float:
        if not rows_o.numel():
            return float("nan")
        return float((rows_o - rows_t).abs().max() / rows_t.abs().max().clamp_min(1e-30))

    f_o = adj_o[torch.tensor([ours[k] for k in shared], dtype=torch.long)][:, cols_o] * scale
    f_t = adj_ct[torch.tensor([ct_at[k] for k in shared], dtype=torch.long)][:, cols_t]
    lo = adj_o[torch.tensor([ours[k] for k in logits], dtype=torch.long)][:, cols_o] * scale
    lt = adj_ct[torch.tensor([ct_at[k] for k in logits], dtype=torch.long)][:, cols_t]
    return {"selected_ct": len(selected), "shared": len(shared), "feature_rows": rel(f_o, f_t),
            "logit_diff_rows": rel(lo[1:] - lo[:1], lt[1:] - lt[:1]) if len(logits) > 1 else float("nan"),
            "logits_match": len(logits) == len(logit_ct)}


# ---------------------------------------------------------------------------------------- ours
def our_estimate(model: interp.Gemma3, dicts_obj: Any, ids: torch.Tensor, max_nodes: int, n_logits: int,
                 batch: int) -> tuple[int, int]:
    """``(active features, estimated bytes)`` for this prompt, as ``attribution_graph`` sizes it."""
    from interp.circuits.dictionaries import GraphDictionaries
    from interp.circuits.replacement import run_prompt
    from interp.circuits.rows import writer_slots

    dicts = GraphDictionaries(model, dicts_obj)
    run = run_prompt(model, ids, dicts, len(ids) - 1, bos_features=False)
    feats = torch.cat([torch.cat((torch.full((len(nz), 1), layer), nz), 1)
                       for layer, a in run.acts.items() for nz in [a.nonzero().cpu()]])
    est = estimate_bytes(model, len(ids), len(feats), max_nodes, n_logits, batch, writer_slots(dicts, feats, len(ids)))
    return len(feats), sum(est.values())


def exactness(g: Any) -> float:
    return float((g.residual().abs() / g.scale().clamp_min(1e-30)).max())


def logit_tokens(model: interp.Gemma3, ids: torch.Tensor, max_n: int = 10, prob: float = 0.95) -> list[int]:
    with torch.no_grad():
        p = torch.softmax(model(ids[None])[0, -1].float(), -1)
    ps, idx = p.sort(descending=True)
    n = int((ps.cumsum(0) < prob).sum()) + 1
    return idx[:min(n, max_n)].tolist()


# ---------------------------------------------------------------------------------------- main
def run_kind(kind: str, model: interp.Gemma3, dicts_obj: Any, ct: CircuitTracer | None,
             prompts: dict[int, torch.Tensor], args: argparse.Namespace, work: Path, label: str
             ) -> tuple[list[list[str]], list[list[str]]]:
    rows, ratios = [], []
    opts = {"max_feature_nodes": args.max_feature_nodes, "batch_size": args.batch_size, "update_interval": 4}
    lengths = sorted(prompts)
    tokens = {n: logit_tokens(model, prompts[n]) for n in lengths}

    def ours(n: int, budget: int = args.max_feature_nodes) -> tuple[Any, float, int]:
        gc.collect()
        with PeakMemory() as pm:
            t0 = time.perf_counter()
            g = interp.attribution_graph(model, prompts[n], dicts_obj, logits=tokens[n], bos_features=False,
                                         progress=False, **{**opts, "max_feature_nodes": budget})
            seconds = time.perf_counter() - t0
        return g, seconds, pm.extra

    def theirs(n: int, out: Path | None, budget: int = args.max_feature_nodes) -> dict[str, Any]:
        assert ct is not None
        return ct.attribute(prompt=prompts[n].tolist(), logits=tokens[n], batch=args.batch_size,
                            max_feature_nodes=budget, update_interval=4,
                            out=str(out) if out else None)

    first = lengths[0]
    warm = min(args.batch_size, args.max_feature_nodes)  # one batch of feature rows: enough for one-time setup
    print(f"  [{kind}] warm-up on {first} tokens, {warm} feature nodes", file=sys.stderr, flush=True)
    ours(first, warm)
    if ct is not None:
        theirs(first, None, warm)
    for i, n in enumerate(lengths):
        out = work / f"ct_{kind}_{n}.safetensors"
        order = ["ours", "ct"] if i % 2 == 0 else ["ct", "ours"]
        res_ct = None
        for who in order:
            if who == "ours":
                g, sec, peak = ours(n)
                print(f"  [{kind}] {n} tokens: ours {sec:.1f} s, {mib(peak)} MiB", file=sys.stderr, flush=True)
            elif ct is not None:
                res_ct = theirs(n, out)
                print(f"  [{kind}] {n} tokens: circuit-tracer {res_ct['seconds']:.1f} s, "
                      f"{mib(res_ct['peak_extra'])} MiB", file=sys.stderr, flush=True)
        n_act, est = our_estimate(model, dicts_obj, prompts[n], args.max_feature_nodes, len(tokens[n]),
                                  args.batch_size)
        assert n_act == g.active_features, (n_act, g.active_features)
        cmp: dict[str, Any] = {}
        if res_ct is not None:
            from safetensors.torch import load_file

            cmp = compare(g, load_file(str(out)), model.cfg.n_layers, n, model.cfg.d_model)
            out.unlink()
        n_feat = int(g.mask("feature").sum())
        rows.append(["ours", label, str(n), f"{g.active_features:,}", f"{n_feat:,}", f"{sec:.1f}", mib(peak),
                     mib(est), f"{exactness(g):.1e}", "", ""])
        if res_ct is not None:
            rows.append(["circuit-tracer", label, str(n), f"{res_ct['active_features']:,}",
                         f"{res_ct['selected_features']:,}", f"{res_ct['seconds']:.1f}", mib(res_ct["peak_extra"]),
                         "", "", f"{cmp['shared']:,} / {cmp['selected_ct']:,} "
                         f"({cmp['shared'] / cmp['selected_ct']:.0%})",
                         f"{cmp['feature_rows']:.1e} / {cmp['logit_diff_rows']:.1e}"])
            ratios.append([label, str(n), f"{sec / res_ct['seconds']:.2f}",
                           f"{peak / max(res_ct['peak_extra'], 1):.2f}"])
        del g
    return rows, ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring (python -c 'import bench.circuits; "
                                            "help(bench.circuits)') for what each column means.")
    parser.add_argument("--lengths", type=parse_ints, default=[16, 32, 64], help="prompt lengths in tokens, BOS "
                        "included (default 16,32,64)")
    parser.add_argument("--dicts", default="plt,clt", help="which dictionaries: plt (per-layer transcoders), clt "
                        "(cross-layer transcoder), or both (default plt,clt)")
    parser.add_argument("--d-sae", type=int, default=16384, help="features per per-layer transcoder (default 16384)")
    parser.add_argument("--width", type=int, default=4096, help="CLT features per layer (default 4096; see the "
                        "docstring for why not 16384)")
    parser.add_argument("--l0", type=int, default=50, help="features firing per token and layer (default 50)")
    parser.add_argument("--max-feature-nodes", type=int, default=4096, help="feature-node budget of both (default "
                        "4096)")
    parser.add_argument("--batch-size", type=int, default=64, help="targets per backward pass, both (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both processes (default: "
                        "torch's default here)")
    parser.add_argument("--ct-python", default=CT_PYTHON, help=f"python of circuit-tracer's venv (default "
                        f"{CT_PYTHON})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="write the checkpoint, dictionaries and graphs here (default: "
                        "a temporary directory)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    kinds = [k.strip() for k in args.dicts.split(",") if k.strip()]
    if not kinds or any(k not in ("plt", "clt") for k in kinds):
        parser.error("--dicts takes plt, clt or plt,clt")

    model = interp.load("demo")
    prompts = {n: prompt_ids(model, n) for n in args.lengths}
    xs = mlp_inputs(model, prompts[max(args.lengths)])
    started = time.strftime("%Y-%m-%d %H:%M")
    print(environment())
    print(f"\nAttribution graphs, demo model (Gemma 3 270M, fp32, CPU), started {started}; budget "
          f"max_feature_nodes={args.max_feature_nodes}, batch_size={args.batch_size}, update_interval=4, {threads} "
          f"torch threads in both processes; thresholds for L0 {args.l0} per token and layer on the "
          f"{max(args.lengths)}-token prompt\n")
    rows: list[list[str]] = []
    ratios: list[list[str]] = []
    notes: list[str] = []
    ct_reason = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = work / "model"
        if Path(args.ct_python).exists():
            from bench.circuit_tracer_check import save_hf_checkpoint

            save_hf_checkpoint(model, model_dir)
        for kind in kinds:
            if kind == "plt":
                dicts_obj: Any = per_layer_transcoders(model, xs, args.d_sae, args.l0, args.seed)
                label = f"18 transcoders x {args.d_sae:,}"
            else:
                dicts_obj = cross_layer_transcoder(model, xs, args.width, args.l0, args.seed)
                label = f"CLT 18 x {args.width:,}"
            ct = None
            if ct_reason is None:
                try:
                    if not Path(args.ct_python).exists():
                        raise Unavailable(f"{args.ct_python} not found (build the venv: see "
                                          "bench/circuit_tracer_check.py)")
                    t0 = time.perf_counter()
                    if kind == "plt":
                        from bench.circuit_tracer_check import save_ct_transcoders

                        files = save_ct_transcoders(dicts_obj, work / "plt")
                        dict_args = ["--transcoders", str(files)]
                    else:
                        dict_args = ["--clt", str(dicts_obj.save(work / "clt"))]
                    written = time.perf_counter() - t0
                    gc.collect()
                    ct = CircuitTracer(args.ct_python, model_dir, dict_args, threads)
                    m = ct.meta
                    notes.append(f"{label}: files written in {written:.0f} s; circuit-tracer {m['circuit_tracer']} "
                                 f"(nnsight {m['nnsight']}, transformers {m['transformers']}, torch {m['torch']}, "
                                 f"{m['threads']} threads) loaded them in {m['load_s']:.0f} s, hooks "
                                 f"{m['feature_input_hook']} -> {m['feature_output_hook']}, zero_positions "
                                 f"{m['zero_positions']}")
                except Unavailable as e:
                    ct_reason = str(e)
                    print(f"circuit-tracer not available: {ct_reason}")
            try:
                r, q = run_kind(kind, model, dicts_obj, ct, prompts, args, work, label)
            finally:
                if ct is not None:
                    ct.close()
            rows += r
            ratios += q
            del dicts_obj
            gc.collect()
            for sub in ("plt", "clt"):
                if (work / sub).exists() and not args.keep:
                    for f in (work / sub).iterdir():
                        f.unlink()
    print(markdown_table(["library", "dictionaries", "tokens", "active features", "feature nodes", "seconds",
                          "peak extra (MiB)", "our estimate (MiB)", "check", "shared selected",
                          "max row diff: features / logit diffs"], rows))
    if ratios:
        print("\nOurs / circuit-tracer (one call each, same process state):\n")
        print(markdown_table(["dictionaries", "tokens", "time", "peak extra"], ratios))
    for line in notes:
        print(f"\n- {line}")
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    print(f"\nload average at the end: {load}; finished {time.strftime('%Y-%m-%d %H:%M')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cross-check of ``interp.attribution_graph`` against circuit-tracer (issue 13).

Builds a small random Gemma 3 with our library, writes it as a Hugging Face checkpoint folder,
makes random JumpReLU transcoders (one per layer, nonzero biases; optionally with skip
connections) and writes them in circuit-tracer's format (``layer_i.safetensors`` with ``W_enc
[d_sae, d_in]``, ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``activation_function.threshold``,
``W_skip [d_out, d_in]``, and a ``config.yaml`` with ``model_kind: transcoder_set``,
``feature_input_hook: mlp.hook_in``, ``feature_output_hook: hook_mlp_out``, local paths). Then it
runs circuit-tracer's ``attribute`` (nnsight backend, CPU) in a subprocess of the circuit-tracer
venv (``bench/ct_side.py``), builds our graph for the same token ids, transcoders and logit
tokens, aligns the nodes (features by (layer, pos, feature), errors by (layer, pos), tokens by
pos, logits by token id) and prints, per edge block, the largest absolute difference, the largest
difference relative to the block's largest edge, and the correlation, plus wall times.

What circuit-tracer 0.5.0 computes (read from its source; nnsight backend, Gemma3ForCausalLM):

- **Sites.** ``mlp.hook_in`` is ``model.layers[L].pre_feedforward_layernorm`` output (our
  ``blocks.L.pre_mlp_norm``); ``hook_mlp_out`` is ``post_feedforward_layernorm`` output (our
  ``blocks.L.post_mlp_norm``). (``ln2.hook_normalized`` would be the norm's ``x * rsqrt(...)``
  before the ``1 + weight`` gain, which has no site of ours.) A ``TranscoderSet`` must cover
  every layer 0..L-1.
- **Freezing.** Attention patterns (the dropout output inside eager attention) and the
  ``rsqrt`` of all seven RMSNorms per layer (incl. q/k norms) and the final norm are detached;
  each layer's MLP output is ``skip + (out - skip).detach()``: gradients pass only through the
  transcoder's skip term, as ours. Same local replacement model.
- **Node order.** ``[active features (layer, pos, feature) sorted] + [errors, layer-major:
  layer * n_pos + pos] + [token embeddings by pos] + [logits]``; row = target, column = source,
  as ours (ours: embeddings first, then features, errors, logits). Feature targets are
  ``W_enc . x`` (pre-activation without ``b_enc``), as ours.
- **BOS.** ``zero_positions = slice(0, 1)`` (``slice(0, 4)`` for ``-it`` Gemma 3 names): features
  at position 0 are zeroed (whatever token is there; a string prompt gets a BOS prepended, a
  tensor prompt starting with a special token is kept) AND the error vectors at position 0 are
  zeroed, so position 0's MLP outputs are frozen constants, no node. Ours with
  ``bos_features=False`` also drops features at a leading BOS, but keeps position 0's whole MLP
  output (minus ``b_dec``) as its error node. So ``<-error`` edges from position 0 differ by design
  (theirs are exactly 0); they are reported in their own row and left out of the ``<-error`` rows.
- **Logits.** Logit nodes are *demeaned*: the gradient seed at the final normed residual is
  ``W_U[t] - mean_v W_U[v]``, i.e. the node is ``logit_t - mean_v logit_v``. We compare against
  our logit rows minus the mean of our rows over every vocabulary token (a second graph of ours
  with ``logits=range(vocab)``), which is the same linear functional.
- **Embeddings.** circuit-tracer's token vectors are ``embed_tokens.weight[ids]``, the *unscaled*
  rows, while its gradient is taken at the output of ``Gemma3TextScaledWordEmbedding`` (rows
  times ``sqrt(d_model)``). Its ``<-embedding`` edges are therefore ``1 / sqrt(d_model)`` times the
  direct effect, and a target's edges no longer sum to its input (ours do: ``Graph.check()``).
  The table shows those blocks raw and with our edges divided by ``sqrt(d_model)``. (Their
  TransformerLens backend folds ``sqrt(d_model)`` into ``W_E`` at weight conversion, so it does
  not have this problem; the nnsight backend, the one that runs Gemma 3 from a local folder, does.)

Result (4 layers, d_model 64, d_sae 128, 8 tokens, 1312 active features, with and without skip
transcoders): the same 1312 features; every matched block agrees to about 5e-7 of its largest
edge (fp32 rounding), correlation 1.0000000: feature<-feature, feature<-error and logit<-error
(positions >= 1), logit (demeaned)<-feature, and <-embedding once ours are divided by
``sqrt(d_model)``. The only other differences are the by-design position-0 error columns.

Setup of the circuit-tracer venv (nothing from the hub: the model and the transcoders are local
files, the tokenizer is written by ``ct_side.py``)::

    python3 -m venv /work/ctvenv
    /work/ctvenv/bin/pip install torch==2.13.0                      # the local CPU build
    /work/ctvenv/bin/pip install circuit-tracer==0.5.0 nnsight==0.6.3 torch==2.13.0

``nnsight==0.6.3`` matters: circuit-tracer 0.5.0 asks for ``nnsight>=0.6.0``, which resolves to
0.8.1, where ``from nnsight.intervention.tracing.tracer import Barrier`` (in
``replacement_model_nnsight.py``) fails with ``ModuleNotFoundError: No module named
'nnsight.intervention.tracing'``.

Run from the repository root (the circuit-tracer venv is ``/work/ctvenv`` unless
``--ct-python`` says otherwise; without it the script prints ``circuit-tracer not available:
<reason>`` and exits 0)::

    python -m bench.circuit_tracer_check            # both: plain and skip transcoders
    python -m bench.circuit_tracer_check --no-skip-run --seq 6
"""

from __future__ import annotations

import argparse
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

CT_PYTHON = "/work/ctvenv/bin/python"
HERE = Path(__file__).resolve().parent
HF_PARTS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
            "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------------------------------- setup
def build(args: argparse.Namespace, skip: bool) -> tuple[Any, list[Any]]:
    """Our random model and one random JumpReLU transcoder per layer (nonzero biases)."""
    from interp.features import Transcoder
    from interp.model import Gemma3, Gemma3Config

    n = args.layers
    types = tuple("full_attention" if i == n - 1 else "sliding_attention" for i in range(n))
    cfg = Gemma3Config(n_layers=n, d_model=args.d_model, d_mlp=2 * args.d_model, n_heads=4, n_kv_heads=2,
                       d_head=16, vocab_size=args.vocab, window=args.window, layer_types=types)
    model = Gemma3.from_config(cfg, seed=args.seed)
    tcs = []
    for i in range(n):
        r = Transcoder.random(model, layer=i, d_sae=args.d_sae, seed=100 * args.seed + i, skip=skip)
        gen = torch.Generator().manual_seed(1000 + i)
        b_enc = -0.05 - 0.1 * torch.rand(args.d_sae, generator=gen)  # sparser, and exercises b_enc
        b_dec = 0.05 * torch.randn(args.d_model, generator=gen)
        w_skip = None if r.W_skip is None else r.W_skip * 10  # ~0.1 per entry: a visible skip path
        tcs.append(Transcoder(r.W_enc, r.W_dec, b_enc, b_dec, threshold=r.threshold, W_skip=w_skip,
                              site=r.site, site_out=r.site_out))
    return model, tcs


def save_hf_checkpoint(model: Any, folder: Path) -> None:
    """``config.json`` + ``model.safetensors`` under Hugging Face names (tied head, float32)."""
    from safetensors.torch import save_file

    from interp.model.checkpoint import our_name

    cfg = model.cfg
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{p}.weight" for i in range(cfg.n_layers) for p in HF_PARTS]
    ours = dict(model.named_parameters())
    tensors = {}
    for name in names:
        mapped = our_name(name)
        tensors[name] = ours[mapped].detach().float().contiguous().clone()
    missing = set(ours) - {our_name(n) for n in names}
    if missing:
        raise RuntimeError(f"parameters without a Hugging Face name: {sorted(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = dict(cfg.to_hf())
    hf["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(hf, indent=1))


def save_ct_transcoders(tcs: list[Any], folder: Path) -> Path:
    """circuit-tracer's transcoder-set layout; returns the config.yaml path (JSON is YAML)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, tc in enumerate(tcs):
        state = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec,
                 "activation_function.threshold": tc.threshold}
        if tc.W_skip is not None:
            state["W_skip"] = tc.W_skip.T  # theirs: x @ W_skip.T; ours: x @ W_skip
        path = folder / f"layer_{i}.safetensors"
        save_file({k: v.detach().float().contiguous().clone() for k, v in state.items()}, str(path))
        paths.append(str(path))
    config = {"model_kind": "transcoder_set", "scan": "interp-random-check", "feature_input_hook": "mlp.hook_in",
              "feature_output_hook": "hook_mlp_out", "transcoders": paths}
    out = folder / "config.yaml"
    out.write_text(json.dumps(config, indent=1))
    return out


# ---------------------------------------------------------------------------------------- circuit-tracer
class Unavailable(RuntimeError):
    """circuit-tracer cannot run here; the message says why."""


def run_circuit_tracer(python: str, model_dir: Path, config: Path, ids: list[int], logit_ids: list[int],
                       out: Path, batch: int, timeout: float) -> dict[str, Any]:
    if not Path(python).exists():
        raise Unavailable(f"no interpreter at {python} (make the venv: python3 -m venv /work/ctvenv; "
                          "/work/ctvenv/bin/pip install torch==2.13.0 circuit-tracer==0.5.0 nnsight==0.6.3)")
    probe = subprocess.run([python, "-c", "import circuit_tracer, nnsight; print(circuit_tracer.__version__)"],
                           capture_output=True, text=True, timeout=timeout)
    if probe.returncode:
        raise Unavailable(f"import circuit_tracer failed in {python}: {probe.stderr.strip().splitlines()[-1:]}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    cmd = [python, str(HERE / "ct_side.py"), "--model", str(model_dir), "--transcoders", str(config),
           "--prompt", ",".join(map(str, ids)), "--logits", ",".join(map(str, logit_ids)), "--out", str(out),
           "--batch", str(batch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if proc.returncode or not out.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise Unavailable(f"circuit-tracer's attribution failed (exit {proc.returncode}):\n{tail}")
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads((f.metadata() or {})["timing"])
    meta["process_s"] = wall
    return {"tensors": tensors, "meta": meta}


# ---------------------------------------------------------------------------------------- comparison
def block_stats(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[str, str, str, int]:
    if ours.numel() == 0:
        return "-", "-", "-", 0
    a, b = ours.double().flatten(), theirs.double().flatten()
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    if a.std() > 0 and b.std() > 0:
        corr = f"{float(torch.corrcoef(torch.stack([a, b]))[0, 1]):.7f}"
    else:
        corr = "n/a (constant)"
    return f"{diff:.3g}", f"{rel:.3g}", corr, a.numel()


def compare(ours: Any, ours_all: Any, ct: dict[str, torch.Tensor], n_layers: int, seq: int, d_model: int
            ) -> tuple[list[list[str]], dict[str, Any]]:
    """Rows of the table, and facts (node counts, mismatches)."""
    A_ct = ct["adjacency"].double()
    feats_ct = ct["active_features"].tolist()
    logit_ct = ct["logit_ids"].tolist()
    idx: dict[tuple[Any, ...], int] = {}
    for i, nd in enumerate(ours.nodes):
        idx[(nd.kind, nd.layer if nd.kind in ("feature", "error") else None,
             nd.pos if nd.kind != "logit" else None, nd.index if nd.kind in ("feature", "logit") else None)] = i
    # circuit-tracer's nodes in its order -> our node numbers
    ct_keys = [("feature", layer, pos, f) for layer, pos, f in feats_ct]
    ct_keys += [("error", layer, p, None) for layer in range(n_layers) for p in range(seq)]
    ct_keys += [("embedding", None, p, None) for p in range(seq)]
    ct_keys += [("logit", None, None, t) for t in logit_ct]
    assert len(ct_keys) == A_ct.shape[0], (len(ct_keys), A_ct.shape)
    ours_feats = {(nd.layer, nd.pos, nd.index) for nd in ours.nodes if nd.kind == "feature"}
    theirs_feats = {tuple(x) for x in feats_ct}
    facts = {"features_ours": len(ours_feats), "features_ct": len(theirs_feats),
             "only_ours": len(ours_feats - theirs_feats), "only_ct": len(theirs_feats - ours_feats)}
    common = [i for i, k in enumerate(ct_keys) if k in idx]
    ct_i = torch.tensor(common)
    our_i = torch.tensor([idx[ct_keys[i]] for i in common])
    A_ours = ours.adjacency.double()[our_i][:, our_i]
    A_ct = A_ct[ct_i][:, ct_i]
    kinds = [ct_keys[i][0] for i in common]
    pos = [ct_keys[i][2] for i in common]

    # demeaned logit rows of ours: row_t - mean over the whole vocabulary (from the all-vocab graph)
    all_logits = [i for i, nd in enumerate(ours_all.nodes) if nd.kind == "logit"]
    key_all = {(nd.kind, nd.layer, nd.pos, nd.index): i for i, nd in enumerate(ours_all.nodes)}
    src_all = torch.tensor([key_all[(ours.nodes[i].kind, ours.nodes[i].layer, ours.nodes[i].pos,
                                     ours.nodes[i].index)] for i in our_i.tolist()])
    mean_row = ours_all.adjacency.double()[all_logits].mean(0)[src_all]
    raw_logit_rows = A_ours.clone()
    is_logit = torch.tensor([k == "logit" for k in kinds])
    A_dm = A_ours.clone()
    A_dm[is_logit] -= mean_row

    def sel(kind: str, p0: bool | None = None) -> torch.Tensor:
        return torch.tensor([k == kind and (p0 is None or (q == 0) == p0) for k, q in zip(kinds, pos)])

    rows: list[list[str]] = []
    emb_scale = 1.0 / math.sqrt(d_model)
    for tgt in ("feature", "logit"):
        r = sel(tgt)
        mat = A_dm if tgt == "logit" else A_ours
        tname = "logit (demeaned)" if tgt == "logit" else "feature"
        blocks = [("feature", sel("feature"), 1.0, ""),
                  ("embedding", sel("embedding"), 1.0, "raw"),
                  ("embedding", sel("embedding"), emb_scale, "ours / sqrt(d_model)"),
                  ("error", sel("error", False), 1.0, "pos >= 1"),
                  ("error", sel("error", True), 1.0, "pos 0 (theirs zeroed)")]
        for src, c, factor, note in blocks:
            o, t = mat[r][:, c] * factor, A_ct[r][:, c]
            stats = block_stats(o, t)
            rows.append([f"{tname} <- {src}", note, str(stats[3]), *stats[:3]])
    # not apples to apples, for the record: raw logits vs their demeaned ones
    r = sel("logit")
    c = sel("feature")
    stats = block_stats(raw_logit_rows[r][:, c], A_ct[r][:, c])
    rows.append(["logit (raw, ours) <- feature", "ours not demeaned", str(stats[3]), *stats[:3]])
    facts["nodes_ours"] = len(ours.nodes)
    facts["nodes_ct"] = int(ct["adjacency"].shape[0])
    return rows, facts


def table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- main
def run_case(args: argparse.Namespace, skip: bool, work: Path) -> bool:
    import interp

    torch.manual_seed(args.seed)
    model, tcs = build(args, skip)
    gen = torch.Generator().manual_seed(args.seed)
    ids = [model.cfg.bos_token_id] + torch.randint(3, args.vocab, (args.seq - 1,), generator=gen).tolist()
    with torch.no_grad():
        real = model(torch.tensor([ids]))[0, -1].float()
    logit_ids = real.topk(args.logits).indices.tolist()
    case = work / ("skip" if skip else "plain")
    model_dir, tc_dir = case / "model", case / "transcoders"
    save_hf_checkpoint(model, model_dir)
    config = save_ct_transcoders(tcs, tc_dir)

    title = f"transcoders {'with' if skip else 'without'} skip connections"
    print(f"\n### {title}\n")
    print(f"model: {args.layers} layers (last one global), d_model {args.d_model}, vocab {args.vocab}, "
          f"window {args.window}; d_sae {args.d_sae}; prompt {ids} (BOS first); logit tokens {logit_ids}\n")
    try:
        ct = run_circuit_tracer(args.ct_python, model_dir, config, ids, logit_ids, case / "ct_graph.safetensors",
                                args.batch, args.timeout)
    except (Unavailable, subprocess.TimeoutExpired) as e:
        print(f"circuit-tracer not available: {e}")
        return False

    t0 = time.perf_counter()
    g = interp.attribution_graph(model, torch.tensor(ids), tcs, logits=logit_ids, bos_features=False,
                                 batch_size=args.batch, progress=False)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    interp.attribution_graph(model, torch.tensor(ids), tcs, logits=logit_ids, bos_features=False, batch_size=args.batch,
                             progress=False)
    t_ours2 = time.perf_counter() - t0
    g_all = interp.attribution_graph(model, torch.tensor(ids), tcs, logits=list(range(args.vocab)),
                                     bos_features=False, batch_size=args.batch, progress=False)
    residual = g.check()

    tens, meta = ct["tensors"], ct["meta"]
    logit_diff = float((tens["real_logits"] - real).abs().max())
    rows, facts = compare(g, g_all, tens, args.layers, args.seq, args.d_model)
    print(table(rows, ["edges (target <- source)", "note", "edges", "max abs diff", "max diff / max edge",
                       "correlation"]))
    print()
    print(f"- nodes: ours {facts['nodes_ours']}, circuit-tracer {facts['nodes_ct']}; active features: ours "
          f"{facts['features_ours']}, circuit-tracer {facts['features_ct']} (only ours {facts['only_ours']}, only "
          f"theirs {facts['only_ct']})")
    print(f"- the two models' last-position logits (HF checkpoint in circuit-tracer's transformers "
          f"{meta['transformers']} vs ours): max abs diff {logit_diff:.3g}")
    print(f"- our graph: edges + constants = values to relative {residual:.2g} (Graph.check); circuit-tracer: "
          f"zero_positions {meta['zero_positions']}, skip {meta['skip']}, hooks {meta['feature_input_hook']} -> "
          f"{meta['feature_output_hook']}")
    print(f"- wall time: ours {t_ours:.2f} s (again {t_ours2:.2f} s); circuit-tracer attribute "
          f"{meta['attribute_s']:.2f} s (again {meta['attribute_again_s']:.2f} s), its model + transcoder load "
          f"{meta['load_s']:.2f} s, its subprocess {meta['process_s']:.1f} s in all (circuit-tracer "
          f"{meta['circuit_tracer']}, nnsight {meta['nnsight']}, torch {meta['torch']}; first calls include "
          "one-time setup; times are noisy on a shared 2-core machine)")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct-python", default=CT_PYTHON, help="python of the venv with circuit-tracer")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=128)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--window", type=int, default=4, help="sliding window (shorter than the prompt: exercised)")
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--logits", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--no-skip-run", action="store_true", help="only the transcoders without skip connections")
    p.add_argument("--keep", default=None, help="write the checkpoints and graphs here (default: a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print("## interp.attribution_graph vs circuit-tracer (same random Gemma 3, same transcoders)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        for skip in (False,) if args.no_skip_run else (False, True):
            if not run_case(args, skip, work):
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())

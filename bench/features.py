"""Sparse dictionaries (issue 12): splicing SAEs and transcoders into the model, training them,
scanning a store for top activations, building a feature index, evaluating.

Measured in one run on the real Gemma 3 1B configuration with random weights (fp32, ``--device``),
with random dictionaries (``JumpReLUSAE.random``, ``TopKSAE.random``, ``Transcoder.random``):

1. **Splice overhead.** Batch 1, each ``--seqs`` length, interleaved rounds against our plain
   forward (``model(ids)``): a bare hand-written hook (``run_with_hooks(ids, {site: lambda x, s:
   sae(x)}``: the reconstruction alone, the floor for any library), and
   ``interp.features.run_with_dictionaries`` reading the features only, splicing the
   reconstruction, splicing with the error term kept, a transcoder spliced at the middle layer's
   MLP, and one SAE per layer spliced (``--all-d-sae`` features each). The single SAE is a
   JumpReLU SAE of ``--d-sae`` features at ``blocks.{n_layers // 2}.resid_post``. SAELens is
   measured only if it imports here (sae-lens 6 requires transformer-lens < 4; this project uses
   4.x, so normally it does not, and the output says so).
2. **Training throughput.** ``interp.features.train`` for ``jumprelu`` and ``topk`` (k = 32) at
   each ``--train-d-sae`` width on d_model-wide data: random normal rows (a tensor source) and the
   store of part 3 (``(store, site)``, read through ``store.batches``). ``--train-batch`` rows per
   step; time per step = (time of ``--train-steps`` steps - time of 1 step) / (steps - 1), so the
   setup (normalisation statistics, initialisation) is left out (medians of ``--train-repeats``
   pairs, after one untimed 1-step call); tokens/s = batch / time per step.
   Against a minimal hand-written PyTorch loop of the same math (same shapes, Adam, decoder rows
   renormalised; no dead-feature tracking, no logging, no AuxK) on the same tensor.
3. **Top activations and the feature index.** A store harvested by ``interp.harvest`` from
   ``interp.data.stdlib_corpus()`` at ``blocks.0.resid_post`` (``--store-tokens`` tokens, context
   128, bf16; layer 0 so that harvesting it is cheap: the scan's cost does not depend on the
   layer). ``interp.features.top_activations`` over every feature of a TopK SAE (k = 32) of each
   ``--scan-d-sae`` width, in one pass (tokens/s); against one pass per feature (the same call
   with ``features=[f]``, timed for 2 features and multiplied by ``--index-features``); and
   ``interp.features.feature_index`` for ``--index-features`` features (one scan, one HTML page
   each, the index).
4. **Evaluation.** ``interp.features.evaluate`` of a TopK SAE on the store: statistics only
   (``ce=False``) and with the cross-entropy of the spliced model on ``--eval-ce-tokens`` tokens.
5. **The demo transcoders' quality** (the ones notebooks 07 and 08 use; trained and cached on
   first use): L0, FVU, dead/dense features and CE loss recovered per layer of the demo model.
6. **Loading a cross-layer transcoder** (only with ``--clt``: it writes about 12.6 GB): a CLT of
   the released Gemma 3 270M size in Gemma Scope 2's layout, eager against lazy (memory-mapped),
   load time, first use and peak memory; see :mod:`bench.clt_load`.

Time: interleaved rounds where contenders are compared (part 1), else ``--repeats`` calls and
the median; everything under ``torch.inference_mode`` except training.

Full run:  ``python -m bench.features`` (26 layers; seqs 64,256; d_sae 16,384 and 4,096 per layer;
training 4,096 rows x 10 steps at d_sae 4,096 and 16,384; a 32,768-token store; about an hour on 2
CPU cores, mostly training).
Smoke run: ``python -m bench.features --layers 2 --seqs 16 --repeats 2 --d-sae 1024 --all-d-sae 256
--train-d-sae 256 --train-batch 256 --train-steps 6 --train-repeats 3 --scan-d-sae 512
--store-tokens 2048 --index-features 20 --eval-ce-tokens 128 --threads 1``.
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    bench_config,
    environment,
    markdown_table,
    max_abs_diff,
    median,
    ms,
    paired_ratio,
    parse_ints,
    ratio,
    spread,
    synchronize,
    time_interleaved,
)
from bench.harvest import bench_tokenizer, corpus_for, set_threads


def sae_lens_line() -> str | None:
    """None when SAELens imports; else the line that says why it is not measured."""
    try:
        import sae_lens  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import: say so
        return (f"SAELens: not importable here ({type(e).__name__}: {e}); sae-lens 6 requires transformer-lens < 4 "
                "and this project uses 4.x, so only ours is measured.")
    return None


def once(fn: Callable[[], Any], device: str) -> float:
    return seconds(fn, 1, device)[0]


def seconds(fn: Callable[[], Any], repeats: int, device: str) -> list[float]:
    out = []
    for _ in range(repeats):
        gc.collect()
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
        del result
    return out


# ---------------------------------------------------------------------- 1. splice overhead
def splice_table(args, model) -> str:
    from interp.features import JumpReLUSAE, Transcoder, run_with_dictionaries

    cfg = model.cfg
    mid = cfg.n_layers // 2
    site = f"blocks.{mid}.resid_post"
    sae = JumpReLUSAE.random(cfg.d_model, args.d_sae, site=site, seed=args.seed).to(args.device)
    tc = Transcoder.random(model, layer=mid, d_sae=args.d_sae, seed=args.seed).to(args.device)
    every = [JumpReLUSAE.random(cfg.d_model, args.all_d_sae, site=f"blocks.{i}.resid_post", seed=args.seed + i)
             .to(args.device) for i in range(cfg.n_layers)]
    bare = {site: lambda x, s: sae(x)}
    lines = [sae_lens_line() or "SAELens imports here, but this script has no SAELens contender yet: only ours."]
    calls = {
        "fwd": ("our forward, no hooks", lambda ids: model(ids)),
        "bare": (f"bare hook: run_with_hooks({{{site!r}: sae(x)}})", lambda ids: model.run_with_hooks(ids, bare)),
        "read": ("run_with_dictionaries: read features", lambda ids: run_with_dictionaries(model, ids, [sae])),
        "splice": ("run_with_dictionaries: splice", lambda ids: run_with_dictionaries(model, ids, [sae], splice=True)),
        "error": ("run_with_dictionaries: splice, keep_error", lambda ids: run_with_dictionaries(
            model, ids, [sae], splice=True, keep_error=True)),
        "tc": (f"run_with_dictionaries: transcoder at layer {mid}, splice", lambda ids: run_with_dictionaries(
            model, ids, [tc], splice=True)),
        "every": (f"run_with_dictionaries: {cfg.n_layers} SAEs ({args.all_d_sae:,} each), splice",
                  lambda ids: run_with_dictionaries(model, ids, every, splice=True)),
    }
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for seq in args.seqs:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(args.device)
        if seq == args.seqs[0]:
            a = calls["bare"][1](ids)
            b = calls["splice"][1](ids)[0]
            c = calls["error"][1](ids)[0]
            lines.append(f"Checks ({seq} tokens): bare hook vs splice, max |logit difference| "
                         f"{max_abs_diff(a, b):.2e}; splice with keep_error vs plain forward "
                         f"{max_abs_diff(c, model(ids)):.2e}.")
            del a, b, c
        samples = time_interleaved({k: (lambda fn=fn, ids=ids: fn(ids)) for k, (_, fn) in calls.items()},
                                   repeats=args.repeats, warmup=args.warmup, device=args.device)
        for key, (label, _) in calls.items():
            rows.append([seq, label, ms(median(samples[key])), ratio(paired_ratio(samples[key], samples["fwd"])),
                         ratio(paired_ratio(samples[key], samples["bare"])), f"{spread(samples[key]) * 100:.0f}%"])
    lines.append(
        f"### 1. Splicing dictionaries ({cfg.n_layers} layers, batch 1, fp32, {args.device}; JumpReLU SAE of "
        f"{args.d_sae:,} features at {site}; transcoder of {args.d_sae:,} at blocks.{mid}.pre_mlp_norm -> "
        f"post_mlp_norm)\n\n{args.repeats} interleaved rounds after {args.warmup} warm-up; median; ratios are "
        "medians of per-round ratios.\n\n"
        + markdown_table(["seq", "contender", "time (ms)", "/ our forward", "/ bare hook", "spread"], rows))
    return "\n\n".join(lines)


# ---------------------------------------------------------------------- 2. training
class _Jump(torch.autograd.Function):
    """relu(pre) * H(pre - t): gradient to pre where it fires, to t by a rectangle kernel."""

    @staticmethod
    def forward(ctx, pre, t, bw):
        ctx.save_for_backward(pre, t)
        ctx.bw = bw
        return pre * (pre > t)

    @staticmethod
    def backward(ctx, g):
        pre, t = ctx.saved_tensors
        near = ((pre - t).abs() < ctx.bw / 2).to(g.dtype)
        return g * (pre > t), (-(t / ctx.bw) * near * g).sum(0), None


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, t, bw):
        ctx.save_for_backward(pre, t)
        ctx.bw = bw
        return (pre > t).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, t = ctx.saved_tensors
        near = ((pre - t).abs() < ctx.bw / 2).to(g.dtype)
        return None, (-(1 / ctx.bw) * near * g).sum(0), None


def minimal_training(x: torch.Tensor, kind: str, d_sae: int, steps: int, batch: int, k: int = 32) -> None:
    """The same math as ``interp.features.train`` in a bare loop (no logging, no dead features)."""
    d = x.shape[1]
    gen = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d, generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    P = {"W_enc": w_dec.T.clone(), "W_dec": w_dec, "b_enc": torch.zeros(d_sae), "b_dec": x[:batch].mean(0)}
    if kind == "jumprelu":
        P["log_t"] = torch.full((d_sae,), math.log(1e-3))
    P = {n: p.to(x.device).requires_grad_(True) for n, p in P.items()}
    opt = torch.optim.Adam(P.values(), lr=2e-4, betas=(0.0, 0.999) if kind == "jumprelu" else (0.9, 0.999))
    perm = torch.randperm(x.shape[0], generator=gen)
    for t in range(steps):
        i = perm[(t * batch) % (x.shape[0] - batch + 1):][:batch].to(x.device)
        xb = x[i]
        if kind == "jumprelu":
            pre = xb @ P["W_enc"] + P["b_enc"]
            th = P["log_t"].exp()
            acts = _Jump.apply(pre, th, 1e-3)
            l0 = _Heaviside.apply(pre, th, 1e-3).sum(-1).mean()
        else:
            pre = (xb - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
            v, idx = pre.topk(k, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, idx, torch.relu(v))
            l0 = torch.zeros(())
        loss = (acts @ P["W_dec"] + P["b_dec"] - xb).pow(2).sum(-1).mean() + min(1.0, (t + 1) / 1000) * l0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W = P["W_dec"]
            W.grad -= (W.grad * W).sum(-1, keepdim=True) * W
            opt.step()
            W /= W.norm(dim=-1, keepdim=True)


def marginal(one_step: Callable[[], Any], all_steps: Callable[[], Any], args) -> tuple[float, float]:
    """(seconds per step without the setup, median seconds of the whole run): ``--train-repeats``
    interleaved pairs of a 1-step and a ``--train-steps`` run, after one untimed 1-step run."""
    once(one_step, args.device)  # warm-up
    ones, fulls = [], []
    for _ in range(args.train_repeats):
        ones.append(once(one_step, args.device))
        fulls.append(once(all_steps, args.device))
    return (median(fulls) - median(ones)) / (args.train_steps - 1), median(fulls)


def per_step_cells(per_step: float, batch: int) -> list[str]:
    if per_step <= 0:  # the steps took less than the noise of the setup
        return ["n/a (noise)", "n/a", ""]
    return [ms(per_step), f"{batch / per_step:,.0f}", ""]


def training_table(args, store, site: str) -> str:
    from interp.features import train

    d = store[site].shape[-1]
    gen = torch.Generator().manual_seed(args.seed)
    n = max(args.train_batch * 4, 8192)
    x = torch.randn(n, d, generator=gen).to(args.device)
    rows = []
    for d_sae in args.train_d_sae:
        for kind in ("jumprelu", "topk"):
            opts: dict[str, Any] = {"batch_size": args.train_batch, "init_rows": min(n, 65536), "progress": False,
                                    "device": args.device, "seed": args.seed}
            if kind == "topk":
                opts["k"] = min(32, d_sae)
            sources = {"tensor (random normal)": x, f"store ({site})": (store, site)}
            per_step: dict[str, float] = {}
            for label, src in sources.items():
                one_call = partial(train, src, kind, d_sae=d_sae, steps=1, **opts)
                full_call = partial(train, src, kind, d_sae=d_sae, steps=args.train_steps, **opts)
                per_step[label], full = marginal(one_call, full_call, args)
                rows.append([kind, f"{d_sae:,}", f"ours: train, {label}", f"{full:,.2f}", *per_step_cells(
                    per_step[label], args.train_batch)])
            base, full = marginal(partial(minimal_training, x, kind, d_sae, 1, args.train_batch),
                                  partial(minimal_training, x, kind, d_sae, args.train_steps, args.train_batch), args)
            rows.append([kind, f"{d_sae:,}", "minimal hand-written loop, tensor", f"{full:,.2f}",
                         *per_step_cells(base, args.train_batch)])
            if base > 0:
                rows[-3][6] = ratio(per_step["tensor (random normal)"] / base)
                rows[-2][6] = ratio(per_step[f"store ({site})"] / base)
            gc.collect()
    return (f"### 2. Training throughput (d_in {d}, batch {args.train_batch:,} rows per step, "
            f"{args.train_steps} steps, {args.device})\n\nTime per step = (time of {args.train_steps} steps - time "
            f"of 1 step) / {args.train_steps - 1}: setup left out; medians of {args.train_repeats} pair(s) of runs "
            "after an untimed 1-step run.\n\n"
            + markdown_table(["kind", "d_sae", "trainer", f"{args.train_steps} steps (s)", "per step (ms)",
                              "tokens/s", "per step / minimal loop"], rows))


# ---------------------------------------------------------------------- 3. scan and index, 4. evaluate
def scan_tables(args, model, store, site: str, root: Path) -> str:
    from interp.features import TopKSAE, evaluate, feature_index, top_activations

    d = store[site].shape[-1]
    n_tokens = store.manifest["n_tokens"]
    rows = []
    lines = []
    for d_sae in args.scan_d_sae:
        sae = TopKSAE.random(d, d_sae, k=min(32, d_sae), site=site, seed=args.seed).to(args.device)
        n_idx = min(args.index_features, d_sae)
        whole = seconds(lambda sae=sae: top_activations(sae, store, progress=False), args.repeats, args.device)
        some = seconds(lambda sae=sae, n=n_idx: top_activations(sae, store, range(n), progress=False),
                       args.repeats, args.device)
        single = seconds(lambda sae=sae: [top_activations(sae, store, features=[f], progress=False) for f in (0, 1)],
                         args.repeats, args.device)
        per_feature = median(single) / 2
        out = root / f"index-{d_sae}"

        def index(out=out, sae=sae, n_idx=n_idx):
            shutil.rmtree(out, ignore_errors=True)
            return feature_index(model, sae, store, range(n_idx), out, progress=False)

        idx = seconds(index, args.repeats, args.device)
        pages = len(list(out.glob("feature_*.html")))
        shutil.rmtree(out, ignore_errors=True)
        rows += [
            [f"{d_sae:,}", f"top_activations, all {d_sae:,} features, one pass", f"{median(whole):,.2f}",
             f"{n_tokens / median(whole):,.0f}", "", f"{spread(whole) * 100:.0f}%"],
            [f"{d_sae:,}", f"top_activations, {n_idx:,} features, one pass", f"{median(some):,.2f}",
             f"{n_tokens / median(some):,.0f}", "1.000", f"{spread(some) * 100:.0f}%"],
            [f"{d_sae:,}", f"top_activations, one pass per feature x {n_idx:,} (2 timed, extrapolated)",
             f"{per_feature * n_idx:,.2f}", f"{n_tokens / (per_feature * n_idx):,.0f}",
             ratio(per_feature * n_idx / median(some)), f"{spread(single) * 100:.0f}%"],
            [f"{d_sae:,}", f"feature_index, {n_idx:,} features (one scan + {pages:,} pages + index)",
             f"{median(idx):,.2f}", f"{n_tokens / median(idx):,.0f}", ratio(median(idx) / median(some)),
             f"{spread(idx) * 100:.0f}%"],
        ]
        gc.collect()
    lines.append(
        f"### 3. Top activations and the feature index ({n_tokens:,} tokens at {site}, bf16 store; TopK SAEs, k = 32, "
        f"random weights; {args.repeats} calls each, median)\n\n"
        + markdown_table(["d_sae", "call", "time (s)", "tokens/s", "time / one pass over the same features",
                          "spread"], rows))

    sae = TopKSAE.random(d, args.scan_d_sae[0], k=min(32, args.scan_d_sae[0]), site=site, seed=args.seed)
    sae = sae.to(args.device)
    stats = seconds(lambda: evaluate(model, sae, store, ce=False, progress=False), args.repeats, args.device)
    ce = seconds(lambda: evaluate(model, sae, store, ce_tokens=args.eval_ce_tokens, progress=False),
                 args.repeats, args.device)
    lines.append(
        f"### 4. Evaluation (TopK SAE of {args.scan_d_sae[0]:,} features at {site}; {args.repeats} calls each, "
        "median)\n\n" + markdown_table(
            ["call", "time (s)", "spread"],
            [[f"evaluate(ce=False): L0, FVU, dead/dense on {n_tokens:,} tokens", f"{median(stats):,.2f}",
              f"{spread(stats) * 100:.0f}%"],
             [f"evaluate(ce_tokens={args.eval_ce_tokens:,}): + clean, spliced and zero-ablated cross-entropy",
              f"{median(ce):,.2f}", f"{spread(ce) * 100:.0f}%"]]))
    return "\n\n".join(lines)


# ---------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None,
                        help="override n_layers of the 1B configuration (smoke runs); default: 26, the real 1B")
    parser.add_argument("--seqs", type=parse_ints, default=[64, 256], help="sequence lengths of part 1")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds / calls (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each contender first (part 1)")
    parser.add_argument("--d-sae", type=int, default=16384, help="features of the single SAE / transcoder (part 1)")
    parser.add_argument("--all-d-sae", type=int, default=4096, help="features of each per-layer SAE (part 1)")
    parser.add_argument("--train-d-sae", type=parse_ints, default=[4096, 16384], help="widths trained (part 2)")
    parser.add_argument("--train-batch", type=int, default=4096, help="rows per training step")
    parser.add_argument("--train-steps", type=int, default=10, help="training steps timed (>= 2)")
    parser.add_argument("--train-repeats", type=int, default=1, help="timed pairs of runs per trainer (median)")
    parser.add_argument("--scan-d-sae", type=parse_ints, default=[4096, 16384], help="widths scanned (part 3)")
    parser.add_argument("--store-tokens", type=int, default=32768, help="tokens in the store (parts 2-4)")
    parser.add_argument("--index-features", type=int, default=1000, help="features in the feature index")
    parser.add_argument("--eval-ce-tokens", type=int, default=2048, help="tokens of the evaluation's loss")
    parser.add_argument("--skip", default="", help="parts to skip, comma-separated: splice,train,scan,demo")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--workdir", default=None, help="where to write the store (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clt", action="store_true", help="also run part 6 (CLT loading; writes ~12.6 GB)")
    args = parser.parse_args(argv)
    if args.train_steps < 2:
        parser.error("--train-steps must be at least 2 (the first step is subtracted as setup)")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    set_threads(args.threads)

    from interp.data import harvest
    from interp.model import Gemma3

    print("# bench.features\n")
    print(environment() + "\n")
    print("Command: python -m bench.features " + " ".join(sys.argv[1:]) + "\n")
    cfg = bench_config(args.layers)
    tok, tok_label = bench_tokenizer()
    model = Gemma3.from_config(cfg, seed=args.seed, device=args.device, tokenizer=tok)
    print(f"Model: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, fp32, random weights, "
          f"{args.device}. Tokenizer: {tok_label}.\n")
    if args.clt:
        from bench.clt_load import clt_load_table

        print(clt_load_table(workdir=args.workdir) + "\n")
    if "splice" not in skip:
        with torch.inference_mode():
            print(splice_table(args, model) + "\n")
    if {"train", "scan"} <= skip:
        if "demo" not in skip:
            print(demo_table(args))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-features-", dir=args.workdir))
    try:
        site = "blocks.0.resid_post"
        t0 = time.perf_counter()
        store = harvest(model, corpus_for(args.store_tokens), site, root / "store", context=128, batch_size=8,
                        max_tokens=args.store_tokens, progress=False)
        print(f"Store: {store!r}, harvested in {time.perf_counter() - t0:.1f} s.\n")
        if "train" not in skip:
            print(training_table(args, store, site) + "\n")
        if "scan" not in skip:
            with torch.inference_mode():
                print(scan_tables(args, model, store, site, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if "demo" not in skip:
        print("\n" + demo_table(args))


def demo_table(args) -> str:
    """Part 5: the quality of the demo transcoders (``interp.features.demo.demo_transcoders``, one
    TopK transcoder of 512 features per layer of the demo model, trained on 8,192 tokens; cached
    after the first run) on the store they were trained on, cross-entropy on ``--eval-ce-tokens``
    tokens of it: ``compare_dictionaries``' table."""
    import interp
    from interp.features import compare_dictionaries
    from interp.features.demo import demo_store, demo_transcoders

    demo = interp.load("demo")
    t0 = time.perf_counter()
    transcoders = demo_transcoders(demo, progress=False)
    store = demo_store(demo, progress=False)
    trained = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = compare_dictionaries(demo, {f"L{i}": t for i, t in enumerate(transcoders)}, store,
                                 ce_tokens=args.eval_ce_tokens, progress=False)
    return (f"Demo transcoders (ready in {trained:.1f} s; evaluated in {time.perf_counter() - t0:.1f} s):\n\n"
            f"{table!r}")


if __name__ == "__main__":
    main()

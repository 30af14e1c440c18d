"""Activation patching: a full ``resid_pre`` sweep (every layer x every position), ours against
a naive loop of ours and TransformerLens 4.x's patching utilities.

Measured side by side in one run on the real Gemma 3 1B configuration with random weights
(fp32, CPU, batch 1, ``--seq`` tokens, 26 x 32 = 832 experiments by default), all contenders
sharing one set of weight tensors; metric: the logit difference of two tokens at the last
position.

- ours: ``interp.patching.patch_sweep(model, clean, corrupt, metric, "resid_pre")``: batched
  experiments, each group starting at its patched layer from the cached residual and reusing the
  corrupt run's keys and values before the patched position, logits only at the last position.
- naive (ours): one full forward of our model per experiment with one hook patching one
  position of ``blocks.{L}.resid_pre`` (logits only at the last position).
- TransformerLens: ``transformer_lens.patching.get_act_patch_resid_pre`` on a
  ``TransformerBridge`` (``build_bridge_from_module`` around a transformers
  ``Gemma3ForCausalLM`` holding our tensors; eager attention, full logits, as TransformerLens
  runs it), with the clean cache from ``bridge.run_with_cache`` (``hook_resid_pre`` only).

Every timing includes the clean (and corrupt) runs the method needs. The slow methods run one
full forward per experiment, so their cost per experiment is constant: with
``--slow-experiments K`` they measure K experiments spread over the grid and the full-sweep time
is extrapolated from their rate (marked ``*`` in the table); ``--slow-experiments 0`` measures
every experiment. Each slow method's values are checked against ours on the experiments it ran.

Smoke run: ``python -m bench.patching --layers 4 --seq 8 --slow-experiments 8``.
Full run:  ``python -m bench.patching`` (26 layers, 32 tokens, 64 experiments for the slow methods).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from bench.common import bench_config, environment, hf_model_sharing, markdown_table


def build_bridge(model):
    """A TransformerLens 4.x TransformerBridge over a transformers model that shares our weights."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf = hf_model_sharing(model, "eager")
    return build_bridge_from_module(hf, "Gemma3ForCausalLM", hf_config=hf.config, model_name="gemma-3-1b-random")


def prompts(vocab: int, seq: int, seed: int, corrupt_at: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clean tokens (BOS first) and a corrupt copy with the tokens at ``corrupt_at``
    changed (default: a third of the way in and the second to last, like the subject of a
    factual prompt and a word near the end)."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, vocab, (1, seq), generator=gen)
    clean[0, 0] = 2
    corrupt = clean.clone()
    for p in sorted(set(corrupt_at or [max(1, seq // 3), max(1, seq - 2)])):
        if not 1 <= p < seq:
            raise SystemExit(f"--corrupt-at {p} is outside 1..{seq - 1}")
        corrupt[0, p] = (clean[0, p] + 1 + torch.randint(0, vocab - 4, (1,), generator=gen)) % (vocab - 3) + 3
    return clean, corrupt


def subset(n_layers: int, seq: int, k: int) -> list[tuple[int, int]]:
    """``k`` (layer, position) cells spread evenly over the grid (all of them when k is 0 or more)."""
    cells = [(layer, p) for layer in range(n_layers) for p in range(seq)]
    if k <= 0 or k >= len(cells):
        return cells
    step = len(cells) / k
    return [cells[int(i * step)] for i in range(k)]


def naive_ours(model, clean, corrupt, metric, cells) -> dict[tuple[int, int], float]:
    """One full forward per experiment (logits at the metric's positions only)."""
    _, cache = model.run_with_cache(clean, "blocks.*.resid_pre")
    out = {}
    at = metric.resolve(clean.shape[1])
    for layer, p in cells:
        src = cache[f"blocks.{layer}.resid_pre"]

        def hook(x, site, p=p, src=src):
            x = x.clone()
            x[:, p] = src[:, p]
            return x

        logits = model.run_with_hooks(corrupt, {f"blocks.{layer}.resid_pre": hook}, logits_at=at)
        out[(layer, p)] = float(metric.from_selected(logits, clean.shape[1])[0])
    return out


def transformer_lens(bridge, clean, corrupt, correct: int, wrong: int, cells) -> dict[tuple[int, int], float]:
    """``get_act_patch_resid_pre`` on the cells (an ``index_df``), with its clean cache."""
    import pandas as pd
    from transformer_lens import patching

    _, cache = bridge.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
    index_df = pd.DataFrame(cells, columns=["layer", "pos"])
    values = patching.get_act_patch_resid_pre(
        bridge, corrupt, cache, lambda logits: logits[0, -1, correct] - logits[0, -1, wrong],
        index_axis_names=None, index_df=index_df)
    return {cell: float(v) for cell, v in zip(cells, values)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None,
                        help="override n_layers of the 1B configuration (smoke runs); default: 26, the real 1B")
    parser.add_argument("--seq", type=int, default=32, help="tokens per prompt (default 32)")
    parser.add_argument("--slow-experiments", type=int, default=64,
                        help="experiments the naive loop and TransformerLens measure (extrapolated to the full "
                             "sweep); 0 = all of them (default 64)")
    parser.add_argument("--corrupt-at", type=lambda t: [int(x) for x in t.split(",")], default=None,
                        help="positions where the corrupt prompt differs, comma-separated (default: seq//3 and "
                             "seq-2); 1 is the worst case for ours (no position before it to skip)")
    parser.add_argument("--skip-tl", action="store_true", help="leave out TransformerLens")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive loop")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from interp.metrics import logit_diff
    from interp.model import Gemma3
    from interp.patching import patch_sweep

    cfg = bench_config(args.layers)
    model = Gemma3.from_config(cfg, seed=args.seed)  # fp32, CPU, frozen
    clean, corrupt = prompts(cfg.vocab_size, args.seq, args.seed, args.corrupt_at)
    differ = (clean != corrupt)[0].nonzero().flatten().tolist()
    with torch.no_grad():
        top2 = model(clean, logits_at=[-1])[0, -1].topk(2).indices.tolist()
    correct, wrong = top2
    metric = logit_diff(correct, wrong)
    n_total = cfg.n_layers * args.seq
    cells = subset(cfg.n_layers, args.seq, args.slow_experiments)
    print(f"resid_pre sweep: {cfg.n_layers} layers x {args.seq} positions = {n_total} experiments; "
          f"Gemma 3 1B configuration{'' if args.layers is None else f' with {cfg.n_layers} layers'}, random "
          f"weights, fp32, CPU; the prompts differ at positions {differ}\n{environment()}\n", flush=True)

    rows, checks = [], []
    # warm-up (allocator, kernels) so the first contender is not penalised
    with torch.no_grad():
        model(clean, logits_at=[-1])

    gc.collect()
    t0 = time.perf_counter()
    with torch.no_grad():
        ours = patch_sweep(model, clean, corrupt, metric, "resid_pre", progress=args.progress)
    t_ours = time.perf_counter() - t0
    rows.append(("ours: patch_sweep (batched, prefix reuse)", n_total, t_ours, n_total, t_ours, False))

    if not args.skip_naive:
        gc.collect()
        t0 = time.perf_counter()
        with torch.no_grad():
            naive = naive_ours(model, clean, corrupt, metric, cells)
        t = time.perf_counter() - t0
        rows.append(("naive loop (ours, 1 forward per experiment)", len(cells), t, n_total,
                     t * n_total / len(cells), len(cells) < n_total))
        checks.append(("naive loop", max(abs(v - float(ours.raw[c])) for c, v in naive.items())))

    if not args.skip_tl:
        bridge = build_bridge(model)
        bridge.eval()
        with torch.no_grad():
            bridge(clean)  # warm-up
        gc.collect()
        t0 = time.perf_counter()
        with torch.no_grad():
            tl = transformer_lens(bridge, clean, corrupt, correct, wrong, cells)
        t = time.perf_counter() - t0
        rows.append(("TransformerLens 4.x: get_act_patch_resid_pre (bridge)", len(cells), t, n_total,
                     t * n_total / len(cells), len(cells) < n_total))
        checks.append(("TransformerLens", max(abs(v - float(ours.raw[c])) for c, v in tl.items())))

    table = []
    for name, measured, seconds, _full, full_seconds, extrapolated in rows:
        star = "*" if extrapolated else ""
        table.append([name, measured, f"{seconds:,.2f}", f"{measured / seconds:,.2f}",
                      f"{full_seconds:,.1f}{star}", f"{full_seconds / t_ours:,.1f}x"])
    print(markdown_table(["method", "experiments run", "time (s)", "experiments/s", f"full sweep of {n_total} (s)",
                          "ours is faster by"], table))
    if any(r[5] for r in rows):
        print("\n* extrapolated from the measured rate (one full forward per experiment, so the rate is constant)")
    scale = abs(ours.clean_value - ours.corrupt_value)
    print(f"\nmetric: logit difference at the last position, clean {ours.clean_value:.4f}, corrupt "
          f"{ours.corrupt_value:.4f}")
    print(f"ours ran {n_total - ours.skipped} of the {n_total} experiments; {ours.skipped} patch a value equal to the "
          f"corrupt run's (positions before {differ[0]}, and the layer-0 embedding of shared tokens), exact no-ops "
          "whose score is the corrupt run's, counted in its rate")
    for name, diff in checks:
        print(f"check: {name} vs ours, max |raw metric difference| = {diff:.2e} "
              f"({diff / scale:.1e} of clean - corrupt)")
    tl_rows = [r for r in rows if r[0].startswith("TransformerLens")]
    if tl_rows:
        speedup = tl_rows[0][4] / t_ours
        print(f"\ntarget: ours at least 10x faster than TransformerLens on the full sweep: {speedup:,.1f}x "
              f"({'met' if speedup >= 10 else 'NOT met'})")


if __name__ == "__main__":
    main()

"""Attribution graphs on the demo model (the real Gemma 3 270M) with the demo transcoders (one
TopK transcoder per layer, :func:`interp.features.demo.demo_transcoders`; trained and cached on
the first run): time and peak memory against prompt length, each graph's exactness, and the
memory estimate next to the measured peak. Then, unless ``--pairs 0``, the agreement of the
attribution-patching estimates (AtP, integrated gradients, AtP*) with real activation patching,
from :func:`bench.atp.agreement_table`.

Columns: ``tokens`` (prompt length, BOS included), ``features`` / ``nodes`` / ``edges`` (non-zero
entries of the adjacency), ``seconds`` (one ``attribution_graph`` call, after one untimed warm-up
call on the shortest prompt), ``peak extra`` (peak resident memory above the start of the call,
see ``bench.common.PeakMemory``), ``estimate`` (what the library estimated before allocating),
``max rel. error`` (``Graph.check()``: the largest ``|edges + constant - value|`` relative to the
sum's size) and ``logit error`` (replacement model vs model).

Run: ``python -m bench.circuits`` (prompts of 8, 16, 32 and 64 tokens; 6 prompt pairs).
Smoke: ``python -m bench.circuits --lengths 8 --pairs 0 --layers 0,1``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import interp
from bench.common import PeakMemory, environment, markdown_table, mib, parse_ints
from interp.circuits import estimate_bytes
from interp.data import stdlib_corpus
from interp.features.demo import demo_transcoders


def prompt_ids(model: interp.Gemma3, length: int) -> torch.Tensor:
    """The first ``length`` tokens (BOS first) of the standard library's docstrings."""
    ids: list[int] = []
    for doc in stdlib_corpus().documents():
        ids += model.tokenizer.encode(doc, bos=not ids)
        if len(ids) >= length:
            return torch.tensor(ids[:length])
    raise ValueError(f"the corpus has fewer than {length} tokens")


def graph_rows(model: interp.Gemma3, transcoders: list, lengths: list[int], batch: int) -> list[list[str]]:
    rows = []
    interp.attribution_graph(model, prompt_ids(model, min(lengths)), transcoders, batch=batch, progress=False)
    for n in lengths:
        ids = prompt_ids(model, n)
        with PeakMemory() as pm:
            start = time.perf_counter()
            g = interp.attribution_graph(model, ids, transcoders, batch=batch, progress=False)
            seconds = time.perf_counter() - start
        targets = int(g.targets.sum())
        est = estimate_bytes(model, n, len(g), min(batch, targets))
        rows.append([str(n), str(int(g.mask("feature").sum())), str(len(g)), f"{int((g.adjacency != 0).sum()):,}",
                     f"{seconds:.2f}", mib(pm.extra), mib(sum(est.values())), f"{g.check():.1e}",
                     f"{g.logit_error:.1e}"])
        print(f"  {n} tokens: {seconds:.2f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=parse_ints, default=[8, 16, 32, 64], help="prompt lengths in tokens")
    parser.add_argument("--batch", type=int, default=64, help="targets per backward pass")
    parser.add_argument("--layers", type=parse_ints, default=None, help="transcoder layers (default: all)")
    parser.add_argument("--pairs", type=int, default=6, help="prompt pairs for the AtP table (0: skip it)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = interp.load("demo")
    transcoders = demo_transcoders(model, progress=False)
    if args.layers is not None:
        transcoders = [t for i, t in enumerate(transcoders) if i in args.layers]
    print(environment())
    print(f"\nAttribution graphs, demo model, {len(transcoders)} transcoders "
          f"({transcoders[0].d_sae} features, TopK k={transcoders[0].k}), batch {args.batch}:\n")
    print(markdown_table(["tokens", "features", "nodes", "edges", "seconds", "peak extra", "estimate",
                          "max rel. error", "logit error"], graph_rows(model, transcoders, args.lengths, args.batch)))
    if args.pairs:
        from bench.atp import DEFAULT_PAIRS, agreement_table

        print(f"\nAttribution patching vs activation patching, {args.pairs} prompt pairs (sign agreement on the "
              "top 20 cells by |actual|, mean over pairs; cost and time per pair):\n")
        rows = agreement_table(model, DEFAULT_PAIRS[:args.pairs])
        print(markdown_table(["method", "sweep", "sign agreement", "correlation", "forward-equivalents", "seconds"],
                             [[r["method"], r["site"], "n/a" if r["sign_agreement"] is None else
                               f"{r['sign_agreement']:.0%}", f"{r['correlation']:.3f}",
                               f"{r['forward_equivalents']:.1f}", f"{r['seconds']:.2f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation speed (issue 14): ``Gemma3.generate`` (greedy) against transformers' ``generate`` on
the same weights, tokens/s and the time of each step along the generated length.

Measured side by side in one run on the real Gemma 3 1B configuration with random weights (fp32,
``--device``; ``--model demo`` uses the demo model, the real Gemma 3 270M, instead), all
contenders sharing one set of weight tensors (``bench.common.hf_model_sharing``):

- ours: ``model.generate(ids, max_new_tokens=n, stop_at_eos=False)`` (greedy, the KV cache of
  ``interp.model.kvcache``);
- transformers ``Gemma3ForCausalLM.generate(input_ids=ids, attention_mask=1, max_new_tokens=n,
  do_sample=False)`` with its default cache, ``sdpa`` and ``eager`` attention (its
  ``generation_config.eos_token_id`` set to None so that no row stops early; nothing else
  changed, so neither side masks any token).

Prompts: ``--batches`` rows (default 1 and 8) of ``--prompt-len`` random token ids (no padding),
``--new`` new tokens (default 32, 256 and 1,024). Tokens/s = rows x new tokens / median time of
the whole ``generate`` call (prefill included). Interleaved rounds (see ``bench.common``); ratios
are medians of per-round ratios, > 1 means ours produces more tokens per second.

Greedy agreement: for each batch, one untimed run of every contender at the largest ``--new``
compares the generated ids with ours: "equal", or the first step at which some row differs
(random weights give nearly flat logits, so a near-tie may flip on rounding: a difference late in a
long run is not by itself a bug; the max |logit difference| of one forward is printed first).

Per-step curve: the same untimed runs record the time at which each step's logits are ready (ours:
a hook on the ``logits`` site; transformers: a ``LogitsProcessor`` that returns the scores
unchanged; on CUDA both synchronise first). Step 1 is the prefill (from the call to the first
logits); step k > 1 is the time between the logits of steps k - 1 and k (sampling, the host sync
and one forward). Shown: the median over steps k .. k + 7 (fewer at the end), in ms. Flatness =
the median of the last 8 steps / the median of steps 10 .. 17 (steps 2 .. 9 in runs shorter than
24 steps).

Targets (issue 14): at least transformers' tokens/s; per-step time flat in the generated length.

Full run:  ``python -m bench.generate`` (26 layers, batch 1 and 8, 32/256/1,024 new tokens, 3 rounds:
on 2 CPU cores many hours; ``--new 32,256 --repeats 2`` there, the full set on a GPU).
Smoke run: ``python -m bench.generate --layers 1 --batches 1,2 --new 2,8 --prompt-len 4 --repeats 1 --threads 1``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from bench.common import (
    bench_config,
    environment,
    hf_model_sharing,
    markdown_table,
    max_abs_diff,
    median,
    paired_ratio,
    parse_ints,
    ratio,
    spread,
    synchronize,
    time_interleaved,
)


def curve_steps(n: int) -> list[int]:
    """1, 2, 32, 256, 1024, ... up to ``n``, and ``n``'s last full window."""
    steps = [1, 2] + [s for s in (10, 32, 64, 128, 256, 512, 1024, 2048, 4096) if s <= n]
    return sorted({s for s in steps if s <= n})


def window_ms(durations: list[float], step: int, width: int = 8) -> float:
    """Median of the step times of steps ``step .. step + width - 1`` (1-based), in ms."""
    if step == 1:
        return durations[0] * 1e3
    part = durations[step - 1:step - 1 + width]
    return statistics.median(part) * 1e3


def first_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int | None, int]:
    """(first 1-based step at which some row differs, None if equal; how many rows differ)."""
    n = min(a.shape[1], b.shape[1])
    differ = (a[:, :n] != b[:, :n])
    if not bool(differ.any()):
        return None, 0
    cols = differ.any(0).nonzero().flatten()
    return int(cols[0]) + 1, int(differ.any(1).sum())


def agreement(first: int | None, rows: int, batch: int, n: int) -> str:
    if first is None or first > n:
        return "equal"
    return f"differs from step {first} ({rows}/{batch} rows)"


class Stamps:
    """Times at which each step's logits are ready."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []
        self.start = 0.0

    def begin(self) -> None:
        synchronize(self.device)
        self.times = []
        self.start = time.perf_counter()

    def stamp(self) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def durations(self) -> list[float]:
        edges = [self.start] + self.times
        return [b - a for a, b in zip(edges, edges[1:])]


def build(args) -> tuple[Any, dict[str, Any], list[str]]:
    from interp.model import Gemma3

    if args.model == "demo":
        model = Gemma3.from_pretrained("demo", device=args.device)
    else:
        model = Gemma3.from_config(bench_config(args.layers), seed=args.seed, device=args.device)
    hfs, notes = {}, []
    for impl in ("sdpa", "eager"):
        try:
            hf = hf_model_sharing(model, impl)
            hf.generation_config.eos_token_id = None  # never stop early (ours: stop_at_eos=False)
            hf.generation_config.pad_token_id = model.cfg.pad_token_id
            hfs[impl] = hf
        except Exception as e:  # noqa: BLE001 - report and go on without it
            notes.append(f"transformers {impl}: could not be built ({type(e).__name__}: {e}); left out")
    return model, hfs, notes


Call = Callable[[int, "Stamps | None"], torch.Tensor]


def contenders(model, hfs: dict[str, Any], ids: torch.Tensor) -> dict[str, Call]:
    """name -> fn(new tokens, stamps or None) returning the new ids [batch, n] on the CPU."""
    from transformers import LogitsProcessor, LogitsProcessorList

    prompt_len = ids.shape[1]
    mask = torch.ones_like(ids)

    def ours(n: int, stamps: Stamps | None) -> torch.Tensor:
        hooks = None
        if stamps is not None:
            def hook(x, site):
                stamps.stamp()
            hooks = {"logits": hook}
        return model.generate(ids, max_new_tokens=n, stop_at_eos=False, hooks=hooks).ids

    class Stamp(LogitsProcessor):
        def __init__(self, stamps: Stamps):
            self.stamps = stamps

        def __call__(self, input_ids, scores):
            self.stamps.stamp()
            return scores

    def hf_call(hf) -> Call:
        def run(n: int, stamps: Stamps | None) -> torch.Tensor:
            extra = {"logits_processor": LogitsProcessorList([Stamp(stamps)])} if stamps is not None else {}
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **extra)
            return out[:, prompt_len:].cpu()
        return run

    calls = {"ours": ours}
    calls.update({f"hf_{impl}": hf_call(hf) for impl, hf in hfs.items()})
    return calls


LABELS = {"ours": "ours", "hf_sdpa": "HF sdpa", "hf_eager": "HF eager"}


def run(args) -> str:
    model, hfs, notes = build(args)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(args.seed)
    lines = [f"Model: {'demo (Gemma 3 270M)' if args.model == 'demo' else 'Gemma 3 1B configuration'}, "
             f"{cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
             f"{'real' if args.model == 'demo' else 'random'} weights, fp32, {args.device}; greedy; prompts of "
             f"{args.prompt_len} random token ids."] + notes
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=gen).to(args.device)
    with torch.inference_mode():
        ref = model(ids)
        diffs = {f"transformers {impl}": max_abs_diff(hf(input_ids=ids, use_cache=False).logits, ref)
                 for impl, hf in hfs.items()}
    lines.append("Max |logit difference| of one forward against ours: "
                 + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    del ref
    n_max = max(args.new)
    throughput_rows, curve_rows, flat_rows, targets, stamp_notes = [], [], [], [], []
    for batch in args.batches:
        ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=gen).to(args.device)
        calls = contenders(model, hfs, ids)
        # untimed: warm-up, greedy agreement and the per-step curve at the largest length
        for fn in calls.values():
            for _ in range(args.warmup):
                fn(min(n_max, 4), None)
        outs, durations = {}, {}
        for name, fn in calls.items():
            stamps = Stamps(args.device)
            stamps.begin()
            outs[name] = fn(n_max, stamps)
            durations[name] = stamps.durations()
            if len(durations[name]) != n_max:
                stamp_notes.append(f"batch {batch}, {LABELS[name]}: {len(durations[name])} step stamps for {n_max} "
                                   "steps")
        diff = {name: first_difference(outs["ours"], outs[name]) for name in calls if name != "ours"}
        for step in curve_steps(n_max):
            curve_rows.append([batch, step] + [f"{window_ms(durations[name], step):,.1f}" for name in calls])
        for name in calls:
            d = durations[name]
            lo = 10 if len(d) >= 24 else 2  # steps lo .. lo + 7 (1-based); the prefill is step 1
            early_steps = d[lo - 1:lo + 7]
            if not early_steps:
                continue
            early, late = statistics.median(early_steps), statistics.median(d[-8:])
            span = f"{lo}-{lo + len(early_steps) - 1}"
            flat_rows.append([batch, n_max, LABELS[name], span, f"{early * 1e3:,.1f}", f"{late * 1e3:,.1f}",
                              ratio(late / early)])
            if name == "ours":
                targets.append([f"batch {batch}: ours, step time last 8 / steps {span} ({n_max} new)", "small (~1)",
                                ratio(late / early)])
        del outs
        gc.collect()
        for n in args.new:
            samples = time_interleaved({name: (lambda fn=fn, n=n: fn(n, None)) for name, fn in calls.items()},
                                       repeats=args.repeats, warmup=0, device=args.device)
            tokens = batch * n
            row = [batch, n] + [f"{median(samples[name]):,.2f}" for name in calls]
            row += [f"{tokens / median(samples[name]):,.1f}" for name in calls]
            row += [ratio(paired_ratio(samples[name], samples["ours"])) for name in calls if name != "ours"]
            row += [f"{max(spread(v) for v in samples.values()) * 100:.0f}%"]
            row += [agreement(*diff[name], batch, n) for name in calls if name != "ours"]
            throughput_rows.append(row)
            for name in calls:
                if name != "ours":
                    targets.append([f"batch {batch}, {n} new: ours tokens/s / {LABELS[name]}", ">= 1",
                                    ratio(paired_ratio(samples[name], samples["ours"]))])
        del calls
        gc.collect()
    names = ["ours"] + [f"hf_{impl}" for impl in hfs]
    others = [n for n in names if n != "ours"]
    lines.append(
        f"### Throughput\n\n{args.repeats} interleaved rounds after warm-up, median seconds per `generate` call "
        "(prefill included); tokens/s = rows x new tokens / median; ours / HF = median of per-round ratios of "
        "throughput (> 1: ours is faster). Greedy tokens: against ours, over the first `new` steps.\n\n"
        + markdown_table(["batch", "new"] + [f"{LABELS[n]} (s)" for n in names]
                         + [f"{LABELS[n]} tok/s" for n in names] + [f"ours / {LABELS[n]}" for n in others]
                         + ["spread"] + [f"tokens: {LABELS[n]} vs ours" for n in others], throughput_rows))
    lines.append(
        f"### Per-step time ({n_max} new tokens, one untimed run each)\n\nms per step: step 1 = the prefill; step "
        "k = median of steps k .. k + 7.\n\n"
        + markdown_table(["batch", "step"] + [f"{LABELS[n]} (ms)" for n in names], curve_rows))
    lines.append("### Flatness\n\n" + markdown_table(
        ["batch", "new", "contender", "early steps", "early steps (ms)", "last 8 steps (ms)", "last / early"],
        flat_rows))
    if stamp_notes:
        lines.append("Note: " + "; ".join(stamp_notes))
    lines.append("### Targets\n\n" + markdown_table(["measure", "target", "measured"], targets))
    return "\n\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["1b", "demo"], default="1b",
                        help="1b: the Gemma 3 1B configuration with random weights (default); demo: the real 270M")
    parser.add_argument("--layers", type=int, default=None,
                        help="override n_layers of the 1B configuration (smoke runs); default: 26, the real 1B")
    parser.add_argument("--batches", type=parse_ints, default=[1, 8], help="prompts per call, comma-separated")
    parser.add_argument("--new", type=parse_ints, default=[32, 256, 1024], help="new tokens, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (random ids)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed short runs (4 tokens) of each contender first")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("# bench.generate\n")
    print(environment() + "\n")
    print("Command: python -m bench.generate " + " ".join(sys.argv[1:]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' generation-config notices
        print(run(args))


if __name__ == "__main__":
    main()

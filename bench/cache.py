"""Caching and patching: our run_with_cache / run_with_hooks against TransformerLens 4.x and a
plain transformers forward, time and peak extra memory next to the bytes actually cached.

Measured side by side in one run on the real 1B configuration with random weights (fp32,
batch 1, each ``--seqs`` length), all contenders sharing one set of weight tensors:

- ours: forward with no hooks; ``run_with_cache`` of every site (fp32, and ``dtype=bfloat16``;
  with ``--device cuda`` also ``device="cpu"``); of ``blocks.*.resid_post`` only;
  ``run_with_hooks`` with one patch (``hooks.interventions.patch`` of the clean run's
  ``resid_post`` at the last position of the middle layer).
- TransformerLens 4.x: a ``TransformerBridge`` built with
  ``transformer_lens.model_bridge.sources.build_bridge_from_module`` around a transformers
  ``Gemma3ForCausalLM`` holding our tensors (nothing is downloaded; no tokenizer, the bridge
  runs on token ids). Its forward, ``run_with_cache`` of every hook point and of
  ``*hook_resid_post``, and ``run_with_hooks`` with the same patch (in-place assignment, the
  usual TransformerLens idiom). The bridge switches its model to eager attention.
- transformers ``Gemma3ForCausalLM`` forward, ``sdpa`` (the reference of the targets) and ``eager``.

Time: interleaved rounds, median (see ``bench.common``). Memory: one more call of each
contender, alone, measuring the peak resident memory above the level before the call
(``VmHWM`` reset through ``/proc/self/clear_refs``; on CUDA the allocator's peak). It counts
everything the call allocates: the cache, the logits it returns and the forward's temporaries.
"Bytes held" counts the distinct storages behind the cached tensors (a tensor cached under two
names, such as ``resid_post`` of layer i and ``resid_pre`` of layer i + 1, counts once);
"nominal" sums every entry.

Smoke run: ``python -m bench.cache --layers 2 --seqs 16 --repeats 2``.
Full run:  ``python -m bench.cache`` (26 layers, seqs 64,256).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/cache.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import (
    PeakMemory,
    add_common_args,
    bench_config,
    environment,
    held_bytes,
    hf_model_sharing,
    markdown_table,
    max_abs_diff,
    median,
    mib,
    ms,
    nominal_bytes,
    paired_ratio,
    ratio,
    spread,
    synchronize,
    tensors_in,
    time_interleaved,
)


def build_bridge(model):
    """A TransformerLens 4.x TransformerBridge over a transformers model that shares our weights."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf = hf_model_sharing(model, "eager")
    return build_bridge_from_module(hf, "Gemma3ForCausalLM", hf_config=hf.config, model_name="gemma-3-1b-random")


def contenders(model, bridge, hf_sdpa, hf_eager, ids, mid: int, device: str):
    """name -> (label, zero-argument call returning (logits, cache or None))."""
    from interp.hooks.interventions import patch

    _, clean = model.run_with_cache(ids, f"blocks.{mid}.resid_post")
    src = clean[f"blocks.{mid}.resid_post"]
    ours_patch = {f"blocks.{mid}.resid_post": patch(src, positions=[-1])}

    def tl_patch(x, hook):
        x[:, -1] = src[:, -1]
        return x

    tl_resid = lambda name: name.endswith("hook_resid_post")  # noqa: E731
    c = {
        "ours_fwd": ("ours: forward, no hooks", lambda: (model(ids), None)),
        "ours_all": ("ours: run_with_cache, every site", lambda: model.run_with_cache(ids)),
        "ours_all_bf16": ("ours: run_with_cache, every site, dtype=bfloat16",
                          lambda: model.run_with_cache(ids, dtype=torch.bfloat16)),
    }
    if torch.device(device).type != "cpu":
        c["ours_all_cpu"] = ('ours: run_with_cache, every site, device="cpu"',
                             lambda: model.run_with_cache(ids, device="cpu"))
    c.update({
        "ours_resid": ("ours: run_with_cache, blocks.*.resid_post",
                       lambda: model.run_with_cache(ids, "blocks.*.resid_post")),
        "ours_patch": ("ours: run_with_hooks, one patch", lambda: (model.run_with_hooks(ids, ours_patch), None)),
        "tl_fwd": ("TransformerLens bridge: forward, no hooks", lambda: (bridge(ids), None)),
        "tl_all": ("TransformerLens bridge: run_with_cache, every hook point", lambda: bridge.run_with_cache(ids)),
        "tl_resid": ("TransformerLens bridge: run_with_cache, *hook_resid_post",
                     lambda: bridge.run_with_cache(ids, names_filter=tl_resid)),
        "tl_patch": ("TransformerLens bridge: run_with_hooks, one patch",
                     lambda: (bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{mid}.hook_resid_post", tl_patch)]),
                              None)),
        "hf_sdpa": ("transformers: forward, sdpa", lambda: (hf_sdpa(input_ids=ids, use_cache=False).logits, None)),
        "hf_eager": ("transformers: forward, eager", lambda: (hf_eager(input_ids=ids, use_cache=False).logits, None)),
    })
    return c


def measure_memory(call, device: str) -> tuple[PeakMemory, int, int, int]:
    """(peak meter, cached entries, nominal bytes, held bytes) of one call."""
    with PeakMemory(device) as pm:
        out = call()
        synchronize(device)
    cache = out[1]
    tensors = tensors_in(cache) if cache is not None else []
    result = pm, len(cache) if cache is not None else 0, nominal_bytes(tensors), held_bytes(tensors)
    del out, cache, tensors
    gc.collect()
    return result


def run(args) -> str:
    from interp.model import Gemma3

    device = args.device
    cfg = bench_config(args.layers)
    model = Gemma3.from_config(cfg, seed=args.seed, device=device)
    hf_sdpa = hf_model_sharing(model, "sdpa")
    hf_eager = hf_model_sharing(model, "eager")
    bridge = build_bridge(model)
    mid = cfg.n_layers // 2
    gen = torch.Generator().manual_seed(args.seed)
    lines = []
    targets = []
    for seq in args.seqs:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(device)
        calls = contenders(model, bridge, hf_sdpa, hf_eager, ids, mid, device)
        if seq == args.seqs[0]:
            ref = model(ids)
            checks = {"transformers sdpa": max_abs_diff(calls["hf_sdpa"][1]()[0], ref),
                      "transformers eager": max_abs_diff(calls["hf_eager"][1]()[0], ref),
                      "TransformerLens bridge": max_abs_diff(calls["tl_fwd"][1]()[0], ref),
                      "ours, every site cached": max_abs_diff(calls["ours_all"][1]()[0], ref)}
            lines.append(f"Max |logit difference| against our forward ({seq} tokens): "
                         + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
            del ref
        samples = time_interleaved({k: fn for k, (_, fn) in calls.items()}, repeats=args.repeats,
                                   warmup=args.warmup, device=device)
        mem = {k: measure_memory(fn, device) for k, (_, fn) in calls.items()}
        method = next(iter(mem.values()))[0].method
        fwd_extra = mem["ours_fwd"][0].extra
        rows = []
        for key, (label, _) in calls.items():
            pm, n, nominal, held = mem[key]
            rows.append([
                label, ms(median(samples[key])),
                ratio(paired_ratio(samples[key], samples["hf_sdpa"])),
                ratio(paired_ratio(samples[key], samples["ours_fwd"])),
                n or "", mib(nominal) if n else "", mib(held) if n else "",
                mib(pm.extra), mib(pm.extra - fwd_extra),
                ratio(pm.extra / held) if held else "",
            ])
        lines.append(
            f"### {seq} tokens (batch 1, {cfg.n_layers} layers, fp32, {device})\n\n"
            f"Time: {args.repeats} interleaved rounds after {args.warmup} warm-up, median; ratios are medians of "
            f"per-round ratios. Largest spread (max - min) / median: "
            f"{max(spread(v) for v in samples.values()) * 100:.0f}%. Memory: {method}, one call each.\n\n"
            + markdown_table(
                ["contender", "time (ms)", "/ HF sdpa", "/ our forward", "cached entries", "nominal (MiB)",
                 "bytes held (MiB)", "peak extra (MiB)", "peak extra - our forward's (MiB)", "peak extra / held"],
                rows))
        all_held = mem["ours_all"][3]
        targets += [
            [seq, "ours, every site cached / HF sdpa forward (time)", "<= 1",
             ratio(paired_ratio(samples["ours_all"], samples["hf_sdpa"]))],
            [seq, "ours, every site cached: peak extra / bytes held", "<= 1.10",
             ratio(mem["ours_all"][0].extra / all_held)],
            [seq, "ours, resid_post cached / our forward (time)", "<= 1.03",
             ratio(paired_ratio(samples["ours_resid"], samples["ours_fwd"]))],
            [seq, "ours, every site cached: bytes held in bf16 / in fp32", "~0.5",
             ratio(mem["ours_all_bf16"][3] / all_held)],
            [seq, "ours, every site cached: peak extra in bf16 / in fp32 (the returned logits stay fp32)", "~0.5",
             ratio(mem["ours_all_bf16"][0].extra / mem["ours_all"][0].extra)],
        ]
        if "ours_all_cpu" in mem:
            targets.append([seq, f"ours, every site cached to CPU: {device} peak extra / on-device", "small",
                            ratio(mem["ours_all_cpu"][0].extra / mem["ours_all"][0].extra)])
        del calls, samples, mem
        gc.collect()
    if torch.device(device).type == "cpu":
        lines.append('Caching to CPU from an accelerator (run_with_cache(device="cpu")) is measured only with '
                     "--device cuda.")
    lines.append("### Targets\n\n" + markdown_table(["seq", "measure", "target", "measured"], targets))
    return "\n\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    print("# bench.cache\n")
    print(environment() + "\n")
    print("Command: python -m bench.cache " + " ".join(sys.argv[1:]) + "\n")
    with torch.inference_mode():
        print(run(args))


if __name__ == "__main__":
    main()

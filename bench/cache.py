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

Copy cost (``--copy-cost``, instead of the tables above): when another hook is active, the
caching hook stores a copy of every activation (``hooks.cache.caching_hook(copy=True)`` clones
when the stored tensor shares storage with the activation, so a later in-place hook cannot
change a cached value); ``run_with_cache`` with nothing else hooked stores the run's own tensors,
like the view variant here. Measured against a
view-storing variant: ``caching_hook``'s own source with that ``clone`` statement removed by
``ast`` (nothing else differs), swapped into ``run_with_cache`` for the timed call only. Both
run ``run_with_cache`` of every site (``names=None``), of every site but ``logits`` (the
logits are also returned, so a copy holds them twice) and of ``"blocks.*.resid_post"``,
interleaved with our plain forward; the table gives the time ratio copy / view (median of per-round ratios),
bytes held, and the peak extra memory ratio copy / view. The view variant's values are checked
against the copies (an entry that differs was changed in place after it was cached).

Overhead (``--overhead``, instead of the tables above): what caching adds to a forward, our
contenders only, one thread (``torch.set_num_threads(1)``; run with ``OMP_NUM_THREADS=1``).
Unhooked forward, ``run_with_cache(names="blocks.*.resid_post")`` and ``run_with_cache()`` (every
site) in paired, interleaved rounds: each ratio is the median of per-round ratios to the forward
of the same round, with the smallest and largest round. Then the fixed cost per call, apart from
the forward's arithmetic: the same three calls on the same site names (the configuration's
layers) with every width cut to 16 and a vocabulary of 300, ``--fixed-rounds`` paired rounds,
the median extra time over the forward of the same round (the preparation, the hooks' scope,
every fired caching hook and the cache object).

Smoke run: ``python -m bench.cache --layers 2 --seqs 16 --repeats 2`` (``--copy-cost`` and
``--overhead`` likewise).
Full run:  ``python -m bench.cache`` (26 layers, seqs 64,256); ``python -m bench.cache --copy-cost``;
``OMP_NUM_THREADS=1 python -m bench.cache --overhead --seqs 64 --repeats 7``.
"""

from __future__ import annotations

import argparse
import ast
import gc
import inspect
import sys
import textwrap
from contextlib import contextmanager

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


# ---------------------------------------------------------------------- copy cost
class _StripClone(ast.NodeTransformer):
    """Removes ``if ...: t = t.clone()`` statements (the copy of the caching hook)."""

    def __init__(self):
        self.count = 0

    def visit_If(self, node: ast.If):
        self.generic_visit(node)
        body = node.body
        if (len(body) == 1 and isinstance(body[0], ast.Assign) and isinstance(body[0].value, ast.Call)
                and isinstance(body[0].value.func, ast.Attribute) and body[0].value.func.attr == "clone"
                and not node.orelse):
            self.count += 1
            return None
        return node


def view_caching_hook():
    """``interp.hooks.cache.caching_hook`` generated from its own source without its ``clone``:
    it stores ``x.detach()`` (a view sharing the activation's storage) when nothing else
    (positions, dtype, device) made a new tensor."""
    import __future__

    from interp.hooks import cache as cache_module

    fn = cache_module.caching_hook
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    stripper = _StripClone()
    tree = ast.fix_missing_locations(stripper.visit(tree))
    if stripper.count != 1:
        raise RuntimeError(f"expected one `if ...: t = t.clone()` in caching_hook, found {stripper.count}; "
                           "update bench.cache.view_caching_hook")
    namespace: dict = {}
    code = compile(tree, inspect.getsourcefile(fn) or "<view caching_hook>", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, dict(fn.__globals__), namespace)  # noqa: S102 - our own source, transformed
    return namespace[fn.__name__]


@contextmanager
def view_caching(model, hook_factory):
    """``run_with_cache`` of ``model`` builds its caching hook with ``hook_factory`` inside the block."""
    module_globals = type(model).run_with_cache.__globals__
    saved = module_globals["caching_hook"]
    module_globals["caching_hook"] = hook_factory
    try:
        yield
    finally:
        module_globals["caching_hook"] = saved


def not_logits(name: str) -> bool:
    """Every site except the logits (which the run also returns)."""
    return name != "logits"


def copy_cost(args) -> str:
    from interp.model import Gemma3

    device = args.device
    cfg = bench_config(args.layers)
    model = Gemma3.from_config(cfg, seed=args.seed, device=device)
    factory = view_caching_hook()

    def viewing(ids, names):
        def call():
            with view_caching(model, factory):
                return model.run_with_cache(ids, names)
        return call

    from interp.hooks.cache import caching_hook

    def copying_factory(store, **kwargs):  # what run_with_cache uses when another hook is active
        return caching_hook(store, **{**kwargs, "copy": True})

    def copying(ids, names):
        def call():
            with view_caching(model, copying_factory):
                return model.run_with_cache(ids, names)
        return call

    resid = "blocks.*.resid_post"
    specs = {"all": ("every site (names=None)", None),
             "nologits": ("every site but the logits", not_logits),
             "resid": (f"`{resid}`", resid)}
    gen = torch.Generator().manual_seed(args.seed)
    lines, summary = [], []
    for seq in args.seqs:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(device)
        calls = {"fwd": ("our forward, no hooks", lambda ids=ids: (model(ids), None))}
        for which, (label, names) in specs.items():
            calls[f"copy_{which}"] = (f"{label}, copy (another hook active)", copying(ids, names))
            calls[f"view_{which}"] = (f"{label}, view (run_with_cache alone)", viewing(ids, names))
        # the view variant really stores views, and what it stores equals the copies
        checks = []
        for which, (label, _) in specs.items():
            _, copies = calls[f"copy_{which}"][1]()
            _, views = calls[f"view_{which}"][1]()
            shared = sum(1 for n in copies if copies[n].untyped_storage().data_ptr() ==
                         views[n].untyped_storage().data_ptr())
            differ = [n for n in copies if copies[n].shape != views[n].shape or not torch.equal(copies[n], views[n])]
            checks.append(f"- {label}: {len(copies)} entries; the copies share storage with the views in {shared} "
                          f"(expected 0); {len(differ)} view entries differ from the copies"
                          + (f" (changed in place after caching, e.g. {differ[:3]})" if differ else ""))
            del copies, views
        gc.collect()
        samples = time_interleaved({k: fn for k, (_, fn) in calls.items()}, repeats=args.repeats,
                                   warmup=args.warmup, device=device)
        mem = {k: measure_memory(fn, device) for k, (_, fn) in calls.items()}
        method = next(iter(mem.values()))[0].method
        rows = []
        for key, (label, _) in calls.items():
            pm, n, _nominal, held = mem[key]
            pair = key.replace("copy_", "view_") if key.startswith("copy_") else None
            rows.append([
                label, ms(median(samples[key])), ratio(paired_ratio(samples[key], samples["fwd"])),
                ratio(paired_ratio(samples[key], samples[pair])) if pair else "",
                f"{spread(samples[key]) * 100:.0f}%", n or "", mib(held) if n else "", mib(pm.extra),
                ratio(pm.extra / held) if held else "",
                ratio(pm.extra / mem[pair][0].extra) if pair else "",
            ])
        for which, (label, _) in specs.items():
            c, v = mem[f"copy_{which}"], mem[f"view_{which}"]
            summary.append([seq, label, ratio(paired_ratio(samples[f"copy_{which}"], samples[f"view_{which}"])),
                            f"{max(spread(samples[f'copy_{which}']), spread(samples[f'view_{which}'])) * 100:.0f}%",
                            mib(c[3]), mib(v[3]), mib(c[0].extra), mib(v[0].extra),
                            mib(c[0].extra - v[0].extra), ratio(c[0].extra / v[0].extra)])
        lines.append(
            f"### Copy cost, {seq} tokens (batch 1, {cfg.n_layers} layers, fp32, {device})\n\n"
            + "\n".join(checks) + "\n\n"
            f"Time: {args.repeats} interleaved rounds after {args.warmup} warm-up, median; ratios are medians of "
            f"per-round ratios; spread = (max - min) / median of that contender's rounds. Memory: {method}, one "
            "call each.\n\n"
            + markdown_table(["contender", "time (ms)", "/ our forward", "copy / view (time)", "spread",
                              "cached entries", "bytes held (MiB)", "peak extra (MiB)", "peak extra / held",
                              "copy / view (peak extra)"], rows))
        del calls, samples, mem
        gc.collect()
    lines.append("### Copy cost, summary\n\n" + markdown_table(
        ["seq", "cached", "time copy / view", "spread (larger of the two)", "held, copy (MiB)", "held, view (MiB)",
         "peak extra, copy (MiB)", "peak extra, view (MiB)", "copy - view (MiB)", "peak extra copy / view"],
        summary))
    return "\n\n".join(lines)


# ---------------------------------------------------------------------- overhead
def overhead(args) -> str:
    from interp.model import Gemma3

    device = args.device
    cfg = bench_config(args.layers)
    model = Gemma3.from_config(cfg, seed=args.seed, device=device)
    narrow = Gemma3.from_config(cfg.replace(d_model=16, d_mlp=32, n_heads=2, n_kv_heads=1, d_head=8,
                                            vocab_size=300), seed=args.seed, device=device)
    resid = "blocks.*.resid_post"
    labels = {"fwd": "forward, no hooks", "resid": f'run_with_cache(names="{resid}")',
              "all": "run_with_cache(), every site"}
    targets = {"resid": "<= 1.03", "all": "<= 1.05"}

    def calls(m, ids):
        return {"fwd": lambda: (m(ids), None), "resid": lambda: m.run_with_cache(ids, resid),
                "all": lambda: m.run_with_cache(ids)}

    gen = torch.Generator().manual_seed(args.seed)
    lines = []
    for seq in args.seqs:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(device)
        samples = time_interleaved(calls(model, ids), repeats=args.repeats, warmup=args.warmup, device=device)
        fwd = samples["fwd"]
        rows = []
        for key, label in labels.items():
            per_round = [a / b for a, b in zip(samples[key], fwd)]
            rows.append([label, ms(median(samples[key])), f"{spread(samples[key]) * 100:.0f}%",
                         "" if key == "fwd" else ratio(paired_ratio(samples[key], fwd)),
                         "" if key == "fwd" else f"{min(per_round):.3f} .. {max(per_round):.3f}",
                         targets.get(key, "")])
        small = torch.randint(0, 300, (1, seq), generator=gen).to(device)
        fixed = time_interleaved(calls(narrow, small), repeats=args.fixed_rounds, warmup=args.warmup, device=device)
        extra = [[f"{labels[key]} - forward", f"{median([a - b for a, b in zip(fixed[key], fixed['fwd'])]) * 1e3:.2f}"]
                 for key in ("resid", "all")]
        lines.append(
            f"### Overhead, {seq} tokens (batch 1, {cfg.n_layers} layers, fp32, {device}, "
            f"{torch.get_num_threads()} thread(s))\n\n"
            f"{args.repeats} interleaved rounds after {args.warmup} warm-up; time: median; spread: (max - min) / "
            "median; / forward: median of per-round ratios, then the smallest and largest.\n\n"
            + markdown_table(["call", "time (ms)", "spread", "/ forward", "per-round range", "target"], rows)
            + f"\n\nFixed cost per call: the same calls with widths 16 (same {len(narrow.site_names())} site names), "
            f"{args.fixed_rounds} paired rounds (forward median {ms(median(fixed['fwd']))} ms).\n\n"
            + markdown_table(["extra time", "median (ms)"], extra))
        del samples, fixed
        gc.collect()
    return "\n\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--copy-cost", action="store_true",
                        help="only the cost of caching copies: the current caching hook against a view-storing variant")
    parser.add_argument("--overhead", action="store_true",
                        help="only what caching adds to our forward (resid_post, every site), one thread")
    parser.add_argument("--fixed-rounds", type=int, default=200,
                        help="--overhead: paired rounds of the narrow model that give the fixed cost per call")
    args = parser.parse_args(argv)
    if args.overhead:
        torch.set_num_threads(1)
    print("# bench.cache\n")
    print(environment() + "\n")
    print("Command: python -m bench.cache " + " ".join(sys.argv[1:]) + "\n")
    with torch.inference_mode():
        print(overhead(args) if args.overhead else copy_cost(args) if args.copy_cost else run(args))


if __name__ == "__main__":
    main()

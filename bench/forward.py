"""Forward speed and loading memory: our Gemma 3 against Hugging Face transformers.

Prints, measured in one run:

1. Forward pass with no hooks, fp32, on the real 1B configuration with random weights, batch 1
   and 4, each ``--seqs`` length: our model, transformers ``Gemma3ForCausalLM`` with ``sdpa``
   and with ``eager`` attention (sharing our weight tensors), in interleaved rounds; median
   times and paired ratios. Target: ours no slower than transformers.
2. Zero-hook overhead: the cost of the registry's ``fire`` calls when nothing is hooked, two
   ways: (a) *stripped A/B*: the same model run with a copy of its forward methods whose
   ``fire(name, x, layer)`` calls are replaced by ``x`` (built from the real source with
   ``ast``, so nothing else differs), timed in the same rounds; (b) *replay*: the exact
   sequence of ``fire`` calls one forward makes, replayed alone in a tight loop (best of 5),
   divided by the forward time. (a) is the end-to-end difference but carries the machine's
   noise; (b) is precise but leaves out effects on the surrounding code. Target: under 2%.
3. Peak memory of loading a bf16 safetensors checkpoint of the same configuration, each loader
   in a fresh subprocess (its ``VmHWM``, the peak resident set), against the checkpoint size; transformers'
   ``from_pretrained`` for reference.

Smoke run: ``python -m bench.forward --layers 2 --seqs 16 --repeats 2``.
Full run:  ``python -m bench.forward`` (26 layers, seqs 64,256, batch 1,4).
"""

from __future__ import annotations

import argparse
import ast
import gc
import inspect
import json
import shutil
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.common import (
    add_common_args,
    bench_config,
    environment,
    hf_model_sharing,
    markdown_table,
    max_abs_diff,
    median,
    mib,
    ms,
    paired_ratio,
    parse_ints,
    proc_status,
    ratio,
    run_child,
    spread,
    time_interleaved,
)


# ---------------------------------------------------------------------- stripped forward
class _StripFire(ast.NodeTransformer):
    """``fire(name, x, layer)`` / ``reg.fire(name, x)`` -> ``x``."""

    def __init__(self):
        self.count = 0

    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)
        f = node.func
        if (isinstance(f, ast.Name) and f.id == "fire") or (isinstance(f, ast.Attribute) and f.attr == "fire"):
            self.count += 1
            return node.args[1]
        return node


def _stripped_function(fn):
    source = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(source)
    stripper = _StripFire()
    tree = ast.fix_missing_locations(stripper.visit(tree))
    namespace: dict = {}
    import __future__

    code = compile(tree, inspect.getsourcefile(fn) or "<stripped>", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, dict(fn.__globals__), namespace)  # noqa: S102 - our own source, transformed
    return namespace[fn.__name__], stripper.count


def stripped_methods(model) -> tuple[dict[type, object], int]:
    """For each module class of ``model`` whose ``forward`` calls ``fire``: the same forward
    without those calls. Returns ``{class: stripped forward}``; also how many call sites went."""
    out, sites = {}, 0
    for cls in {type(m) for m in model.modules()}:
        fn = cls.__dict__.get("forward")
        if fn is None or "fire" not in inspect.getsource(fn):
            continue
        out[cls], n = _stripped_function(fn)
        sites += n
    if not out:
        raise RuntimeError("found no forward method that calls fire(); the stripped A/B cannot be built")
    return out, sites


@contextmanager
def swapped(methods: dict[type, object]):
    """Temporarily install ``methods`` as the classes' forward."""
    saved = {cls: cls.__dict__["forward"] for cls in methods}
    for cls, fn in methods.items():
        cls.forward = fn
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.forward = fn


# ---------------------------------------------------------------------- fire replay
def fire_calls(model, ids) -> list[tuple[str, int | None]]:
    """The (name, layer) of every ``fire`` call one hook-free forward makes."""
    reg = model.registry
    calls: list[tuple[str, int | None]] = []
    real = reg.fire

    def recording(name, x, layer=None):
        calls.append((name, layer))
        return real(name, x, layer)

    reg.fire = recording  # instance attribute: the model reads reg.fire on every use
    try:
        model(ids)
    finally:
        del reg.fire
    return calls


def replay_seconds(model, calls, loops: int = 200, best_of: int = 5) -> float:
    """Seconds that the ``fire`` calls of one forward take on their own, nothing hooked."""
    fire, x = model.registry.fire, torch.zeros(1)
    assert not model.registry.active, "replay measures the no-hook path"
    best = float("inf")
    for _ in range(best_of):
        t0 = time.perf_counter()
        for _ in range(loops):
            for name, layer in calls:
                fire(name, x, layer)
        best = min(best, (time.perf_counter() - t0) / loops)
    return best


# ---------------------------------------------------------------------- loading (children)
def child_save(folder: str, layers: int | None, seed: int) -> dict:
    from interp.model import Gemma3

    cfg = bench_config(layers)
    model = Gemma3.from_config(cfg, seed=seed, dtype=torch.bfloat16)
    hf = hf_model_sharing(model, "sdpa")
    hf.save_pretrained(folder)
    size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return {"checkpoint_bytes": size, "files": sorted(p.name for p in Path(folder).iterdir())}


def child_load(which: str, folder: str) -> dict:
    """Load in this (fresh) process; memory after imports, after loading, after reading every weight."""
    if which == "ours":
        from interp.model import Gemma3

        load = lambda: Gemma3.from_pretrained(folder, dtype=torch.bfloat16)  # noqa: E731
    else:
        import transformers

        load = lambda: transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)  # noqa: E731
    before = proc_status()
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    loaded = proc_status()  # VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    with torch.no_grad():  # read every weight once: what a first forward pass would fault in
        total = sum(float(p.max()) for p in model.parameters())  # reads each tensor, allocates nothing big
    touched = proc_status()
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    return {"before": {k: before.get(k, 0) for k in keys}, "loaded": {k: loaded.get(k, 0) for k in keys},
            "touched": {k: touched.get(k, 0) for k in keys}, "seconds": seconds,
            "n_params": sum(p.numel() for p in model.parameters()), "checksum": total}


def loading_table(layers: int | None, seed: int, folder: str | None) -> str:
    own_folder = folder is None
    folder = folder or tempfile.mkdtemp(prefix="gemma3-bench-ckpt-")
    try:
        script = str(Path(__file__).resolve())
        base = [script] + (["--layers", str(layers)] if layers is not None else [])
        if not (Path(folder) / "config.json").exists():
            saved = run_child(base + ["--child", "save", "--dir", folder, "--seed", str(seed)])
            size = saved["checkpoint_bytes"]
        else:
            size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        rows = []
        for which, label in (("ours", "ours: Gemma3.from_pretrained(dir, dtype=bfloat16)"),
                             ("hf", "transformers: Gemma3ForCausalLM.from_pretrained(dir, dtype=bfloat16)")):
            r = run_child(base + ["--child", f"load-{which}", "--dir", folder])
            b, loaded, t = r["before"], r["loaded"], r["touched"]
            peak_load = loaded["VmHWM"] - b["VmRSS"]
            peak_all = t["VmHWM"] - b["VmRSS"]
            rows.append([label, f"{r['seconds']:.2f}", mib(b["VmRSS"]), mib(peak_load), mib(peak_all),
                         ratio(peak_all / size), mib(t["RssAnon"] - b["RssAnon"]), mib(t["RssFile"] - b["RssFile"])])
        head = (f"Checkpoint: bf16 safetensors written by save_pretrained, {mib(size)} MiB on disk "
                f"({folder if not own_folder else 'temporary directory'}; just written or read, so in the page "
                "cache for both loaders). Each loader runs in a fresh process. Peak extra = VmHWM of that process "
                "- its RSS after imports, (1) at the end of loading, (2) after then reading every weight once "
                "(a loader that maps the file lazily looks cheap at (1) and pays at (2)). Anonymous = private "
                "memory (copies); file-mapped = pages of the checkpoint mapped in, shared with the page cache.")
        table = markdown_table(
            ["loader", "load time (s)", "RSS after imports (MiB)", "(1) peak extra, load (MiB)",
             "(2) peak extra, load + read all (MiB)", "(2) / checkpoint", "anonymous extra after (MiB)",
             "file-mapped extra after (MiB)"], rows)
        return head + "\n\n" + table
    finally:
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- main benchmark
def forward_tables(args) -> str:
    from interp.model import Gemma3

    cfg = bench_config(args.layers)
    torch.manual_seed(args.seed)
    model = Gemma3.from_config(cfg, seed=args.seed)
    hf_sdpa = hf_model_sharing(model, "sdpa")
    hf_eager = hf_model_sharing(model, "eager")
    methods, stripped_sites = stripped_methods(model)
    gen = torch.Generator().manual_seed(args.seed)

    def run_ours(ids):
        return model(ids)

    def run_stripped(ids):
        with swapped(methods):
            return model(ids)

    def run_hf(hf, ids):
        return hf(input_ids=ids, use_cache=False).logits

    lines = []
    # correctness first: same logits from every contender
    ids = torch.randint(0, cfg.vocab_size, (1, args.seqs[0]), generator=gen)
    ref = run_ours(ids)
    checks = {"transformers sdpa": max_abs_diff(run_hf(hf_sdpa, ids), ref),
              "transformers eager": max_abs_diff(run_hf(hf_eager, ids), ref),
              "ours, fire calls stripped": max_abs_diff(run_stripped(ids), ref)}
    lines.append("Max |logit difference| against our forward (batch 1, "
                 f"{args.seqs[0]} tokens): " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    calls = fire_calls(model, ids)
    per_forward_fire = replay_seconds(model, calls)
    del ref

    rows = []
    worst: dict[str, list[float]] = {"sdpa": [], "eager": [], "ab": [], "replay": []}
    for batch in args.batches:
        for seq in args.seqs:
            ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
            s = time_interleaved({
                "ours": lambda ids=ids: run_ours(ids),
                "stripped": lambda ids=ids: run_stripped(ids),
                "sdpa": lambda ids=ids: run_hf(hf_sdpa, ids),
                "eager": lambda ids=ids: run_hf(hf_eager, ids),
            }, repeats=args.repeats, warmup=args.warmup)
            ours = median(s["ours"])
            worst["sdpa"].append(paired_ratio(s["ours"], s["sdpa"]))
            worst["eager"].append(paired_ratio(s["ours"], s["eager"]))
            worst["ab"].append(paired_ratio(s["ours"], s["stripped"]) - 1)
            worst["replay"].append(per_forward_fire / ours)
            rows.append([
                batch, seq, ms(ours), ms(median(s["sdpa"])), ms(median(s["eager"])),
                ratio(paired_ratio(s["ours"], s["sdpa"])), ratio(paired_ratio(s["ours"], s["eager"])),
                ms(median(s["stripped"])), f"{(paired_ratio(s['ours'], s['stripped']) - 1) * 100:+.2f}%",
                f"{per_forward_fire / ours * 100:.4f}%",
                f"{max(spread(v) for v in s.values()) * 100:.0f}%",
            ])
            gc.collect()
    lines.append(
        f"Forward, no hooks: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, fp32, random "
        f"weights, logits at every position, torch.inference_mode; {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up (median ms; ratios = median of per-round ratios, < 1 means ours is faster).")
    lines.append(markdown_table(
        ["batch", "seq", "ours (ms)", "HF sdpa (ms)", "HF eager (ms)", "ours / sdpa", "ours / eager",
         "ours, fire stripped (ms)", "hook overhead, A/B", "hook overhead, replay", "max spread"], rows))
    lines.append(
        f"Zero-hook overhead. A/B: ours vs the same forward methods with their {stripped_sites} fire(...) call "
        "sites replaced by the activation (generated from the source with ast; the 3 dictionary checks per layer "
        "that choose the attention path stay in both), same rounds; its noise is about the 'max spread' column "
        f"(largest (max - min) / median over the contenders). Replay: the {len(calls)} fire calls of one forward "
        f"(same for every batch and length) replayed alone take {per_forward_fire * 1e6:.1f} us (best of 5 x 200), "
        "shown as a share of our median forward.")
    lines.append("Targets (worst case over the batch x seq cells above):\n\n" + markdown_table(
        ["measure", "target", "measured"],
        [["ours / transformers sdpa (time)", "<= 1", ratio(max(worst["sdpa"]))],
         ["ours / transformers eager (time)", "<= 1", ratio(max(worst["eager"]))],
         ["zero-hook overhead, A/B", "< 2%", f"{max(worst['ab']) * 100:+.2f}%"],
         ["zero-hook overhead, replay", "< 2%", f"{max(worst['replay']) * 100:.4f}%"]]))
    return "\n\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batches", type=parse_ints, default=[1, 4], help="batch sizes, comma-separated")
    parser.add_argument("--skip-load", action="store_true", help="skip the loading-memory table")
    parser.add_argument("--only-load", action="store_true", help="only the loading-memory table")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="reuse (or create and keep) the bf16 checkpoint here instead of a temporary directory")
    parser.add_argument("--child", choices=["save", "load-ours", "load-hf"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.child == "save":
            result = child_save(args.dir, args.layers, args.seed)
        else:
            result = child_load(args.child.split("-", 1)[1], args.dir)
        print(json.dumps(result))
        return

    print("# bench.forward\n")
    print(environment() + "\n")
    print("Command: python -m bench.forward " + " ".join(sys.argv[1:]) + "\n")
    if not args.only_load:
        with torch.inference_mode():
            print(forward_tables(args) + "\n")
    if not args.skip_load:
        print("## Loading memory\n")
        print(loading_table(args.layers, args.seed, args.checkpoint_dir))


if __name__ == "__main__":
    main()

"""Harvesting activations to disk (issue 11): ``interp.harvest`` against a plain forward over the
same tokens, a hand-written loop, and TransformerLens; probes on every site at once against one
site at a time.

Measured side by side in one run on the real Gemma 3 1B configuration with random weights (fp32,
``--device``), all contenders sharing one set of weight tensors. The corpus is
``interp.data.stdlib_corpus()`` (docstrings of the installed Python standard library), packed into
rows of ``--context`` tokens by ``Corpus.rows`` (the same rows for every contender), ``--tokens``
tokens in all, ``--batch`` rows per forward; the sites are ``--sites`` (default every layer's
``resid_post``), stored in bfloat16 on the CPU:

- plain forward: ``model(ids, stop_at_layer=L)`` over the same batches, where ``L`` is the layer
  after the last harvested site (what ``harvest`` computes: no later layer, no logits); nothing
  kept. The reference of the target.
- ours: ``interp.harvest(model, corpus, sites, out_dir, context=, batch_size=, dtype=bfloat16,
  max_tokens=, progress=False)`` into a fresh directory (tokenizing the corpus, the background
  shard writer and the manifest included; ``--shard-tokens``, default the library's).
- naive loop: per batch ``model.run_with_cache(ids, sites, dtype=bfloat16, device="cpu",
  stop_at_layer=L)`` then ``safetensors.torch.save_file`` of that batch (one file per batch,
  written in the loop: no overlap), and the same with ``torch.save``.
- TransformerLens 4.x: a ``TransformerBridge`` (``bench.cache.build_bridge``, nothing downloaded)
  ``run_with_cache(ids, names_filter=<the same hook_resid_post names>, stop_at_layer=L)`` per batch,
  the cache cast to bfloat16 and written with ``safetensors.torch.save_file``. (The bridge runs
  the whole transformers model whatever ``stop_at_layer`` says: it computes the logits too.)
  Only when every site has a ``hook_`` counterpart of the same name (``resid_pre``, ``resid_mid``,
  ``resid_post``); else it is left out and the output says so.

Time: interleaved rounds (each round runs every contender once, order rotated; see
``bench.common``); every call writes into a new directory, which is then flushed (``os.sync``)
and deleted outside the timed region. Tokens/s = harvested tokens / median time; ratios are the
medians of per-round ratios against the plain forward (paired). Disk: bytes of every file the
call wrote (ours: shards + the token index + plan + manifest). Memory: one more call of each
contender alone, peak resident (host) memory above the level before the call
(``bench.common.PeakMemory("cpu")``, also with ``--device cuda``: the shards live in RAM).
Bounded memory: ``harvest`` again with shards of an eighth of ``--tokens`` (at least one batch),
on 2, 4 and 8 shards' worth of tokens: its peak follows the shard size, not the corpus. A shard
is filled in place in one preallocated buffer per site and handed to the writer, which holds at
most two, so up to about three shards are in memory at once: the peak may still grow from 2 to 4
shards and should stay flat from 4 to 8. ``--only-memory`` runs only these harvests (and the
default-shard one), without the timed contenders.

Probes: synthetic activations ``[sites, n, d_model]`` (``--probe-rows`` rows, one site per layer,
standard normal plus a label-dependent shift whose size grows with the layer), binary labels.
``interp.probe`` on every site in one call (one batched fit) against a Python loop calling it on
one site at a time; logistic (L-BFGS) and linear (ridge, closed form); interleaved rounds; the
largest difference of the held-out scores between the two is printed.

Targets (issue 11): harvest at >= 0.9x the plain forward's tokens/s (bf16 storage); peak memory
bounded (independent of the corpus size).

Full run:  ``python -m bench.harvest`` (26 layers, 4,096 tokens, context 128, batch 8, 3 rounds;
roughly 16 forward passes over the tokens in all: about half an hour on 2 CPU cores).
Smoke run: ``python -m bench.harvest --layers 2 --tokens 512 --context 64 --batch 4 --repeats 2
--probe-rows 256 --threads 1``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    PeakMemory,
    bench_config,
    environment,
    markdown_table,
    max_abs_diff,
    median,
    mib,
    ms,
    paired_ratio,
    ratio,
    spread,
    synchronize,
    time_interleaved,
)


# ---------------------------------------------------------------------- shared with bench.features
class ByteTokenizer:
    """A stand-in tokenizer (UTF-8 bytes, ids 3..258) for when the demo model's ``tokenizer.model``
    is not available; the 1B vocabulary holds every id."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([2] if bos else []) + [3 + b for b in text.encode("utf-8")]

    def decode(self, ids: Any) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")

    def to_str_tokens(self, ids: Any) -> list[str]:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return ["<bos>" if int(i) == 2 else self.decode([i]) for i in ids]


def bench_tokenizer() -> tuple[Any, str]:
    """Gemma 3's tokenizer (the demo model's ``tokenizer.model``, the same 262,144-piece vocabulary
    as the 1B) when it is on this machine or installable offline; else :class:`ByteTokenizer`."""
    try:
        from interp.model.demo import demo_dir
        from interp.model.tokenizer import Tokenizer

        return Tokenizer.from_file(demo_dir(progress=False)), "Gemma 3 tokenizer (demo model's tokenizer.model)"
    except Exception as e:  # noqa: BLE001 - any reason: fall back, and say so
        return ByteTokenizer(), f"UTF-8 byte tokenizer (Gemma 3's was not available: {type(e).__name__})"


def corpus_for(tokens: int) -> Any:
    """``stdlib_corpus`` with enough documents for ``tokens`` tokens (about 100 per docstring)."""
    from interp.data import stdlib_corpus

    return stdlib_corpus(max_docs=max(200, tokens // 20))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- timing with fresh directories
def time_writers(contenders: Mapping[str, Callable[[Path], Any]], root: Path, repeats: int, warmup: int,
                 device: str) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Like ``bench.common.time_interleaved``, but every call gets a new directory to write into,
    flushed to disk and deleted after the call, outside the timed region. Returns the samples and
    the bytes each contender wrote (its last call)."""
    names = list(contenders)
    counter = itertools.count()
    written: dict[str, int] = {}

    def call(name: str) -> float:
        out = root / f"{name}-{next(counter)}"
        gc.collect()
        synchronize(device)
        t0 = time.perf_counter()
        result = contenders[name](out)
        synchronize(device)
        seconds = time.perf_counter() - t0
        del result
        written[name] = dir_bytes(out) if out.exists() else 0
        os.sync()
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    for _ in range(warmup):
        for name in names:
            call(name)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(call(name))
    return samples, written


def peak_of(fn: Callable[[Path], Any], root: Path, tag: str, device: str) -> PeakMemory:
    """Peak extra resident (host) memory of one call: what a harvest holds in RAM, whatever the
    model's device."""
    out = root / f"mem-{tag}"
    with PeakMemory("cpu") as pm:
        result = fn(out)
        synchronize(device)
    del result
    os.sync()
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    return pm


# ---------------------------------------------------------------------- harvesting
def harvest_tables(args, model, tok_label: str, root: Path) -> str:
    from safetensors.torch import save_file

    from interp.data import ActivationStore, harvest
    from interp.data.harvest import SHARD_BYTES, _sites

    cfg = model.cfg
    sites, stop = _sites(model, args.sites)
    stop_kw: dict[str, Any] = {"stop_at_layer": stop} if stop is not None else {}
    corpus = corpus_for(args.tokens)
    t0 = time.perf_counter()
    rows = corpus.rows(model.tokenizer, args.context, pack=True, bos_id=cfg.bos_token_id, pad_id=cfg.pad_token_id,
                       max_tokens=args.tokens)
    tokenize_s = time.perf_counter() - t0
    n_tokens = rows.n_tokens()
    batches = [rows.ids[a:a + args.batch].to(args.device) for a in range(0, rows.n_rows, args.batch)]
    hkw: dict[str, Any] = dict(context=args.context, batch_size=args.batch, dtype=torch.bfloat16,
                               max_tokens=args.tokens, progress=False)
    if args.shard_tokens:
        hkw["shard_tokens"] = args.shard_tokens
    per_token = sum(torch.Size(model.site_shape(s, 1, 1)[2:]).numel() for s in sites) * 2  # bf16
    # harvest's default: as many whole rows as fit in SHARD_BYTES
    shard_tokens = args.shard_tokens or max(1, SHARD_BYTES // (per_token * args.context)) * args.context

    tl_names = [f"{s.rsplit('.', 1)[0]}.hook_{s.rsplit('.', 1)[1]}" for s in sites]
    tl_ok = all(s.rsplit(".", 1)[1] in ("resid_pre", "resid_mid", "resid_post") for s in sites)
    bridge, tl_note = None, ""
    if args.only_memory:
        tl_note = "--only-memory: the timed contenders (TransformerLens among them) are left out."
    elif tl_ok:
        try:
            from bench.cache import build_bridge

            bridge = build_bridge(model)
        except Exception as e:  # noqa: BLE001 - report and go on without it
            tl_note = f"TransformerLens bridge unavailable ({type(e).__name__}: {e}); left out."
    else:
        tl_note = f"TransformerLens left out: {args.sites!r} has sites without a same-named hook_ point."

    def plain(out: Path) -> None:
        with torch.no_grad():  # harvest's own mode
            for ids in batches:
                model(ids, **stop_kw)

    def ours(out: Path) -> Any:
        return harvest(model, corpus, args.sites, out, **hkw)

    def naive(save: str) -> Callable[[Path], None]:
        def run(out: Path) -> None:
            out.mkdir(parents=True)
            with torch.no_grad():
                for i, ids in enumerate(batches):
                    _, cache = model.run_with_cache(ids, sites, dtype=torch.bfloat16, device="cpu", **stop_kw)
                    tensors = {k: v.contiguous() for k, v in cache.items()}
                    if save == "safetensors":
                        save_file(tensors, str(out / f"batch_{i:05d}.safetensors"))
                    else:
                        torch.save(tensors, out / f"batch_{i:05d}.pt")
        return run

    def tl(out: Path) -> None:
        out.mkdir(parents=True)
        wanted = set(tl_names)
        with torch.no_grad():
            for i, ids in enumerate(batches):
                _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in wanted, **stop_kw)
                save_file({k: cache[k].to("cpu", torch.bfloat16).contiguous() for k in tl_names},
                          str(out / f"batch_{i:05d}.safetensors"))

    contenders: dict[str, tuple[str, Callable[[Path], Any]]] = {
        "plain": (f"plain forward (stop_at_layer={stop}), nothing kept", plain),
        "ours": ("ours: interp.harvest (background writer, sharded)", ours),
        "naive_st": ("naive loop: run_with_cache + safetensors.save_file per batch", naive("safetensors")),
        "naive_pt": ("naive loop: run_with_cache + torch.save per batch", naive("torch")),
    }
    if bridge is not None:
        contenders["tl"] = ("TransformerLens bridge: run_with_cache + safetensors.save_file per batch", tl)

    lines = [f"Model: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, fp32, random weights, "
             f"{args.device}. Tokenizer: {tok_label}. Corpus: {corpus.name}, {rows.n_rows} rows x {args.context} "
             f"tokens = {n_tokens:,} tokens (tokenized in {tokenize_s:.3f} s), batch {args.batch}. Sites: "
             f"{args.sites!r} = {len(sites)} sites, {per_token:,} bytes per token in bf16."]
    # agreement: the store holds what run_with_cache gives; TransformerLens caches the same values
    check_dir = root / "check"
    store = ours(check_dir)
    first = batches[0]
    with torch.no_grad():
        _, ref = model.run_with_cache(first, sites, dtype=torch.bfloat16, device="cpu", **stop_kw)
        checks = {"harvest store vs run_with_cache (bf16)":
                  max(max_abs_diff(store[s][0:first.shape[0]], ref[s]) for s in sites)}
        if bridge is not None:
            _, tlc = bridge.run_with_cache(first, names_filter=lambda n: n in set(tl_names), **stop_kw)
            _, ref32 = model.run_with_cache(first, sites, **stop_kw)
            checks["TransformerLens cache vs ours (fp32)"] = max(max_abs_diff(tlc[t], ref32[s])
                                                                for s, t in zip(sites, tl_names))
            del tlc, ref32
    n_store = ActivationStore(check_dir).manifest["n_tokens"]
    if n_store != n_tokens:
        lines.append(f"Warning: the store holds {n_store} tokens, the rows {n_tokens}.")
    del store, ref
    shutil.rmtree(check_dir, ignore_errors=True)
    lines.append("Max |difference| on the first batch: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    if tl_note:
        lines.append(tl_note)

    if args.only_memory:
        mem = {"ours": peak_of(ours, root, "ours", args.device)}
        samples: dict[str, list[float]] = {}
    else:
        samples, written = time_writers({k: fn for k, (_, fn) in contenders.items()}, root, args.repeats,
                                        args.warmup, args.device)
        mem = {k: peak_of(fn, root, k, args.device) for k, (_, fn) in contenders.items()}
        method = next(iter(mem.values())).method
        rows_out = []
        for key, (label, _) in contenders.items():
            t = median(samples[key])
            rows_out.append([label, ms(t), f"{n_tokens / t:,.1f}", ratio(paired_ratio(samples["plain"], samples[key])),
                             f"{spread(samples[key]) * 100:.0f}%", mib(mem[key].extra),
                             mib(written[key]) if written.get(key) else ""])
        lines.append(
            f"### Harvest: {n_tokens:,} tokens\n\nTime: {args.repeats} interleaved rounds after {args.warmup} warm-up, "
            "median; throughput / plain forward is the median of per-round ratios (plain time / contender time; "
            f"1 = as fast as the forward alone). Memory: {method}, one call each. Disk: bytes written by one call.\n\n"
            + markdown_table(["contender", "time (ms)", "tokens/s", "throughput / plain forward", "spread",
                              "peak extra RSS (MiB)", "disk (MiB)"], rows_out))

    # bounded memory: peak against corpus size at a fixed (small) shard size, next to the main run
    small = max(args.batch * args.context, args.tokens // 8) // args.context * args.context  # >= one batch
    one_default = min(shard_tokens // args.context * args.context, n_tokens)
    scaling = [[f"{shard_tokens:,}" + ("" if args.shard_tokens else " (default)") + ", the run above",
                f"{n_tokens:,}", mib(n_tokens * per_token), mib(one_default * per_token), mib(mem["ours"].extra),
                ratio(mem["ours"].extra / (one_default * per_token))]]
    peaks = []
    for mult in (2, 4, 8):
        kw = dict(hkw, max_tokens=mult * small, shard_tokens=small)
        pm = peak_of(lambda out, kw=kw: harvest(model, corpus, args.sites, out, **kw), root, f"scale-{mult}",
                     args.device)
        peaks.append(pm.extra)
        scaling.append([f"{small:,}", f"{mult * small:,} ({mult} shards)", mib(mult * small * per_token),
                        mib(small * per_token), mib(pm.extra), ratio(pm.extra / (small * per_token))])
    lines.append(
        "### Harvest peak memory against corpus size\n\nOne `harvest` call each (peak extra RSS). A shard "
        "(shard_tokens rounded down to whole rows) is filled in place, one preallocated buffer per site, then "
        "handed to the writer (at most two queued), so about three shards can be in memory at once and the peak "
        "should follow the shard size, not the corpus: the last three rows hold the shard fixed and double the "
        "tokens twice. The library's default shard is as many rows as fit in 256 MiB (SHARD_BYTES): "
        f"{shard_tokens:,} tokens at these sites.\n\n"
        + markdown_table(["shard_tokens", "tokens harvested", "activations (MiB)", "one shard (MiB)",
                          "peak extra RSS (MiB)", "peak / one shard"], scaling))

    targets = [] if args.only_memory else [["harvest throughput / plain forward (bf16 storage)", ">= 0.9",
                                            ratio(paired_ratio(samples["plain"], samples["ours"]))]]
    targets.append([f"harvest peak memory at {small:,}-token shards: 8 shards / 4 shards", "~1 (bounded)",
                    ratio(peaks[2] / max(peaks[1], 1))])
    lines.append("### Targets\n\n" + markdown_table(["measure", "target", "measured"], targets))
    return "\n\n".join(lines)


# ---------------------------------------------------------------------- probes
def probe_table(args, cfg) -> str:
    from interp.probes import probe

    n, d, s_count = args.probe_rows, cfg.d_model, cfg.n_layers
    gen = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(n) % 2
    direction = torch.randn(d, generator=gen)
    direction /= direction.norm()
    acts = {}
    for layer in range(s_count):
        strength = 2.0 * (layer + 1) / s_count
        acts[f"blocks.{layer}.resid_post"] = (torch.randn(n, d, generator=gen)
                                              + strength * (labels.float() * 2 - 1)[:, None] * direction)
    target = (labels.float() + 0.1 * torch.randn(n, generator=gen)).tolist()
    rows_out = []
    for kind, y in (("logistic", labels.tolist()), ("linear", target)):
        def together(kind=kind, y=y):
            return probe(acts, y, kind=kind, seed=args.seed)

        def one_by_one(kind=kind, y=y):
            return [probe({s: a}, y, kind=kind, seed=args.seed) for s, a in acts.items()]

        a, b = together(), one_by_one()
        diff = max(abs(float(a.test_score[i]) - float(r.test_score[0])) for i, r in enumerate(b))
        samples = time_interleaved({"together": together, "loop": one_by_one}, repeats=args.repeats,
                                   warmup=args.warmup)
        rows_out.append([kind, s_count, f"{n:,} x {d}", ms(median(samples["together"])), ms(median(samples["loop"])),
                         ratio(paired_ratio(samples["loop"], samples["together"])),
                         f"{max(spread(v) for v in samples.values()) * 100:.0f}%", f"{diff:.2e}",
                         f"{float(a.test_score.min()):.3f} .. {float(a.test_score.max()):.3f}"])
    return (f"### Probes: every site in one call vs one site at a time\n\nSynthetic activations, {s_count} sites "
            f"(one per layer), {n:,} rows x d_model {d}, 25% held out; {args.repeats} interleaved rounds after "
            f"{args.warmup} warm-up, median.\n\n"
            + markdown_table(["kind", "sites", "rows x d", "all sites at once (ms)", "loop over sites (ms)",
                              "loop / at once (time)", "spread", "max |test score difference|",
                              "test scores (at once)"], rows_out))


# ---------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None,
                        help="override n_layers of the 1B configuration (smoke runs); default: 26, the real 1B")
    parser.add_argument("--sites", default="blocks.*.resid_post", help="site names or globs to harvest")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens to harvest (max_tokens)")
    parser.add_argument("--context", type=int, default=128, help="tokens per row")
    parser.add_argument("--batch", type=int, default=8, help="rows per forward")
    parser.add_argument("--shard-tokens", type=int, default=None, help="harvest's shard_tokens (default: its own)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each contender first")
    parser.add_argument("--probe-rows", type=int, default=4096, help="rows of the synthetic probe data")
    parser.add_argument("--skip-probes", action="store_true")
    parser.add_argument("--skip-harvest", action="store_true")
    parser.add_argument("--only-memory", action="store_true",
                        help="harvest part: only the peak-memory runs (no timed contenders, no TransformerLens)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--workdir", default=None, help="where to write the harvests (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    print("# bench.harvest\n")
    print(environment() + "\n")
    print("Command: python -m bench.harvest " + " ".join(sys.argv[1:]) + "\n")
    cfg = bench_config(args.layers)
    if not args.skip_harvest:
        from interp.model import Gemma3

        tok, tok_label = bench_tokenizer()
        model = Gemma3.from_config(cfg, seed=args.seed, device=args.device, tokenizer=tok)
        root = Path(tempfile.mkdtemp(prefix="bench-harvest-", dir=args.workdir))
        try:
            print(harvest_tables(args, model, tok_label, root) + "\n")
        finally:
            shutil.rmtree(root, ignore_errors=True)
        del model
        gc.collect()
    if not args.skip_probes:
        print(probe_table(args, cfg))


if __name__ == "__main__":
    main()

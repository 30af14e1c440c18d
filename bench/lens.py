"""The logit lens on the demo model: ``interp.logit_lens`` against the old per-stage unembedding,
transformers and TransformerLens, plus the end-to-end ``python -m interp lens`` command.

Measured side by side in one run on the demo model (the real Gemma 3 270M, ``interp.load("demo")``:
18 layers, d_model 640, vocabulary 262,144, a tied 671 MB fp32 embedding), fp32, CPU, batch 1,
for each ``--seqs`` prompt length. Every contender gets the same token ids (the tokenized
"The capital of France is", 6 tokens with BOS, continued by a fixed English text and cut to the
length) and returns the top ``k = 5`` token ids and probabilities of all 19 stages (the embedding
and the residual after each layer) at every position:

- ours: ``interp.logit_lens(m, ids, k=5)``: caches ``blocks.0.resid_pre`` and
  ``blocks.*.resid_post`` (stopping before the model's own final norm and unembedding) and
  unembeds every stage and position in one matmul (chunked above 1 GiB of logits), with its
  non-finite check and the token texts of every top-k cell.
- per-stage (reference): the unembedding the lens used before, reimplemented here: the same
  cache call as ours, then for each of the 19 stages ``m.unembed(stage)`` + ``log_softmax`` +
  ``topk``, one stage (one pass over the embedding matrix) at a time; token texts as ours.
- transformers: ``Gemma3ForCausalLM`` sharing our tensors (``bench.common.hf_model_sharing``, sdpa),
  ``output_hidden_states=True, logits_to_keep=1`` (so it does not unembed every position for its own
  logits), then ``model.norm`` + ``lm_head`` on all hidden states stacked (one matmul),
  ``log_softmax``, ``topk``. Its last hidden state is already normed in the installed version (the
  script checks: ``lm_head(hidden_states[-1])`` equal to the returned logits) and then skips the
  norm for that stage only; otherwise it norms every stage.
- TransformerLens 4.x: a ``TransformerBridge`` (``build_bridge_from_module``, nothing downloaded; it
  switches its transformers model to eager attention), ``run_with_cache(names_filter=resid_pre /
  resid_post)``, ``cache.accumulated_resid(apply_ln=True)``, ``bridge.unembed``, ``log_softmax``,
  ``topk``. If the bridge cannot be built or run, the output says so and the column is left out.

Before timing, every contender's top-1 token at every stage and position is compared with ours
(and the largest top-1 probability difference printed). Time: interleaved rounds, median, ratios
are medians of per-round ratios (``bench.common``). Memory: one more call each, alone, peak extra
resident memory (``PeakMemory``).

End to end: ``python -m interp lens "The capital of France is" --no-html`` as a subprocess, and,
to split its wall time, ``python -c "import interp"`` and ``python -c "import interp;
interp.load('demo')"``; one untimed run of each first (warm file cache; the demo model is already
converted), then ``--e2e-runs`` interleaved rounds of wall time.

The end-to-end subprocesses run after the in-process part has freed its model (``--only-e2e``
runs them alone).

Smoke run: ``python -m bench.lens --seqs 6 --repeats 2 --e2e-runs 1``.
Full run:  ``python -m bench.lens`` (seqs 6,64, 5 rounds, 3 end-to-end runs).
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import subprocess
import sys
import time

import torch

from bench.common import (
    REPO,
    PeakMemory,
    environment,
    hf_model_sharing,
    malloc_trim,
    markdown_table,
    median,
    mib,
    ms,
    paired_ratio,
    parse_ints,
    ratio,
    spread,
    time_interleaved,
)

PROMPT = "The capital of France is"
CONTINUATION = (
    " Paris, a city on the Seine known for its museums, its cafés and the long avenues laid out in the"
    " nineteenth century. Every year millions of visitors climb the Eiffel Tower, walk through the Louvre"
    " and sit by the river in the evening, while the people who live there go to work on the metro, buy"
    " bread in the morning and argue about politics over dinner. The city has been the seat of the"
    " government for most of the last thousand years."
)
K = 5


# ---------------------------------------------------------------------- prompts
def prompt_ids(model, seq: int) -> torch.Tensor:
    """``[1, seq]`` token ids: the France prompt (BOS first) continued by a fixed text."""
    from interp.tokens import single_prompt

    ids = single_prompt(model, PROMPT + CONTINUATION * 4)
    if ids.shape[1] < seq:
        raise SystemExit(f"--seqs {seq}: the built-in text has only {ids.shape[1]} tokens")
    return ids[:, :seq].contiguous()


# ---------------------------------------------------------------------- contenders
def ours(model, ids: torch.Tensor):
    """``interp.logit_lens``; (top ids [stages, seq, k], top probs) on CPU."""
    import interp

    lens = interp.logit_lens(model, ids, k=K)
    return lens.top_ids, lens.top_probs


def per_stage(model, ids: torch.Tensor):
    """The previous unembedding: one ``m.unembed`` (one pass over the embedding) per stage."""
    from interp.hooks import partial_run
    from interp.tokens import str_tokens

    with partial_run():
        _, cache = model.run_with_cache(ids, names=["blocks.0.resid_pre", "blocks.*.resid_post"],
                                        stop_at_layer=model.cfg.n_layers)
    resid, _ = cache.accumulated_resid()  # [stages, 1, seq, d]
    top_ids, top_probs = [], []
    for stage in resid[:, 0]:  # [seq, d]
        logp = model.unembed(stage).float().log_softmax(-1)
        values, idx = logp.topk(K, dim=-1)
        top_ids.append(idx)
        top_probs.append(values.exp())
    top_ids_t = torch.stack(top_ids).cpu()
    str_tokens(model, top_ids_t.flatten().tolist())  # the token texts, as ours makes them
    return top_ids_t, torch.stack(top_probs).cpu()


def hf_last_is_normed(hf, ids: torch.Tensor) -> bool:
    """Whether this transformers version's last hidden state is already the final norm's output."""
    out = hf(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return torch.allclose(hf.lm_head(out.hidden_states[-1][:, -1:]), out.logits, atol=1e-4, rtol=1e-4)


def hf_lens(hf, model, ids: torch.Tensor, last_normed: bool):
    """transformers: hidden states -> (final norm) -> lm_head for every stage in one matmul."""
    from interp.tokens import str_tokens

    out = hf(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    hs = torch.stack(out.hidden_states)[:, 0]  # [stages, seq, d]
    normed = torch.cat([hf.model.norm(hs[:-1]), hs[-1:]]) if last_normed else hf.model.norm(hs)
    logp = hf.lm_head(normed).float().log_softmax(-1)
    values, idx = logp.topk(K, dim=-1)
    str_tokens(model, idx.flatten().tolist())
    return idx.cpu(), values.exp().cpu()


def tl_filter(name: str) -> bool:
    return name.endswith("hook_resid_pre") or name.endswith("hook_resid_post")


def tl_lens(bridge, model, ids: torch.Tensor):
    """TransformerLens bridge: run_with_cache + accumulated_resid(apply_ln=True) + unembed."""
    from interp.tokens import str_tokens

    _, cache = bridge.run_with_cache(ids, names_filter=tl_filter)
    acc = cache.accumulated_resid(apply_ln=True)  # [stages, 1, seq, d]
    logp = bridge.unembed(acc)[:, 0].float().log_softmax(-1)
    values, idx = logp.topk(K, dim=-1)
    str_tokens(model, idx.flatten().tolist())
    return idx.cpu(), values.exp().cpu()


def build_bridge(model):
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf = hf_model_sharing(model, "eager")
    bridge = build_bridge_from_module(hf, "Gemma3ForCausalLM", hf_config=hf.config, model_name="gemma-3-270m-demo")
    bridge.eval()
    return bridge


# ---------------------------------------------------------------------- checks
def agreement(name: str, ref, other) -> tuple[str, bool]:
    """A line comparing top-1 tokens (and their probabilities) of ``other`` with ours."""
    ref_ids, ref_p = ref
    ids, p = other
    if ids.shape != ref_ids.shape:
        return f"- {name}: shape {tuple(ids.shape)} differs from ours {tuple(ref_ids.shape)}", False
    same = ids[..., 0] == ref_ids[..., 0]
    n, total = int(same.sum()), same.numel()
    dp = float((p[..., 0] - ref_p[..., 0]).abs().max())
    line = f"- {name}: top-1 token equal to ours in {n} / {total} cells; max |top-1 prob difference| {dp:.1e}"
    if n < total:
        bad = (~same).nonzero().tolist()[:5]
        gaps = [float(ref_p[s, c, 0] - ref_p[s, c, 1]) for s, c in bad]
        line += f"; differing (stage, position) {bad} where our top-1/top-2 gap is {[f'{g:.1e}' for g in gaps]}"
    return line, n == total


# ---------------------------------------------------------------------- end to end
def end_to_end(runs: int, model_src: str) -> str:
    py = sys.executable
    commands = {
        "import": [py, "-c", "import interp"],
        "import + load": [py, "-c", f'import interp; interp.load("{model_src}")'],
        "lens command": [py, "-m", "interp", "lens", PROMPT, "--no-html"]
                        + ([] if model_src == "demo" else ["--model", model_src]),
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    def once(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        t = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return t

    for cmd in commands.values():  # warm the file cache (and the converted demo model)
        once(cmd)
    samples: dict[str, list[float]] = {k: [] for k in commands}
    names = list(commands)
    for r in range(runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(once(commands[name]))
    med = {k: median(v) for k, v in samples.items()}
    rows = [[name, f"{med[name]:.2f}", " / ".join(f"{x:.2f}" for x in samples[name]), f"`{shlex.join(cmd)}`"]
            for name, cmd in commands.items()]
    split = [
        ["python + `import interp`", f"{med['import']:.2f}", f"{med['import'] / med['lens command']:.0%}"],
        ["loading the model (import + load - import)", f"{med['import + load'] - med['import']:.2f}",
         f"{(med['import + load'] - med['import']) / med['lens command']:.0%}"],
        ["the lens and printing (lens command - import + load)", f"{med['lens command'] - med['import + load']:.2f}",
         f"{(med['lens command'] - med['import + load']) / med['lens command']:.0%}"],
    ]
    return (f"### End to end ({runs} interleaved runs each after one untimed run, wall time of the subprocess, "
            f"cwd {REPO})\n\n"
            + markdown_table(["command", "median (s)", "runs (s)", "command line"], rows)
            + "\n\nSplit of the lens command's median (differences of medians, so only roughly additive):\n\n"
            + markdown_table(["part", "seconds", "share"], split))


# ---------------------------------------------------------------------- main
def run(args) -> str:
    import interp

    t0 = time.perf_counter()
    model = interp.load(args.model)
    load_s = time.perf_counter() - t0
    if model.dtype != torch.float32 or model.device.type != "cpu":
        raise SystemExit(f"expected an fp32 CPU model, got {model.dtype} on {model.device}")
    cfg = model.cfg
    lines = [f"Model: {args.model!r} ({cfg.n_layers} layers, d_model {cfg.d_model}, vocabulary {cfg.vocab_size:,}, "
             f"fp32, CPU; loaded in {load_s:.1f} s in this process). {cfg.n_layers + 1} stages, top {K}."]
    hf = hf_model_sharing(model, "sdpa")
    bridge, bridge_error = None, None
    if not args.skip_tl:
        try:
            bridge = build_bridge(model)
        except Exception as e:  # noqa: BLE001 - reported in the output
            bridge_error = f"{type(e).__name__}: {e}"
    last_normed = None
    for seq in args.seqs:
        ids = prompt_ids(model, seq)
        if last_normed is None:
            last_normed = hf_last_is_normed(hf, ids)
            lines.append("transformers: `hidden_states[-1]` is " + (
                "already the final norm's output (lm_head of it equals the returned logits); the lens norms the "
                "other stages only" if last_normed else "the un-normed residual; the lens norms every stage"))
        calls = {
            "ours": ("ours: `interp.logit_lens` (one matmul)", lambda ids=ids: ours(model, ids)),
            "stage": ("per-stage unembedding (the previous lens, 19 matmuls)", lambda ids=ids: per_stage(model, ids)),
            "hf": ("transformers sdpa: hidden states + norm + lm_head",
                   lambda ids=ids, normed=last_normed: hf_lens(hf, model, ids, normed)),
        }
        if bridge is not None:
            calls["tl"] = ("TransformerLens bridge: run_with_cache + accumulated_resid + unembed",
                           lambda ids=ids: tl_lens(bridge, model, ids))
        ref = calls["ours"][1]()
        checks = []
        for key, (label, fn) in list(calls.items())[1:]:
            try:
                line, ok = agreement(label, ref, fn())
            except Exception as e:  # noqa: BLE001 - reported in the output
                if key != "tl":
                    raise
                bridge_error = f"{type(e).__name__}: {e}"
                del calls[key]
                continue
            checks.append(line + ("" if ok else "  **MISMATCH**"))
        samples = time_interleaved({k: fn for k, (_, fn) in calls.items()}, repeats=args.repeats,
                                   warmup=args.warmup)
        mem = {}
        for key, (_, fn) in calls.items():
            with PeakMemory() as pm:
                out = fn()
            del out
            mem[key] = pm
        rows = [[label, ms(median(samples[key])), ratio(paired_ratio(samples[key], samples["ours"])),
                 f"{spread(samples[key]) * 100:.0f}%", " / ".join(f"{x:.2f}" for x in samples[key]),
                 mib(mem[key].extra)]
                for key, (label, _) in calls.items()]
        lines.append(
            f"### {seq} tokens\n\nTop-1 agreement with ours (all {cfg.n_layers + 1} stages x {seq} positions):\n\n"
            + "\n".join(checks) + "\n\n"
            f"Time: {args.repeats} interleaved rounds after {args.warmup} warm-up, median; \"/ ours\" is the median of "
            f"per-round ratios; spread = (max - min) / median of that contender's rounds (largest "
            f"{max(spread(v) for v in samples.values()) * 100:.0f}%). Memory: {next(iter(mem.values())).method}, "
            "one call each.\n\n"
            + markdown_table(["contender", "time (ms)", "/ ours", "spread", "rounds (s, in run order)",
                              "peak extra (MiB)"], rows))
    if args.skip_tl:
        lines.append("TransformerLens: skipped (--skip-tl).")
    elif bridge_error is not None:
        lines.append(f"TransformerLens: does not work on this bridge, left out ({bridge_error}).")
    return "\n\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="model to load with interp.load (default: demo)")
    parser.add_argument("--seqs", type=parse_ints, default=[6, 64], help="prompt lengths in tokens (default 6,64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each contender first")
    parser.add_argument("--e2e-runs", type=int, default=3, help="timed runs of each end-to-end command (0: skip)")
    parser.add_argument("--skip-tl", action="store_true", help="leave out TransformerLens")
    parser.add_argument("--only-e2e", action="store_true", help="only the end-to-end command timings")
    args = parser.parse_args(argv)
    print("# bench.lens\n")
    print(environment() + "\n")
    print("Command: python -m bench.lens " + " ".join(sys.argv[1:]) + "\n", flush=True)
    if not args.only_e2e:
        with torch.inference_mode():
            print(run(args) + "\n", flush=True)
        gc.collect()  # the model, the references and their outputs are gone with run()'s frame
        malloc_trim()
    if args.e2e_runs > 0:
        print(end_to_end(args.e2e_runs, args.model))


if __name__ == "__main__":
    main()

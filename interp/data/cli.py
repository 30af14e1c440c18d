"""``python -m interp harvest``: harvest activations from a corpus to a directory (see
:func:`interp.data.harvest.harvest`). The same command under ``torchrun --nproc-per-node N -m
interp harvest ...`` runs on N processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..cli_errors import CLIError

HARVEST_HELP = """\
Harvest the activations of some sites over a corpus into sharded safetensors (bfloat16 by
default) plus a manifest, with a progress bar. Safe to kill: rerun the same command to resume.
Without --corpus, the docstrings of the installed Python standard library are the corpus (offline,
small; not a pretraining distribution).

examples:
  python -m interp harvest --sites "blocks.*.resid_post" --out harvest/ --max-tokens 100000
  python -m interp harvest --model demo --sites "blocks.6.mlp.hidden" --out h6/ --corpus texts.jsonl
  torchrun --nproc-per-node 2 -m interp harvest --sites "blocks.*.resid_post" --out harvest/
"""


def add_parser(sub: Any, common: Any) -> None:
    """The ``harvest`` sub-command's options."""
    p = sub.add_parser("harvest", help="harvest activations over a corpus to disk (resumable, torchrun)",
                       description=HARVEST_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p)
    p.add_argument("--sites", required=True, action="append",
                   help='site names or globs, e.g. "blocks.*.resid_post" (repeatable)')
    p.add_argument("--out", required=True, help="output directory (new, empty, or a harvest to resume)")
    p.add_argument("--corpus", default=None, help=".txt (one document per blank-line block) or .jsonl (field 'text')")
    p.add_argument("--split", default="blank", choices=("blank", "line"), help="documents in a .txt: blocks or lines")
    p.add_argument("--context", type=int, default=128, help="tokens per row, BOS first (default 128)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--store-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the stored activations (default bfloat16)")
    p.add_argument("--shard-tokens", type=int, default=None,
                   help="tokens per shard (default: as many rows as fit in 256 MiB of activations)")
    p.add_argument("--no-pack", action="store_true", help="one document per row (truncated, padded) instead of packing")


def run(args: argparse.Namespace, load_model: Any) -> int:
    """Load the model, harvest, print where the store is."""
    import torch

    from .corpus import Corpus, CorpusError
    from .default import stdlib_corpus
    from .harvest import HarvestError, harvest

    rank = int(os.environ.get("RANK", "0"))
    model = load_model(args.model, args.dtype, args.device)
    try:
        corpus = Corpus(args.corpus, split=args.split) if args.corpus else stdlib_corpus()
        store = harvest(model, corpus, args.sites, args.out, context=args.context, batch_size=args.batch_size,
                        dtype=getattr(torch, args.store_dtype), max_tokens=args.max_tokens,
                        pack=not args.no_pack, shard_tokens=args.shard_tokens, model_source=args.model,
                        progress=rank == 0)
    except (HarvestError, CorpusError, ValueError, KeyError) as e:
        raise CLIError(str(e)) from e
    if rank == 0:
        print(store, file=sys.stdout)
    return 0


__all__ = ["add_parser", "run", "HARVEST_HELP"]

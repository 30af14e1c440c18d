"""A harvest on the tiny test model, shared by ``test_data.py`` and the processes it starts.

``python harvest_worker.py OUT [--sleep S] [--rows N]`` builds the same model (``support.TINY``,
seed 0, a char-level tokenizer) and corpus as the tests do in-process, prints ``ready`` once
everything is imported and built, and harvests into ``OUT``. ``--sleep`` slows every forward
pass down (so that a test can kill the process part-way). Under torchrun-like environment
variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) the harvest joins the
process group itself (gloo), as ``interp.data.harvest`` does under ``torchrun``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support

import support  # noqa: E402
import torch  # noqa: E402

SITES = ["blocks.1.resid_post", "blocks.3.mlp.hidden", "embed"]
CONTEXT, BATCH, SHARD_TOKENS = 16, 2, 64  # 4 rows per shard, 2 forwards per shard
ROWS = 40  # 10 shards
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "paper", "orbit", "quiet", "Mars", "x=1;"]


class CharTokenizer:
    """One token per character: printable ASCII c -> 3 + ord(c) - 32, newline -> 98, anything
    else -> 99; BOS is 2 and 0..2 decode to nothing. Invertible on printable ASCII and newlines."""

    bos_id, pad_id, eos_id = 2, 0, 1

    @staticmethod
    def token(c: str) -> int:
        o = ord(c)
        return 3 + o - 32 if 32 <= o < 127 else (98 if c == "\n" else 99)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([2] if bos else []) + [self.token(c) for c in text]

    def decode(self, ids) -> str:
        out = []
        for i in (int(i) for i in ids):
            if i >= 3:
                out.append("\n" if i == 98 else "\ufffd" if i == 99 else chr(i - 3 + 32))
        return "".join(out)

    def to_str_tokens(self, ids) -> list[str]:
        return [self.decode([i]) or "<bos>" for i in ids]


def documents(n: int = 30, seed: int = 0) -> list[str]:
    """``n`` made-up documents of 3..25 words (fixed by ``seed``)."""
    rng = random.Random(seed)
    return [f"Doc {d}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for d in range(n)]


def build_model(seed: int = 0):
    """The tiny test model with the char-level tokenizer (the same weights in every process)."""
    return support.make_model(support.TINY, seed=seed, tokenizer=CharTokenizer())


def run(model, out: str | Path, *, rows: int = ROWS, sites=SITES, **kwargs):
    """The harvest the kill/resume and distributed tests compare (keywords override the settings)."""
    settings = dict(context=CONTEXT, batch_size=BATCH, shard_tokens=SHARD_TOKENS, max_tokens=rows * CONTEXT,
                    progress=False)
    settings.update(kwargs)
    from interp.data import harvest

    return harvest(model, documents(), sites, out, **settings)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to wait before every forward pass")
    p.add_argument("--rows", type=int, default=ROWS)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = build_model()
    if args.sleep:
        forward = model.run_with_cache

        def slow(*a, **k):
            time.sleep(args.sleep)
            return forward(*a, **k)

        model.run_with_cache = slow
    print("ready", flush=True)
    store = run(model, args.out, rows=args.rows)
    print(f"done {store.n_rows}", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

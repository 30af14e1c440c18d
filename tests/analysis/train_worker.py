"""A training run shared by ``test_train.py`` and the process it starts (and kills).

``python train_worker.py CHECKPOINT_DIR [--sleep S]`` builds the same planted data as the test
(:func:`planted`, fixed by its seed), prints ``ready``, and runs :func:`run` with
``checkpoint_dir=CHECKPOINT_DIR``. ``--sleep`` waits that long before every training step, so a test
can kill the process part-way between two checkpoints.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

SETTINGS = dict(kind="jumprelu", d_sae=32, steps=60, seed=3, batch_size=64, lr=1e-2, initial_threshold=0.1,
                bandwidth=0.05, warmup_steps=20, sparsity_coefficient=1.0, progress=False)
CHECKPOINT_EVERY = 10


def planted(n: int = 8192, d: int = 32, m: int = 64, active: int = 3, noise: float = 0.01,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` vectors in ``d`` dimensions, each a positive combination (magnitudes in [0.5, 1.5)) of
    ``active`` of ``m`` random unit directions, plus Gaussian noise of std ``noise``. Returns
    ``(x [n, d], directions [m, d])``."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(m, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(1)[:, :active]
    mags = torch.rand(n, active, generator=g) + 0.5
    codes = torch.zeros(n, m).scatter(1, idx, mags)
    return codes @ dirs + noise * torch.randn(n, d, generator=g), dirs


def data() -> torch.Tensor:
    """The resume test's training data: 2048 planted vectors in 16 dimensions."""
    return planted(n=2048, d=16, m=24, seed=7)[0]


def run(checkpoint_dir: str | Path | None = None, **overrides):
    from interp.features.training import train

    settings = {**SETTINGS, **overrides}
    if checkpoint_dir is not None:
        settings.update(checkpoint_dir=checkpoint_dir, checkpoint_every=CHECKPOINT_EVERY)
    return train(data(), **settings)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint_dir")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to wait before every step")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the test process (conftest): the same arithmetic, bit for bit
    T = importlib.import_module("interp.features.training")
    if args.sleep:
        step = T._Trainer.step

        def slow(self, *a, **k):
            time.sleep(args.sleep)
            return step(self, *a, **k)

        T._Trainer.step = slow
    print("ready", flush=True)
    d = run(args.checkpoint_dir)
    print(f"done {d.training_log.final['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

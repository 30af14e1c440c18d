"""Training runs shared by ``test_train.py`` / ``test_train_clt.py`` and the process they start (and kill).

``python train_worker.py CHECKPOINT_DIR [--sleep S] [--clt]`` builds the same planted data as the
test (:func:`planted`, or :func:`planted_clt` with ``--clt``, fixed by their seeds), prints
``ready``, and runs :func:`run` (or :func:`run_clt`) with ``checkpoint_dir=CHECKPOINT_DIR``.
``--sleep`` waits that long before every training step, so a test can kill the process part-way
between two checkpoints.
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


def planted_clt(n: int = 4096, n_layers: int = 3, d: int = 16, m: int = 12, active: int = 2, noise: float = 0.01,
                seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Cross-layer structure: at each layer ``i``, ``m`` latent features (``active`` of them on per
    vector, magnitudes in [0.5, 1.5), independent across layers) are read from random unit
    directions of the MLP input ``x_i`` and each writes a known decoder vector to *every* MLP output
    ``o >= i`` (``decoders[i] [m, n_layers - i, d]``, unit norm over the outputs concatenated).
    Output ``o`` is the sum of what layers ``0..o``'s features write, so the part from layer ``i < o``
    can only be predicted from ``x_i``. Gaussian noise of std ``noise`` on everything. Returns
    ``(inputs, outputs, decoders)``, lists over layers."""
    g = torch.Generator().manual_seed(seed)
    enc = [torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1) for _ in range(n_layers)]
    decoders = []
    for i in range(n_layers):
        dec = torch.randn(m, n_layers - i, d, generator=g)
        decoders.append(dec / dec.flatten(1).norm(dim=1)[:, None, None])
    codes = []
    for _ in range(n_layers):
        idx = torch.rand(n, m, generator=g).argsort(1)[:, :active]
        codes.append(torch.zeros(n, m).scatter(1, idx, torch.rand(n, active, generator=g) + 0.5))
    xs = [codes[i] @ enc[i] + noise * torch.randn(n, d, generator=g) for i in range(n_layers)]
    ys = [sum(codes[i] @ decoders[i][:, o - i] for i in range(o + 1)) + noise * torch.randn(n, d, generator=g)
          for o in range(n_layers)]
    return xs, ys, decoders


CLT_SETTINGS = dict(kind="clt", d_sae=16, steps=60, seed=2, batch_size=64, lr=1e-2, l0=2.0, skip=True, progress=False)


def run_clt(checkpoint_dir: str | Path | None = None, **overrides):
    """A JumpReLU CLT with the l0 controller and a skip term on :func:`planted_clt` data (1024 rows)."""
    from interp.features.training import train

    xs, ys, _ = planted_clt(n=1024, seed=9)
    settings = {**CLT_SETTINGS, **overrides}
    if checkpoint_dir is not None:
        settings.update(checkpoint_dir=checkpoint_dir, checkpoint_every=CHECKPOINT_EVERY)
    return train((xs, ys), **settings)


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
    p.add_argument("--clt", action="store_true", help="run_clt instead of run")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the test process (conftest): the same arithmetic, bit for bit
    T = importlib.import_module("interp.features.training")
    cls = importlib.import_module("interp.features.trainer_clt").CLTTrainer if args.clt else T.Trainer
    if args.sleep:
        step = cls.step

        def slow(self, *a, **k):
            time.sleep(args.sleep)
            return step(self, *a, **k)

        cls.step = slow
    print("ready", flush=True)
    d = (run_clt if args.clt else run)(args.checkpoint_dir)
    print(f"done {d.training_log.final['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Planted-feature recovery of ``interp.features.train`` with its DEFAULT recipe (the issue's case).

``python -m bench.train_planted [--n 200000] [--d 64] [--m 512] [--active 4] [--d-sae 1024]
[--steps 4000] [--batch 1024] [--scale 1] [--kinds jumprelu topk] [--device cpu] [--set KEY=VALUE ...]`` builds ``n``
vectors in ``d`` dimensions, each a non-negative mix (magnitudes in [0.5, 1.5)) of ``active`` of
``m`` random unit directions plus Gaussian noise of std 0.01, multiplied by ``scale``; trains each
kind with seed 0 and no tuned option (TopK gets ``k = 2 * active``); prints per kind the mean over
the planted directions of the best decoder cosine, the L0 on 8192 vectors, the dead fraction (no
firing on those vectors), the training log's warnings, and the wall time.
"""

from __future__ import annotations

import argparse
import time

import torch

from interp.features.training import train


def planted(n: int, d: int, m: int, active: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(m, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n, m).scatter(1, idx, torch.rand(n, active, generator=g) + 0.5)
    return codes @ dirs + 0.01 * torch.randn(n, d, generator=g), dirs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("n", 200_000), ("d", 64), ("m", 512), ("active", 4), ("d-sae", 1024), ("steps", 4000),
                          ("batch", 1024)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--kinds", nargs="+", default=["jumprelu", "topk"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="options for the JumpReLU run (numbers), e.g. l0=4 or lr=2e-4")
    a = p.parse_args(argv)
    x, dirs = planted(a.n, a.d, a.m, a.active)
    x = (x * a.scale).to(a.device)
    print(f"n={a.n} d={a.d} m={a.m} active={a.active} d_sae={a.d_sae} steps={a.steps} batch={a.batch} "
          f"scale={a.scale} device={a.device} torch threads={torch.get_num_threads()}")
    for kind in a.kinds:
        extra: dict = {"k": 2 * a.active} if kind == "topk" else {
            k: float(v) if any(c in v for c in ".e") else int(v) for k, v in (kv.split("=") for kv in a.set)}
        t0 = time.perf_counter()
        sae = train(x, kind, d_sae=a.d_sae, steps=a.steps, batch_size=a.batch, seed=0, progress=False, **extra)
        if a.device != "cpu":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        sae = sae.to("cpu")
        cos = float((dirs @ sae.W_dec.T).max(1).values.mean())
        fired = sae.encode(x[:8192].cpu()) > 0
        l0, dead = float(fired.sum(-1).float().mean()), float((~fired.any(0)).float().mean())
        print(f"{kind:9s} recovery {cos:.3f}  L0 {l0:.2f}  dead {dead:.3f}  {sec:.1f} s  "
              f"warnings {sae.training_log.warnings}")


if __name__ == "__main__":
    main()

"""How good are the attribution-patching estimates? Plain AtP, integrated gradients and AtP*
against real activation patching, on the demo model (the real Gemma 3 270M), over several
names-swap and factual-recall prompt pairs, metric ``interp.metrics.logit_diff``.

For each method and sweep (``resid_pre`` cells, ``attn.z`` heads) the table gives, averaged over
the pairs: the sign agreement on the top-20 cells by ``|actual|``
(``compare(actual, estimate).sign_agreement(top=20)``), the Pearson correlation with actual
patching (``.correlation()``), the cost in forward-equivalents and the wall time per pair.

Cost: every forward through the model is counted by a hook on ``blocks.*.resid_mid`` (rows x
tokens x layers, divided by one full forward's ``layers x tokens``); a forward whose activations
carry gradients is counted 3 times (its backward ~ 2 forwards). AtP*'s exact attention
recomputes do not go through the model: their arithmetic (projections, the attention itself, the
MLP between a site and the attention reading it) is counted in FLOPs and divided by one forward's
FLOPs. Activation patching (the reference, ``patch_sweeps`` of both sweeps at once) is counted the
same way. GradDrop (``graddrop=True``) returns magnitudes: no sign agreement; its correlation is
with ``|actual|``. The sweeps of one method share their runs, so each pair's cost and time is
that of one call computing both sweeps.

Run: ``python -m bench.atp`` (all default pairs, one thread), ``python -m bench.atp --prompts 2`` (smoke).
``agreement_table(model, pairs, ...)`` returns the rows (dicts) for other scripts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

# (clean, corrupt, correct answer, wrong answer): same token count within each pair
DEFAULT_PAIRS: list[tuple[str, str, str, str]] = [
    ("When Mary and John went to the store, John gave a drink to",
     "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    ("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
    ("When Alice and Bob went to the park, Bob handed a ball to",
     "When Alice and Bob went to the park, Alice handed a ball to", " Alice", " Bob"),
    ("The capital of Germany is", "The capital of Spain is", " Berlin", " Madrid"),
    ("After Tom and Sarah had lunch, Sarah wrote a letter to",
     "After Tom and Sarah had lunch, Tom wrote a letter to", " Tom", " Sarah"),
    ("The Eiffel Tower is in the city of", "The Colosseum is in the city of", " Paris", " Rome"),
]

# (label, attribution_patches keywords)
DEFAULT_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("atp", {"method": "atp"}),
    ("ig (4 steps)", {"method": "ig", "steps": 4}),
    ("ig (16 steps)", {"method": "ig", "steps": 16}),
    ("atp*", {"method": "atp*"}),
    ("atp* (graddrop)", {"method": "atp*", "graddrop": True}),
]


class Cost:
    """Forward-equivalents: model passes (counted by a hook) plus extra FLOPs."""

    def __init__(self, model: Any, seq: int):
        self.model, self.seq = model, seq
        self.passes = 0.0
        self.flops = 0.0

    def hook(self, x: torch.Tensor, site: Any) -> None:
        rows, tokens = x.shape[0], x.shape[1]
        weight = 3.0 if (torch.is_grad_enabled() and x.requires_grad) else 1.0
        self.passes += weight * rows * tokens / (self.model.cfg.n_layers * self.seq)

    def forward_flops(self) -> float:
        c = self.model.cfg
        per_token_layer = (2 * c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.d_head
                           + 2 * c.n_heads * c.d_head * c.d_model + 6 * c.d_model * c.d_mlp
                           + 2 * c.n_heads * c.d_head * self.seq)
        return float(self.seq * c.n_layers * per_token_layer)

    @property
    def total(self) -> float:
        return self.passes + self.flops / self.forward_flops()


@contextmanager
def counting(model: Any, seq: int):
    """Count the model passes and AtP*'s recompute FLOPs of the code in the block."""
    from interp.circuits import atp_star

    cost = Cost(model, seq)
    c = model.cfg
    originals = {n: getattr(atp_star, n) for n in ("_qkv", "_attend", "_mlp_add")}

    def qkv(model_: Any, layer: int, x: torch.Tensor, pos: torch.Tensor) -> Any:
        cost.flops += 2 * x.shape[0] * x.shape[1] * c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.d_head
        return originals["_qkv"](model_, layer, x, pos)

    def attend(model_: Any, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        cost.flops += 4 * q.shape[0] * c.n_heads * q.shape[1] ** 2 * c.d_head
        return originals["_attend"](model_, layer, q, k, v)

    def mlp_add(block: Any, mid: torch.Tensor) -> Any:
        cost.flops += 6 * mid[..., 0].numel() * c.d_model * c.d_mlp
        return originals["_mlp_add"](block, mid)

    atp_star._qkv, atp_star._attend, atp_star._mlp_add = qkv, attend, mlp_add  # type: ignore[assignment]
    try:
        with model.hooks({"blocks.*.resid_mid": cost.hook}):
            yield cost
    finally:
        for n, f in originals.items():
            setattr(atp_star, n, f)


def agreement_table(model: Any, pairs: Sequence[tuple[str, str, str, str]],
                    methods: Sequence[tuple[str, dict[str, Any]]] = DEFAULT_METHODS,
                    sites: Sequence[str] = ("resid_pre", "attn.z"), top: int = 20) -> list[dict[str, Any]]:
    """One row per (method, site): ``method``, ``site``, ``sign_agreement`` (top-``top`` cells by
    |actual|, mean over pairs; None for GradDrop's magnitudes), ``correlation`` (mean over pairs),
    ``forward_equivalents`` and ``seconds`` (per pair, median; one call computes every site),
    ``pairs``. The first rows are activation patching itself (agreement 1 by definition)."""
    from interp.attribution import attribution_patches
    from interp.metrics import logit_diff
    from interp.patching import compare, patch_sweeps

    stats: dict[tuple[str, str], dict[str, list[float]]] = {}

    def add(label: str, site: str, key: str, value: float) -> None:
        stats.setdefault((label, site), {}).setdefault(key, []).append(value)

    for clean, corrupt, right, wrong in pairs:
        metric = logit_diff(right, wrong)
        seq = model.to_tokens(clean).shape[1]
        with counting(model, seq) as cost:
            t0 = time.perf_counter()
            actual = patch_sweeps(model, clean, corrupt, metric, list(sites), progress=False)
            seconds = time.perf_counter() - t0
        for site in sites:
            add("activation patching", site, "cost", cost.total)
            add("activation patching", site, "seconds", seconds)
        for label, kwargs in methods:
            with counting(model, seq) as cost:
                t0 = time.perf_counter()
                est = attribution_patches(model, clean, corrupt, metric, list(sites), **kwargs)
                seconds = time.perf_counter() - t0
            for site in sites:
                a = actual[site]
                if kwargs.get("graddrop"):  # magnitudes: compare with |actual|
                    both = compare(replace(a, values=a.values.abs()), est[site])
                else:
                    both = compare(a, est[site])
                    add(label, site, "sign", both.sign_agreement(top=top))
                add(label, site, "corr", both.correlation())
                add(label, site, "cost", cost.total)
                add(label, site, "seconds", seconds)
    rows = []
    for (label, site), s in stats.items():
        rows.append({"method": label, "site": site,
                     "sign_agreement": statistics.mean(s["sign"]) if "sign" in s else (
                         1.0 if label == "activation patching" else None),
                     "correlation": statistics.mean(s["corr"]) if "corr" in s else 1.0,
                     "forward_equivalents": statistics.median(s["cost"]),
                     "seconds": statistics.median(s["seconds"]), "pairs": len(s["cost"])})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    from bench.common import environment, markdown_table
    from interp.model import Gemma3

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=len(DEFAULT_PAIRS),
                        help=f"how many of the {len(DEFAULT_PAIRS)} default prompt pairs (names swaps and facts)")
    parser.add_argument("--top", type=int, default=20, help="cells by |actual| for the sign agreement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a small shared machine more threads only add noise)")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(DEFAULT_PAIRS):
        parser.error(f"--prompts must be between 1 and {len(DEFAULT_PAIRS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Gemma3.from_pretrained("demo", device=args.device)
    pairs = DEFAULT_PAIRS[:args.prompts]
    rows = agreement_table(model, pairs, top=args.top)
    print(f"demo model (Gemma 3 270M, fp32, {args.device}); {len(pairs)} prompt pairs; metric logit_diff; "
          f"sign agreement on the top {args.top} cells by |actual|, mean over pairs; cost and time per pair "
          "(median; one call computes both sweeps)\n")
    table = [[r["method"], r["site"], "n/a" if r["sign_agreement"] is None else f"{r['sign_agreement']:.0%}",
              f"{r['correlation']:.3f}", f"{r['forward_equivalents']:.1f}", f"{r['seconds']:.2f}"] for r in rows]
    print(markdown_table(["method", "sweep", f"sign agreement (top {args.top})", "correlation",
                          "forward-equivalents", "seconds"], table))
    print("\n" + environment())


if __name__ == "__main__":
    main()

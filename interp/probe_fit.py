"""The fitting behind :func:`interp.probes.probe`: the stratified split, L2-penalised logistic
regression (L-BFGS) and ridge regression (closed form), each for many sites at once
(``x [sites, n, d]``), and R².

>>> import torch
>>> x = torch.randn(1, 200, 3, generator=torch.Generator().manual_seed(0))
>>> x = x - x.mean(1, keepdim=True)                               # ridge takes centred features
>>> w, b = fit_ridge(x, 2 * x[0, :, :1], weight_decay=0.0)     # y = 2 * dimension 0
>>> [round(float(v), 3) for v in w[0, :, 0]]
[2.0, 0.0, 0.0]
"""

from __future__ import annotations

import torch


def split_rows(n: int, groups: torch.Tensor | None, test_fraction: float, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test row indices; stratified by ``groups`` (class indices) when given."""
    gen = torch.Generator().manual_seed(seed)
    test: list[torch.Tensor] = []
    train: list[torch.Tensor] = []
    members = [torch.arange(n)] if groups is None else [(groups == c).nonzero().flatten()
                                                       for c in range(int(groups.max()) + 1)]
    for idx in members:
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(len(idx) - 1, max(1 if len(idx) >= 2 else 0, round(test_fraction * len(idx))))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, steps: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-penalised logistic regression of every site at once: ``x [S, n, d]``, ``y [n]``.
    Returns ``W [S, d, C']``, ``b [S, C']`` (``C' = 1`` for two classes)."""
    S, _, d = x.shape
    out = 1 if n_classes == 2 else n_classes
    w = torch.zeros(S, d, out, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(S, out, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, max_eval=steps * 2, tolerance_grad=1e-9,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")
    target = y.float()[None, :].expand(S, -1) if out == 1 else y[None, :].expand(S, -1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.baddbmm(b[:, None, :], x, w)  # [S, n, C']
        if out == 1:
            losses = torch.nn.functional.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")
        else:
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        loss = losses.mean(1).sum() + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_ridge(x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of every site at once (closed form, float64): ``x [S, n, d]`` (centred),
    ``y [n, k]``. Minimises ``mean((x w + b - y)^2) + weight_decay * |w|^2``."""
    S, n, d = x.shape
    x64, y64 = x.double(), y.double()
    y_mean = y64.mean(0)
    gram = x64.transpose(1, 2) @ x64 / n + weight_decay * torch.eye(d, dtype=torch.float64)  # [S, d, d]
    rhs = x64.transpose(1, 2) @ (y64 - y_mean) / n  # [S, d, k]
    w = torch.linalg.solve(gram, rhs)
    return w.to(x.dtype), y_mean.to(x.dtype)[None, :].expand(S, -1).clone()


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R² per site: ``pred [S, n, k]``, ``y [n, k]`` (averaged over targets)."""
    ss_res = ((pred - y) ** 2).sum(1)  # [S, k]
    ss_tot = ((y - y.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return (1 - ss_res / ss_tot).mean(-1)


__all__ = ["split_rows", "fit_logistic", "fit_ridge", "r2_score"]

"""Linear probes: what a site's activations say about a label, at every site in one fit.

:func:`probe` trains one probe per site on ``[n, d]`` activations (one example per row) and
scores it on a held-out split. On a GPU all sites are fitted in one optimisation: the features
are stacked ``[sites, n, d]`` and the loss is the sum of the sites' losses, which is separable,
so the result is that of fitting each site alone, at the cost of one run. On a CPU each site is
fitted on its own (its data then stays in the processor's cache: about 5x faster for the 26
sites of the 1B model, measured by ``bench/harvest.py``).

- ``kind="logistic"``: classification (two classes: one logit; more: a softmax), L2-penalised,
  full-batch L-BFGS. Scores are accuracies.
- ``kind="linear"``: ridge regression of a real target, in closed form (one batched
  ``torch.linalg.solve``). Scores are R².

Features are standardised per site and dimension with the training split's statistics; the
returned weights and directions are mapped back to the original activation space, so a
direction can be added to the residual stream (see :func:`interp.add`).

>>> import torch
>>> gen = torch.Generator().manual_seed(0)
>>> x = torch.randn(400, 8, generator=gen)
>>> labels = (x[:, 0] > 0).long()                          # site "a" holds the label, "b" does not
>>> result = probe({"a": x, "b": torch.randn(400, 8, generator=gen)}, labels)
>>> result.best().label, result.test_score[0] > 0.9
('a', tensor(True))
>>> float(result.directions[0, 0]) > 0.9                   # the direction is (nearly) dimension 0
True
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch

from .hooks import NonFiniteError
from .hooks.checks import is_int
from .plots import escape_token, line
from .probe_fit import fit_logistic, fit_ridge, r2_score, split_rows
from .tokens import Top, top_entries

PROBE_KINDS = ("logistic", "linear")


class ProbeError(ValueError):
    """Probe inputs that cannot be fitted: mismatched labels, one class, a bad source or split."""


# ---------------------------------------------------------------------- result
@dataclass
class ProbeResult:
    """What :func:`probe` returns; every per-site tensor has the sites first.

    ``train_score``/``test_score [sites]`` are accuracies (``metric == "accuracy"``) or R²
    (``metric == "r2"``). ``weights [sites, d, outputs]`` and ``bias [sites, outputs]`` are
    the probe in the original activation space (``x @ weights + bias`` gives the logits or the
    prediction; ``outputs`` is 1 for two classes or one target). ``directions`` are unit vectors
    in the same space: ``[sites, d]`` for two classes (pointing towards ``classes[1]``) or one
    target, ``[sites, outputs, d]`` for each class or each target otherwise. ``mean``/``std
    [sites, d]`` are the training statistics the probe standardised with; ``train_rows`` and
    ``test_rows`` the rows of each split; ``chance`` the test accuracy of always answering the
    most frequent class (0 for R²).
    """

    sites: list[str]
    kind: str
    metric: str
    classes: list[Any]
    train_score: torch.Tensor
    test_score: torch.Tensor
    weights: torch.Tensor
    bias: torch.Tensor
    directions: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    train_rows: torch.Tensor
    test_rows: torch.Tensor
    chance: float
    seed: int

    @property
    def n_train(self) -> int:
        """Rows the probes were fitted on."""
        return len(self.train_rows)

    @property
    def n_test(self) -> int:
        """Held-out rows the test scores come from."""
        return len(self.test_rows)

    def __repr__(self) -> str:
        b = self.best()
        return (f"ProbeResult({self.kind}, {len(self.sites)} sites, {self.n_train} train / {self.n_test} test, "
                f"best {b.label} test {self.metric} {b.value:.3f})")

    def index(self, site: str | int) -> int:
        """The row of ``site`` (a name, or an index into :attr:`sites`)."""
        if isinstance(site, int) and not isinstance(site, bool):
            if not -len(self.sites) <= site < len(self.sites):
                raise IndexError(f"site index {site} is outside the probe's {len(self.sites)} sites")
            return site % len(self.sites)
        if site not in self.sites:
            raise KeyError(f"{site!r} was not probed; the sites are {self.sites}")
        return self.sites.index(site)

    def direction(self, site: str | int) -> torch.Tensor:
        """The unit direction(s) of one site, in the original activation space."""
        return self.directions[self.index(site)]

    def predict(self, x: torch.Tensor, site: str | int) -> torch.Tensor:
        """The probe of ``site`` applied to activations ``[n, d]`` (or ``[n, *dims]``): class
        indices into :attr:`classes` (logistic) or predictions ``[n]``/``[n, outputs]`` (linear)."""
        i = self.index(site)
        out = x.reshape(x.shape[0], -1).to(self.weights.dtype) @ self.weights[i] + self.bias[i]
        if self.kind == "linear":
            return out[:, 0] if out.shape[1] == 1 else out
        return (out[:, 0] > 0).long() if out.shape[1] == 1 else out.argmax(-1)

    def table(self) -> list[tuple[str, float, float]]:
        """``(site, train score, test score)`` per site."""
        return [(s, float(a), float(b)) for s, a, b in zip(self.sites, self.train_score, self.test_score)]

    def top(self, k: int = 5) -> list[Top]:
        """The ``k`` sites with the highest test score, best first (index ``(site index,)``)."""
        return top_entries(self.test_score, k, lambda i: self.sites[i[0]], by_abs=False)

    def best(self) -> Top:
        """The site with the highest test score."""
        return self.top(1)[0]

    def plot(self, title: str | None = None) -> go.Figure:
        """Train and test score per site (lines; chance level dashed for classification)."""
        name = "accuracy" if self.metric == "accuracy" else "R²"
        fig = line({"train": self.train_score, "test": self.test_score}, [escape_token(s) for s in self.sites],
                   title=title or f"{self.kind.capitalize()} probe: {name} per site "
                                  f"({self.n_train} train, {self.n_test} held out)",
                   x_title="site", y_title=name)
        if self.metric == "accuracy":
            fig.add_hline(y=self.chance, line_dash="dash", line_color="gray", annotation_text="chance")
        return fig


# ---------------------------------------------------------------------- features
def _site_names(available: Sequence[str], sites: str | Sequence[str] | None) -> list[str]:
    if sites is None:
        return list(available)
    patterns = [sites] if isinstance(sites, str) else list(sites)
    out: list[str] = []
    for pattern in patterns:
        hits = [s for s in available if fnmatch.fnmatchcase(s, pattern)]
        if not hits:
            raise ProbeError(f"site {pattern!r} is not in the source; it has {list(available)}")
        out += [s for s in hits if s not in out]
    return out


def _store_features(store: Any, site: str, positions: int | str) -> torch.Tensor:
    """``[rows, d]``: per row, the ``positions``-th valid harvested position (or their mean)."""
    view = store[site]
    valid = store.valid()  # [rows, P]
    counts = valid.sum(1)
    if bool((counts == 0).any()):
        row = int((counts == 0).nonzero()[0])
        raise ProbeError(f"row {row} of the store has no harvested token (only padding) at {site}")
    if positions != "mean":
        if not is_int(positions):
            raise ProbeError(f"positions must be an int (a valid token of each row; -1 = the last) or 'mean', "
                             f"got {positions!r}")
        if positions >= 0:
            short = (counts <= positions).nonzero()
            if short.numel():
                r = int(short[0])
                raise ProbeError(f"positions={positions}, but row {r} has only {int(counts[r])} harvested tokens")
            col = positions
        else:
            short = (counts < -positions).nonzero()
            if short.numel():
                r = int(short[0])
                raise ProbeError(f"positions={positions}, but row {r} has only {int(counts[r])} harvested tokens")
            col = None
    out = []
    step = max(1, store.shard_rows)
    for lo in range(0, store.n_rows, step):
        hi = min(lo + step, store.n_rows)
        block = view[lo:hi].float().flatten(2)  # [rows, P, d]
        v = valid[lo:hi]
        if positions == "mean":
            out.append((block * v[..., None]).sum(1) / v.sum(1, keepdim=True))
            continue
        order = v.cumsum(1) - 1  # the index of each valid position among its row's valid ones
        target = torch.full((hi - lo,), col, dtype=torch.long) if col is not None else v.sum(1) + int(positions)
        pick = (v & (order == target[:, None])).float().argmax(1)
        out.append(block[torch.arange(hi - lo), pick])
    return torch.cat(out)


def _stack(names: list[str], feats: list[torch.Tensor]) -> torch.Tensor:
    shapes = {name: tuple(f.shape) for name, f in zip(names, feats)}
    if len(set(shapes.values())) > 1:
        raise ProbeError(f"every site must give [n, d] of one shape to be probed together; got {shapes} "
                         "(probe sites of other widths in separate calls)")
    return torch.stack(feats)


def _features(source: Any, wanted: str | Sequence[str] | None, positions: int | str
              ) -> tuple[list[str], torch.Tensor]:
    """Site names and stacked features ``[S, n, d]`` (float32, on the CPU)."""
    from .data.store import ActivationStore

    if isinstance(source, ActivationStore):
        names = _site_names(source.sites, wanted)
        return names, _stack(names, [_store_features(source, s, positions) for s in names])
    if isinstance(source, Mapping):
        names = _site_names([str(k) for k in source], wanted)
        tensors = {str(k): v for k, v in source.items()}
        feats = []
        for s in names:
            t = torch.as_tensor(tensors[s])
            if t.dim() < 2:
                raise ProbeError(f"activations of {s!r} must be [n, d], got shape {tuple(t.shape)}")
            feats.append(t.detach().float().cpu().flatten(1))
        return names, _stack(names, feats)
    if isinstance(source, torch.Tensor):
        if source.dim() != 3:
            raise ProbeError(f"a tensor source is [sites, n, d], got shape {tuple(source.shape)}")
        if wanted is None:
            names = [str(i) for i in range(source.shape[0])]
        else:
            names = [wanted] if isinstance(wanted, str) else [str(s) for s in wanted]
            if len(names) != source.shape[0]:
                raise ProbeError(f"names= gives {len(names)} names, but the tensor holds {source.shape[0]} sites")
        return names, source.detach().float().cpu()
    raise ProbeError(f"source must be an ActivationStore, a dict {{site: [n, d]}} or a tensor [sites, n, d], "
                     f"got {type(source).__name__}")


def probe(source: Any, labels: Any, names: str | Sequence[str] | None = None, kind: str = "logistic", *,
          test_fraction: float = 0.25, seed: int = 0, weight_decay: float = 1e-3, steps: int = 500,
          positions: int | str = -1) -> ProbeResult:
    """Fit one linear probe per site and score it on held-out rows.

    ``source`` is an :class:`~interp.data.ActivationStore` (one example per row: the
    ``positions``-th harvested token of each row that is not padding, ``-1`` = the last, or
    ``"mean"`` over them), a dict ``{site: [n, d]}`` or a tensor ``[sites, n, d]``. ``labels``
    has one entry per row: class labels of any sortable kind for ``kind="logistic"``, numbers
    ``[n]`` or ``[n, k]`` for ``kind="linear"``. ``names`` picks sites of a store or dict (names
    or globs such as ``"blocks.*.resid_post"``), or names the rows of a tensor.

    The held-out split (``test_fraction`` of the rows, stratified by class) depends only on
    ``seed``. ``weight_decay`` is the L2 penalty on the standardised weights (``0.5 * wd *
    |w|^2`` added to the mean cross-entropy; ``wd * |w|^2`` added to the mean squared error);
    ``steps`` bounds the L-BFGS iterations of a logistic fit.

    >>> result = probe(store, labels, "blocks.*.resid_post")    # doctest: +SKIP
    >>> result.plot(); result.best()                             # doctest: +SKIP
    >>> steer = interp.add(result.direction(result.best().label) * 8.0)   # doctest: +SKIP
    """
    if kind not in PROBE_KINDS:
        raise ProbeError(f"kind must be one of {PROBE_KINDS}, got {kind!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ProbeError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    if not float(weight_decay) >= 0:
        raise ProbeError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not is_int(steps) or steps < 1:
        raise ProbeError(f"steps must be a positive int, got {steps!r}")
    names, feats = _features(source, names, positions)
    S, n, d = feats.shape
    if S == 0:
        raise ProbeError("no site to probe")

    raw = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if len(raw) != n:
        raise ProbeError(f"labels has {len(raw)} entries, but the activations have {n} rows (one label per row)")
    bad = (~torch.isfinite(feats)).flatten(2).any(-1)  # [S, n]
    if bool(bad.any()):
        s, r = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(f"probe: the activations of {names[s]!r} hold NaN or inf ({int(bad[s].sum())} of {n} "
                             f"rows, the first row {r}); drop those rows or fix the harvest")

    classes: list[Any] = []
    if kind == "logistic":
        try:
            classes = sorted(set(raw))
        except TypeError:
            raise ProbeError("class labels must be sortable and of one kind (ints, bools or strings)") from None
        if len(classes) < 2:
            raise ProbeError(f"labels hold a single class ({classes[0]!r} for all {n} rows); a probe needs two or more")
        lookup = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([lookup[v] for v in raw], dtype=torch.long)
        train, test = split_rows(n, y, test_fraction, seed)
    else:
        y = torch.as_tensor(raw, dtype=torch.float32)
        if y.dim() == 1:
            y = y[:, None]
        if y.dim() != 2 or not bool(torch.isfinite(y).all()):
            raise ProbeError("linear targets must be finite numbers, [n] or [n, k]")
        train, test = split_rows(n, None, test_fraction, seed)
    if len(train) == 0 or len(test) == 0:
        raise ProbeError(f"{n} rows are too few to hold out test_fraction={test_fraction}")

    x_train = feats[:, train]
    mean = x_train.mean(1)  # [S, d]
    std = x_train.std(1, unbiased=False)
    std = torch.where(std > 1e-6 * std.amax(1, keepdim=True).clamp_min(1e-30), std, torch.ones_like(std))
    z = (feats - mean[:, None]) / std[:, None]  # [S, n, d]

    if kind == "logistic":
        if z.device.type == "cpu":  # one site at a time: its data stays in cache (about 5x faster, bench/harvest.py)
            fits = [fit_logistic(z[i:i + 1, train], y[train], len(classes), weight_decay, steps) for i in range(S)]
            w, b = torch.cat([f[0] for f in fits]), torch.cat([f[1] for f in fits])
        else:
            w, b = fit_logistic(z[:, train], y[train], len(classes), weight_decay, steps)
        logits = torch.baddbmm(b[:, None, :], z, w)  # [S, n, C']
        pred = (logits[..., 0] > 0).long() if w.shape[-1] == 1 else logits.argmax(-1)
        correct = (pred == y).float()
        train_score, test_score = correct[:, train].mean(1), correct[:, test].mean(1)
        counts = torch.bincount(y[test], minlength=len(classes))
        chance = float(counts.max()) / len(test)
        metric = "accuracy"
    else:
        w, b = fit_ridge(z[:, train], y[train], weight_decay)
        out = torch.baddbmm(b[:, None, :], z, w)  # [S, n, k]
        train_score, test_score = r2_score(out[:, train], y[train]), r2_score(out[:, test], y[test])
        chance, metric = 0.0, "r2"

    w_orig = w / std[..., None]  # [S, d, C']: logits = x @ w_orig + b_orig
    b_orig = b - torch.einsum("sd,sdc->sc", mean, w_orig)
    dirs = w_orig.transpose(1, 2)  # [S, C', d]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return ProbeResult(
        sites=names, kind=kind, metric=metric, classes=classes, train_score=train_score, test_score=test_score,
        weights=w_orig, bias=b_orig, directions=dirs[:, 0] if dirs.shape[1] == 1 else dirs, mean=mean, std=std,
        train_rows=train, test_rows=test, chance=chance, seed=seed)


__all__ = ["probe", "ProbeResult", "ProbeError"]

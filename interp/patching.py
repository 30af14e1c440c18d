"""Activation patching sweeps: which activations of a clean run restore its behaviour in a
corrupt run?

Each experiment runs the *corrupt* prompt with one site's activation replaced by the *clean*
run's (denoising) and scores the output with a metric, normalised so that 0 is the corrupt run
and 1 the clean run: ``(m - m_corrupt) / (m_clean - m_corrupt)``. Sweeps (``sites=``):

==================  =======================  =============================================
sweep               values                   one experiment patches
==================  =======================  =============================================
``resid_pre``       ``[layers, positions]``  ``blocks.{L}.resid_pre`` at one position
``resid_mid``       ``[layers, positions]``  ``blocks.{L}.resid_mid`` at one position
``resid_post``      ``[layers, positions]``  ``blocks.{L}.resid_post`` at one position
``attn.out``        ``[layers, positions]``  ``blocks.{L}.attn.out`` at one position
``mlp.out``         ``[layers, positions]``  ``blocks.{L}.mlp.out`` at one position
``attn.z``          ``[layers, heads]``      head h of ``blocks.{L}.attn.z`` at every position
``attn.z_by_pos``   ``[layers, heads, pos]`` head h of ``blocks.{L}.attn.z`` at one position
==================  =======================  =============================================

How it is fast (see DESIGN.md, "Speed by design"). An experiment that patches position ``p``
of layer ``L`` leaves every layer below ``L`` and every position before ``p`` exactly as in the
corrupt run. So experiments are grouped by ``p``; the group's rows run only the tokens
``p .. last metric position``, attend to the corrupt run's cached keys and values of the
tokens before ``p`` (a :class:`~model.KVPrefix`), and step through the layers together as a
*wavefront*: at layer ``L`` the rows of the experiments patching layer ``L`` join the batch,
starting from the corrupt run's cached ``resid_pre`` of layer ``L``, and a hook patches each
joining row at its own site. Nothing is computed twice, each layer's weights are read once per
group for a batch of every experiment that has reached it, and logits are computed only at the
metric's positions (only the vocabulary entries it reads, for a logit difference). A full
``resid_pre`` sweep costs about ``layers * positions / 4`` forwards' worth of arithmetic (the
minimum for exact patching) in at most ``positions`` batched passes, instead of
``layers * positions`` forwards. Experiments known to change nothing are not run: a clean value
equal to the corrupt one (every site before the first token where the prompts differ) or a
patch after the last metric position (``PatchingResult.skipped`` counts them); an all-position
head patch starts at the first position where the head's output differs. On a CPU, groups
with few tokens are merged into one pass (see :data:`MERGE_TOKEN_ROWS`). Results equal a naive
loop of one patched forward per experiment to fp32 rounding (``tests/test_patching.py``).

>>> import torch
>>> from model import Gemma3, Gemma3Config
>>> from interp.metrics import logit_diff
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=32, d_mlp=64, n_heads=2,
...     n_kv_heads=1, d_head=16, vocab_size=50), seed=0)
>>> r = patch_sweep(m, [2, 5, 7, 9], [2, 6, 7, 9], logit_diff(3, 4), progress=False)
>>> r.values.shape, r.axes
(torch.Size([2, 4]), ('layer', 'pos'))
>>> float(r.values[0, 0]), round(float(r.values[0, 1]), 4)  # same token at 0; the changed token at 1
(0.0, 1.0)
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import torch

from model.layers import KVPrefix

from .metrics import Metric, as_metric
from .plots import escape_token, heatmap, str_tokens

POSITION_SITES = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out")
SWEEPS: dict[str, tuple[str, ...]] = {
    **{s: ("layer", "pos") for s in POSITION_SITES},
    "attn.z": ("layer", "head"),
    "attn.z_by_pos": ("layer", "head", "pos"),
}


# ---------------------------------------------------------------------- results
@dataclass
class PatchingResult:
    """One sweep's scores, normalised (0 = corrupt run, 1 = clean run), with labels.

    ``values`` has the shape ``axes`` names: ``("layer", "pos")``, ``("layer", "head")`` or
    ``("layer", "head", "pos")``; ``raw`` holds the metric itself. ``tokens`` and
    ``corrupt_tokens`` label positions. ``method`` says how the values were obtained
    (``"activation patching"`` or ``"attribution patching"``, a linear estimate).
    """

    values: torch.Tensor
    raw: torch.Tensor
    site: str
    axes: tuple[str, ...]
    tokens: list[str]
    corrupt_tokens: list[str]
    clean_value: float
    corrupt_value: float
    metric: str = "metric"
    method: str = "activation patching"
    skipped: int = 0  # experiments known to change nothing (not run; their value is the corrupt run's)

    def position_labels(self) -> list[str]:
        """``"i token"``, or ``"i clean/corrupt"`` where the two prompts differ (a token's leading
        space shown as ``·``; the plot escapes the rest).

        >>> r = PatchingResult(torch.zeros(1, 2), torch.zeros(1, 2), "resid_pre", ("layer", "pos"),
        ...                    ["The", " France"], ["The", " Italy"], 1.0, 0.0)
        >>> r.position_labels()
        ['0 The', '1 ·France/·Italy']
        """
        def vis(t: str) -> str:
            return "·" + t[1:] if t.startswith(" ") else t

        return [f"{i} {vis(c)}" if c == k else f"{i} {vis(c)}/{vis(k)}"
                for i, (c, k) in enumerate(zip(self.tokens, self.corrupt_tokens))]

    def index_labels(self, index: Sequence[int]) -> str:
        """A readable name for one cell, e.g. ``"blocks.3.resid_pre @ 5 ·Paris"``."""
        parts = dict(zip(self.axes, index))
        name = f"blocks.{parts['layer']}.{'attn.z' if 'head' in parts else self.site}"
        if "head" in parts:
            name += f" head {parts['head']}"
        if "pos" in parts:
            name += f" @ {parts['pos']} {self.tokens[parts['pos']]!r}"
        return name

    def cells(self) -> list[tuple[int, ...]]:
        """Every index of ``values``, in row-major order."""
        return list(itertools.product(*(range(n) for n in self.values.shape)))

    def top(self, k: int = 10) -> list[tuple[tuple[int, ...], float]]:
        """The ``k`` cells of largest ``|value|``: ``[(index, value), ...]``, largest first."""
        flat = self.values.flatten().nan_to_num(0.0)
        idx = flat.abs().argsort(descending=True)[:k]
        return [(tuple(int(i) for i in torch.unravel_index(j, self.values.shape)), float(flat[j])) for j in idx]

    def grid(self) -> tuple[torch.Tensor, list[str], list[str], str, str]:
        """The values as a 2-D ``[rows, cols]`` grid with row and column labels (for plotting)."""
        v = self.values.detach().float().cpu()
        if self.axes == ("layer", "pos"):
            return v, self.position_labels(), [f"L{i}" for i in range(v.shape[0])], "position", "layer"
        if self.axes == ("layer", "head"):
            return v, [f"H{h}" for h in range(v.shape[1])], [f"L{i}" for i in range(v.shape[0])], "head", "layer"
        layers, heads, _ = v.shape
        rows = [f"L{i}H{h}" for i in range(layers) for h in range(heads)]
        return v.reshape(layers * heads, -1), self.position_labels(), rows, "position", "layer.head"

    def plot(self, title: str | None = None, **kwargs: Any):
        """A heatmap (plotly) of the values with token labels, centred at 0."""
        z, x, y, xt, yt = self.grid()
        title = title or f"{self.method}: {self.site} ({self.metric}; 0 = corrupt, 1 = clean)"
        return heatmap(z, x, y, title=title, x_title=xt, y_title=yt, zmid=0.0, colorbar_title="score", **kwargs)

    def __repr__(self) -> str:
        return (f"PatchingResult({self.method}, site={self.site!r}, axes={self.axes}, "
                f"shape={tuple(self.values.shape)}, clean={self.clean_value:.4g}, corrupt={self.corrupt_value:.4g})")


@dataclass
class Comparison:
    """Actual patching next to an estimate of it (e.g. attribution patching), same format.

    >>> # c = compare(patch_sweep(...), attribution_patch(...)); c.sign_agreement(top=20); c.plot()
    """

    actual: PatchingResult
    estimate: PatchingResult

    def __post_init__(self) -> None:
        if self.actual.values.shape != self.estimate.values.shape or self.actual.axes != self.estimate.axes:
            raise ValueError(f"cannot compare {self.actual!r} with {self.estimate!r}: shapes or axes differ")

    def sign_agreement(self, top: int | None = 20) -> float:
        """Fraction of the ``top`` cells of largest ``|actual|`` (all if None) where the estimate has the same sign."""
        a = self.actual.values.flatten().float()
        e = self.estimate.values.flatten().float()
        idx = a.abs().argsort(descending=True)
        if top is not None:
            idx = idx[:top]
        return float((torch.sign(a[idx]) == torch.sign(e[idx])).float().mean())

    def correlation(self) -> float:
        """Pearson correlation of actual and estimated values over all cells."""
        a = self.actual.values.flatten().double()
        e = self.estimate.values.flatten().double()
        a, e = a - a.mean(), e - e.mean()
        return float((a * e).sum() / (a.norm() * e.norm()).clamp_min(1e-30))

    def scatter(self, title: str | None = None):
        """Estimate against actual, one point per cell (hover names the site)."""
        import plotly.graph_objects as go

        a, e = self.actual.values.flatten(), self.estimate.values.flatten()
        names = [escape_token(self.actual.index_labels(cell)) for cell in self.actual.cells()]
        lo, hi = float(torch.minimum(a.min(), e.min())), float(torch.maximum(a.max(), e.max()))
        fig = go.Figure([
            go.Scatter(x=a.tolist(), y=e.tolist(), mode="markers", text=names, name="sites",
                       hovertemplate="%{text}<br>actual %{x:.4g}<br>estimate %{y:.4g}<extra></extra>"),
            go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"), name="y = x"),
        ])
        fig.update_layout(title=title or f"{self.estimate.method} vs {self.actual.method}: {self.actual.site} "
                                         f"(r = {self.correlation():.3f})",
                          xaxis_title=self.actual.method, yaxis_title=self.estimate.method, template="plotly_white")
        return fig

    def plot(self, title: str | None = None, scatter: bool = True):
        """Both heatmaps side by side on one colour scale, and (``scatter``) estimate vs actual."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        cols = 3 if scatter else 2
        fig = make_subplots(rows=1, cols=cols, horizontal_spacing=0.08,
                            subplot_titles=[self.actual.method, self.estimate.method, "estimate vs actual"][:cols])
        bound = float(max(self.actual.values.abs().max(), self.estimate.values.abs().max(), 1e-12))
        for col, result in ((1, self.actual), (2, self.estimate)):
            single = result.plot()
            trace = single.data[0]
            trace.update(zmin=-bound, zmax=bound, zmid=None, showscale=col == 2, coloraxis=None)
            fig.add_trace(trace, row=1, col=col)
            fig.update_xaxes(single.layout.xaxis, row=1, col=col)
            fig.update_yaxes(single.layout.yaxis, row=1, col=col)
        if scatter:
            for trace in self.scatter().data:
                fig.add_trace(trace, row=1, col=3)
            fig.update_xaxes(title="actual", row=1, col=3)
            fig.update_yaxes(title="estimate", row=1, col=3)
        fig.update_layout(title=title or f"{self.actual.site}: {self.actual.method} vs {self.estimate.method} "
                                         f"(sign agreement on top 20: {self.sign_agreement(20):.0%})",
                          template="plotly_white", showlegend=False, width=520 * cols, height=520)
        return fig


def compare(actual: PatchingResult, estimate: PatchingResult) -> Comparison:
    """Put two results of the same sweep side by side: ``compare(actual, estimate).plot()``."""
    return Comparison(actual, estimate)


# ---------------------------------------------------------------------- the prompt pair
@dataclass
class PromptPair:
    """A clean and a corrupt prompt of the same length, their metric values and caches."""

    clean_ids: torch.Tensor  # [1, seq]
    corrupt_ids: torch.Tensor
    metric: Metric
    needed: list[int]  # absolute positions the metric reads, sorted
    clean_logits: torch.Tensor  # [1, k, vocab] at needed ([1, k, len(token_ids)] when vocab_selected)
    corrupt_logits: torch.Tensor
    clean_value: float
    corrupt_value: float
    tokens: list[str]
    corrupt_tokens: list[str]
    clean_cache: Any = None
    corrupt_cache: Any = None
    corrupt_grads: Any = None
    vocab_selected: bool = False  # the logits hold only metric.token_ids (see unembed)

    @property
    def seq(self) -> int:
        """Tokens per prompt."""
        return self.clean_ids.shape[1]

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw metric values -> 0 at the corrupt run, 1 at the clean run."""
        return (raw - self.corrupt_value) / (self.clean_value - self.corrupt_value)


def token_labels(model, ids: torch.Tensor) -> list[str]:
    """One string per token id of ``ids [1, seq]`` (see :func:`interp.plots.str_tokens`)."""
    return str_tokens(model, ids[0])


def prepare_pair(model, clean, corrupt, metric, clean_names: Sequence[str] = (), corrupt_names: Sequence[str] = (),
                 corrupt_grads: bool = False) -> PromptPair:
    """Tokenise and check a prompt pair, run both prompts (caching ``*_names``) and score them.

    With ``corrupt_grads`` the corrupt run is a forward-backward and ``pair.corrupt_grads``
    holds the metric's gradients at ``corrupt_names``.
    """
    clean_ids, mask_c = model.to_tokens(clean)
    corrupt_ids, mask_k = model.to_tokens(corrupt)
    if mask_c is not None or mask_k is not None or clean_ids.shape[0] != 1 or corrupt_ids.shape[0] != 1:
        raise ValueError("patching takes one clean and one corrupt prompt (a single sequence each, no padding); "
                         "loop over pairs for a dataset")
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"clean and corrupt prompts must have the same number of tokens to align positions; got "
                         f"{clean_ids.shape[1]} and {corrupt_ids.shape[1]}. Choose words that are one token each, "
                         "or pad the shorter prompt with a neutral token")
    metric = as_metric(metric)
    seq = clean_ids.shape[1]
    needed = metric.resolve(seq)
    # a metric of a few vocabulary entries gets only those logits (nothing hooked on the unembedding)
    few = metric.token_ids is not None and not any(model.registry.is_hooked(n) for n in ("final_norm", "logits"))
    if few:
        kwargs: dict[str, Any] = {"stop_at_layer": model.cfg.n_layers}

        def to_logits(out: torch.Tensor) -> torch.Tensor:
            return unembed(model, out[:, needed], metric.token_ids)
    else:
        kwargs = {"logits_at": needed} if metric.positions is not None else {}

        def to_logits(out: torch.Tensor) -> torch.Tensor:
            return out
    big = 1 << 62  # these caches are small (a few sites, batch 1); never refuse them
    with torch.no_grad():
        out, clean_cache = model.run_with_cache(clean_ids, list(clean_names), max_bytes=big, **kwargs)
        clean_logits = to_logits(out)
    corrupt_grad_cache = None
    if corrupt_grads:
        def scalar(out: torch.Tensor) -> torch.Tensor:
            return metric.from_selected(to_logits(out), seq, few).sum()

        out, corrupt_cache, corrupt_grad_cache = model.run_with_grads(
            corrupt_ids, scalar, list(corrupt_names), **kwargs)
    else:
        with torch.no_grad():
            out, corrupt_cache = model.run_with_cache(corrupt_ids, list(corrupt_names), max_bytes=big, **kwargs)
    with torch.no_grad():
        corrupt_logits = to_logits(out)
        clean_value = float(metric.from_selected(clean_logits, seq, few)[0])
        corrupt_value = float(metric.from_selected(corrupt_logits, seq, few)[0])
    if not abs(clean_value - corrupt_value) > 1e-12 * max(1.0, abs(clean_value)):
        raise ValueError(f"the metric is {clean_value:.6g} on both prompts, so scores cannot be normalised; choose a "
                         "metric that tells the clean run from the corrupt one")
    return PromptPair(clean_ids, corrupt_ids, metric, needed, clean_logits, corrupt_logits, clean_value,
                      corrupt_value, token_labels(model, clean_ids), token_labels(model, corrupt_ids),
                      clean_cache, corrupt_cache, corrupt_grad_cache, few)


def _result(pair: PromptPair, kind: str, raw: torch.Tensor, method: str, skipped: int = 0) -> PatchingResult:
    return PatchingResult(pair.normalise(raw), raw, kind, SWEEPS[kind], pair.tokens, pair.corrupt_tokens,
                          pair.clean_value, pair.corrupt_value, pair.metric.name, method, skipped)


def _check_sites(sites: str | Sequence[str]) -> list[str]:
    kinds = [sites] if isinstance(sites, str) else list(sites)
    for k in kinds:
        if k not in SWEEPS:
            raise ValueError(f"unknown sweep {k!r}; choose from {', '.join(SWEEPS)}")
    if not kinds:
        raise ValueError("no sites to sweep")
    return list(dict.fromkeys(kinds))


def site_of(kind: str) -> str:
    """The site kind a sweep patches (``attn.z_by_pos`` -> ``attn.z``)."""
    return "attn.z" if kind.startswith("attn.z") else kind


# ---------------------------------------------------------------------- experiments
@dataclass(frozen=True)
class Experiment:
    """One patched run: ``kind`` at ``layer``, from position ``start`` (one position, or every
    position when ``all_positions``), on ``head`` for per-head sweeps; ``cell`` indexes the result."""

    kind: str
    cell: tuple[int, ...]
    layer: int
    start: int
    head: int | None = None
    all_positions: bool = False


def plan(kinds: Iterable[str], n_layers: int, n_heads: int, seq: int) -> list[Experiment]:
    """Every experiment of the sweeps ``kinds``.

    >>> len(plan(["resid_pre", "attn.z"], n_layers=2, n_heads=4, seq=3))
    14
    """
    out = []
    for kind in kinds:
        for layer in range(n_layers):
            if kind in POSITION_SITES:
                out += [Experiment(kind, (layer, p), layer, p) for p in range(seq)]
            elif kind == "attn.z":
                out += [Experiment(kind, (layer, h), layer, 0, h, True) for h in range(n_heads)]
            else:
                out += [Experiment(kind, (layer, h, p), layer, p, h) for h in range(n_heads) for p in range(seq)]
    return out


def row_bytes(model, tokens: int, keys: int, n_logits: int) -> int:
    """Estimated peak bytes one row of a patching batch needs (``tokens`` computed, ``keys`` attended)."""
    c = model.cfg
    elem = torch.empty((), dtype=model.dtype).element_size()
    per_token = (14 * c.d_model + 4 * c.d_mlp + 6 * c.n_heads * c.d_head + 8 * c.n_kv_heads * c.d_head
                 + 2 * c.n_heads * keys)
    return elem * tokens * per_token + 4 * 3 * n_logits * c.vocab_size


def default_max_bytes(model) -> int:
    """Half the memory free on the model's device (2 GiB when unknown)."""
    from model.gemma3 import available_memory

    free = available_memory(model.device)
    return free // 2 if free else 2 << 30


class _Progress:
    """tqdm when installed, else a line on stderr; nothing when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar, self.total, self.done, self.enabled = None, total, 0, enabled
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="exp")
        except ImportError:
            self.desc = desc
            self._line()

    def _line(self) -> None:
        sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} experiments")
        sys.stderr.flush()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _patch_hooks(pair: PromptPair, layer: int, start: int, end: int, joining: list[tuple[int, Experiment]]):
    """Hooks on ``blocks.{layer}.*`` that patch each joining row (index, experiment) at its site."""
    by_site: dict[tuple[str, bool], list[tuple[int, Experiment]]] = {}
    for row, e in joining:
        by_site.setdefault((site_of(e.kind), e.all_positions), []).append((row, e))
    hooks = []
    for (site, every), items in by_site.items():
        name = f"blocks.{layer}.{site}"
        clean = pair.clean_cache[name][0]  # [seq, d] or [seq, heads, hd]
        rows = torch.tensor([r for r, _ in items], device=clean.device)
        local = torch.tensor([e.start - start for _, e in items], device=clean.device)
        if site != "attn.z":
            values = clean[torch.tensor([e.start for _, e in items], device=clean.device)]  # [m, d]

            def hook(x, s, rows=rows, local=local, values=values):
                x = x.clone()
                x[rows, local] = values.to(x.dtype)
                return x
        else:
            heads = torch.tensor([e.head for _, e in items], device=clean.device)
            if every:
                values = clean[start:end][:, heads].transpose(0, 1)  # [m, tokens, hd]

                def hook(x, s, rows=rows, heads=heads, values=values):
                    x = x.clone()
                    x[rows, :, heads] = values.to(x.dtype)
                    return x
            else:
                values = clean[torch.tensor([e.start for _, e in items], device=clean.device), heads]  # [m, hd]

                def hook(x, s, rows=rows, local=local, heads=heads, values=values):
                    x = x.clone()
                    x[rows, local, heads] = values.to(x.dtype)
                    return x
        hooks.append((name, hook))
    return hooks


def run_wavefront(model, pair: PromptPair, start: int, experiments: Sequence[Experiment]) -> torch.Tensor:
    """Raw metric values ``[len(experiments)]`` of experiments that all leave positions before
    ``start`` untouched, in one layer-by-layer pass (see the module docstring).

    ``experiments`` must be sorted by layer; row ``i`` of the batch is experiment ``i``.
    """
    n_layers = model.cfg.n_layers
    end = pair.needed[-1] + 1
    seq = pair.seq
    rs = pair.corrupt_cache
    h: torch.Tensor | None = None
    rows, i = 0, 0
    for layer in range(experiments[0].layer, n_layers):
        joining = []
        while i < len(experiments) and experiments[i].layer == layer:
            joining.append((rows + len(joining), experiments[i]))
            i += 1
        prefix = None
        if start > 0:
            prefix = KVPrefix({layer: rs[f"blocks.{layer}.attn.k_rot"][:, :start]},
                              {layer: rs[f"blocks.{layer}.attn.v"][:, :start]}, start)
        hooks = _patch_hooks(pair, layer, start, end, joining) if joining else []
        if joining and layer > 0:
            new = rs[f"blocks.{layer}.resid_pre"][:, start:end].expand(len(joining), -1, -1)
            h = new if h is None else torch.cat((h, new), dim=0)
        rows += len(joining)
        with model.hooks(hooks):
            if layer == 0:  # the residual entering layer 0 is the embedding: run from tokens
                ids = pair.corrupt_ids[:, start:end].expand(rows, -1)
                h = model(ids, stop_at_layer=1, prefix=prefix)
            else:
                h = model(h, start_at_layer=layer, stop_at_layer=layer + 1, prefix=prefix)
    computed = [q - start for q in pair.needed if q >= start]
    if pair.vocab_selected:
        logits = unembed(model, h[:, computed], pair.metric.token_ids)
    else:
        logits = model(h, start_at_layer=n_layers, logits_at=computed)
    before = [j for j, q in enumerate(pair.needed) if q < start]
    if before:  # positions before the patch keep their corrupt logits
        logits = torch.cat((pair.corrupt_logits[:, before].expand(rows, -1, -1).to(logits.dtype), logits), dim=1)
    return pair.metric.from_selected(logits, seq, vocab_selected=pair.vocab_selected)


def unembed(model, resid: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Logits of ``token_ids`` only, ``[..., len(token_ids)]``, from the final residual stream:
    ``final_norm(resid) @ W_E[token_ids].T``, the last step of ``Gemma3.forward`` restricted to a
    few vocabulary columns (a logit difference needs 2 of 262,144). Used only when nothing is
    hooked on ``final_norm`` or ``logits``."""
    return torch.nn.functional.linear(model.final_norm(resid), model.embed.weight[list(token_ids)])


def effective(pair: PromptPair, e: Experiment) -> Experiment | None:
    """``e`` with its first position where the patch changes anything, or None when it changes
    nothing the metric reads: a patch after the last metric position, or of a clean value equal
    to the corrupt one (every site before the first token where the prompts differ). Positions
    where the values are equal need no patch, so an all-position patch starts at the first
    position that differs (and reuses the prefix before it)."""
    last = pair.needed[-1]
    if e.start > last:
        return None
    name = f"blocks.{e.layer}.{site_of(e.kind)}"
    clean, corrupt = pair.clean_cache[name][0], pair.corrupt_cache[name][0]
    if e.all_positions:
        differs = (clean[:last + 1, e.head] != corrupt[:last + 1, e.head]).flatten(1).any(-1)
        if not bool(differs.any()):
            return None
        first = int(differs.to(torch.uint8).argmax())
        return e if first == e.start else replace(e, start=first)
    if e.head is not None:
        return None if torch.equal(clean[e.start, e.head], corrupt[e.start, e.head]) else e
    return None if torch.equal(clean[e.start], corrupt[e.start]) else e


# One pass of a group over the layers reads every weight once, whatever its batch: merging the
# group of a later start into an earlier one saves that read and costs (gap x rows) extra token
# rows of compute (positions the later group would have taken from the prefix). Worth it below
# about 2 x FLOP/s / memory bandwidth token rows on a CPU; on an accelerator the per-call overhead
# dominates small groups, so merge much more. Exactness does not depend on it.
MERGE_TOKEN_ROWS = {"cpu": 16, "other": 1024}


def merge_starts(groups: dict[int, list[Experiment]], token_rows: int) -> dict[int, list[Experiment]]:
    """Merge the experiment groups of nearby starts, latest first, while the extra token rows a
    merge computes (``gap x rows`` of the later group) stay under ``token_rows``.

    >>> g = {5: ["a", "b"], 6: ["c"], 7: ["d"]}
    >>> merge_starts(g, 3), merge_starts(g, 0)
    ({5: ['a', 'b', 'c', 'd']}, {5: ['a', 'b'], 6: ['c'], 7: ['d']})
    """
    out: dict[int, list[Experiment]] = {}
    current: int | None = None
    for start in sorted(groups, reverse=True):
        if current is not None and (current - start) * len(out[current]) < token_rows:
            out[start] = groups[start] + out.pop(current)
        else:
            out[start] = list(groups[start])
        current = start
    return dict(sorted(out.items()))


def patch_sweep(model, clean, corrupt, metric: Metric | Callable, sites: str | Sequence[str] = "resid_pre", *,
                batch_size: int | None = None, max_bytes: int | None = None,
                progress: bool = True) -> PatchingResult | dict[str, PatchingResult]:
    """Activation patching (clean into corrupt) over every layer and position or head.

    ``clean``/``corrupt`` are texts or token ids of the same length; ``metric`` a
    :class:`~interp.metrics.Metric` (``logit_diff``, ``prob``, ``kl``) or a callable on full
    logits. ``sites`` is one sweep name (see the module docstring) -> a
    :class:`PatchingResult`, or a list of them -> ``{name: PatchingResult}`` (all computed in
    the same batches). ``batch_size`` caps the rows of one batch; ``max_bytes`` caps its
    estimated memory (default: half the free memory). ``progress`` shows a progress bar.

    >>> r = patch_sweep(model, "The capital of France is", "The capital of Italy is",
    ...                 logit_diff(paris, rome), ["resid_pre", "attn.z"])  # doctest: +SKIP
    >>> r["resid_pre"].plot()  # doctest: +SKIP
    """
    kinds = _check_sites(sites)
    cfg = model.cfg
    clean_names = sorted({f"blocks.*.{site_of(k)}" for k in kinds})
    corrupt_names = sorted(set(clean_names) | {"blocks.*.resid_pre", "blocks.*.attn.k_rot", "blocks.*.attn.v"})
    pair = prepare_pair(model, clean, corrupt, metric, clean_names, corrupt_names)
    seq, last = pair.seq, pair.needed[-1]
    raw = {k: torch.full(tuple({"layer": cfg.n_layers, "head": cfg.n_heads, "pos": seq}[a] for a in SWEEPS[k]),
                         float("nan")) for k in kinds}
    groups: dict[int, list[Experiment]] = {}
    skipped = {k: 0 for k in kinds}
    for e in plan(kinds, cfg.n_layers, cfg.n_heads, seq):
        run = effective(pair, e)
        if run is None:  # changes nothing the metric reads: the corrupt run's value, exactly
            raw[e.kind][e.cell] = pair.corrupt_value
            skipped[e.kind] += 1
        else:
            groups.setdefault(run.start, []).append(run)
    limit = max_bytes if max_bytes is not None else default_max_bytes(model)
    order = {k: i for i, k in enumerate(POSITION_SITES + ("attn.z", "attn.z_by_pos"))}
    bar = _Progress(sum(len(g) for g in groups.values()) + sum(skipped.values()), progress,
                    "patching " + ", ".join(kinds))
    bar.update(sum(skipped.values()))
    try:
        with torch.no_grad():
            merged = merge_starts(groups, MERGE_TOKEN_ROWS.get(model.device.type, MERGE_TOKEN_ROWS["other"]))
            for start in sorted(merged):
                exps = sorted(merged[start], key=lambda e: (e.layer, order[e.kind], e.head or 0))
                cap = max(1, limit // row_bytes(model, last + 1 - start, last + 1, len(pair.needed)))
                if batch_size is not None:
                    cap = min(cap, batch_size)
                for j in range(0, len(exps), cap):
                    chunk = exps[j:j + cap]
                    values = run_wavefront(model, pair, start, chunk).float().cpu()
                    for e, v in zip(chunk, values):
                        raw[e.kind][e.cell] = v
                    bar.update(len(chunk))
    finally:
        bar.close()
    results = {k: _result(pair, k, raw[k], "activation patching", skipped[k]) for k in kinds}
    return results[kinds[0]] if isinstance(sites, str) else results


__all__ = ["patch_sweep", "PatchingResult", "Comparison", "compare", "SWEEPS", "Experiment", "plan",
           "prepare_pair", "run_wavefront", "effective", "unembed"]

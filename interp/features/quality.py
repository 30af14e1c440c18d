"""How good is a dictionary: sparsity, reconstruction and the language model's loss, on held-out
activations from an :class:`~interp.data.ActivationStore`.

:func:`evaluate` reads the dictionary's site from the store (a transcoder's input *and* output
sites) and reports

- **L0**: the mean number of active features per token;
- **FVU** (fraction of variance unexplained): ``sum |x - x_hat|^2 / sum |x - mean(x)|^2`` over
  every evaluated token and dimension (``x`` is the site an SAE reads, or the site a transcoder
  predicts; ``mean`` is the per-dimension mean over the tokens), and explained variance ``1 - FVU``;
- **dead** features (never fire on the evaluated tokens) and **dense** features (fire on more
  than ``dense_threshold``, 10% by default, of them), and each feature's firing frequency;
- the **language-model effect** on held-out text: the next-token cross-entropy of the clean
  model, with the dictionary's output spliced in (no error term), and with the site zero-ablated
  (a transcoder's *output* site), and the **CE loss recovered**
  ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)`` (1: as good as the model, 0: as bad as
  deleting the site).

>>> result = evaluate(model, sae, store)                       # doctest: +SKIP
>>> result                                                     # doctest: +SKIP
FeatureEval  blocks.6.resid_post
  tokens                         65,536
  L0                              61.25
  FVU                            0.0712
  ...
>>> result.plot()                                              # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..hooks import zero_ablate
from ..hooks.checks import is_int
from ..model import Gemma3
from ..progress import progress_bar
from .clt import CrossLayerTranscoder
from .dictionary import Dictionary
from .interventions import dictionary_hooks
from .io import check_fits
from .quality_base import FeatureEval, aligned_batches, format_value, lm_effect
from .quality_clt import CLTEval, evaluate_clt


def _store_sites(d: Dictionary, store: Any, site: str | Sequence[str] | None) -> tuple[str, str | None]:
    """The store's names for what ``d`` reads and (a transcoder) predicts."""
    if site is None:
        read, out = d.site, d.site_out
    elif isinstance(site, str):
        read, out = site, d.site_out
    else:
        names = list(site)
        if len(names) != 2:
            raise ValueError(f"site= is the store's name for the dictionary's input, or (input, output) for a "
                             f"transcoder; got {len(names)} names")
        read, out = names
    for what, name in (("reads", read), ("predicts", out)):
        if name is not None and name not in store.manifest["sites"]:
            raise KeyError(f"the dictionary {what} {name!r}, which this store did not harvest (it has {store.sites}); "
                           "harvest that site, or pass site= the store's name for it")
    assert read is not None
    return read, out


@torch.no_grad()
def evaluate(model: Gemma3, dictionary: Dictionary | CrossLayerTranscoder, store: Any, *,
             site: str | Sequence[str] | None = None,
             texts: Sequence[str] | None = None, max_tokens: int | None = None, ce_tokens: int | None = 1 << 16,
             batch_size: int = 4096, lm_batch_size: int = 8, dense_threshold: float = 0.1, ce: bool = True,
             progress: bool = True, name: str = "") -> FeatureEval | CLTEval:
    """Evaluate ``dictionary`` (an SAE or a transcoder) on held-out activations (see the module
    docstring for the metrics).

    ``store`` must hold the dictionary's site (for a transcoder both its input and output
    sites); ``site`` names them in the store when the store calls them otherwise (a name, or
    ``(input, output)`` for a transcoder). Statistics use the store's first ``max_tokens``
    tokens (None: all), read in unshuffled batches of ``batch_size`` vectors. The loss runs on
    ``texts`` (strings) when given, else on the store's own rows, as many as fit in
    ``ce_tokens`` tokens (None: every row); ``ce=False`` skips it. ``lm_batch_size`` rows go
    through the model at a time.

    A :class:`CrossLayerTranscoder` is evaluated layer by layer (a :class:`~.quality_clt.CLTEval`:
    per-layer L0 and FVU, and the CE loss recovered with every MLP output replaced); its store
    must hold every layer's ``pre_mlp_norm`` and ``post_mlp_norm``.
    """
    if isinstance(dictionary, CrossLayerTranscoder):
        if site is not None:
            raise ValueError("a CLT reads its sites by layer (clt.sites_in / sites_out); site= is not for CLTs")
        return evaluate_clt(model, dictionary, store, texts=texts, max_tokens=max_tokens, ce_tokens=ce_tokens,
                            batch_size=batch_size, lm_batch_size=lm_batch_size, dense_threshold=dense_threshold,
                            ce=ce, progress=progress, name=name)
    return _evaluate_one(model, dictionary, store, site=site, texts=texts, max_tokens=max_tokens,
                         ce_tokens=ce_tokens, batch_size=batch_size, lm_batch_size=lm_batch_size,
                         dense_threshold=dense_threshold, ce=ce, progress=progress, name=name)


def _evaluate_one(model: Gemma3, dictionary: Dictionary, store: Any, *, site: str | Sequence[str] | None,
                  texts: Sequence[str] | None, max_tokens: int | None, ce_tokens: int | None, batch_size: int,
                  lm_batch_size: int, dense_threshold: float, ce: bool, progress: bool, name: str,
                  clean: float | None = None) -> FeatureEval:
    """:func:`evaluate` of one single-site dictionary; ``clean`` is the clean loss when the caller
    has it already (:func:`compare_dictionaries` computes it once)."""
    check_fits(dictionary, model)  # resolves aliases to the registry's names
    for label, value in (("batch_size", batch_size), ("lm_batch_size", lm_batch_size)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    if not 0 <= dense_threshold < 1:
        raise ValueError(f"dense_threshold is a fraction of tokens in [0, 1), got {dense_threshold!r}")
    d = dictionary
    transcoder = d.site_out is not None and d.site_out != d.site
    read, out = _store_sites(d, store, site)
    if transcoder and out is None:
        raise ValueError("a transcoder is evaluated against the site it predicts; pass site=(input, output)")
    fingerprint = store.manifest.get("model", {}).get("fingerprint")
    if ce and texts is None and fingerprint:
        from ..data.harvest import model_fingerprint

        if fingerprint != model_fingerprint(model):
            warnings.warn("the store was harvested from another model (or the same one in another dtype): its "
                          "activations and its rows' losses may not match this model", UserWarning, stacklevel=2)

    device, dtype = d.W_enc.device, d.W_enc.dtype
    acc = torch.float32 if device.type == "mps" else torch.float64  # (MPS has no float64)
    limit = max_tokens if max_tokens is not None else store.manifest["n_tokens"]
    count = torch.zeros(d.d_sae, dtype=torch.long, device=device)
    n = 0
    err = 0.0
    sum_x = torch.zeros(d.d_out, dtype=acc, device=device)
    sum_x2 = 0.0
    active = 0
    sites = [read] + ([out] if transcoder and out is not None else [])
    bar = progress_bar(limit, "evaluate", "tok", progress)
    try:
        for batch in aligned_batches(store, sites, batch_size, device, dtype):
            if n >= limit:
                break
            take = min(batch[0].shape[0], limit - n)
            x_in = batch[0][:take].reshape(take, -1)
            target = (batch[1] if transcoder else batch[0])[:take].reshape(take, -1).to(acc)
            acts = d.encode(x_in)
            recon = d.decode(acts)
            skip = d.skip(x_in)
            if skip is not None:
                recon = recon + skip
            fired = acts > 0
            count += fired.sum(0)
            active += int(fired.sum())
            err += float((target - recon.to(acc)).pow(2).sum())
            sum_x += target.sum(0)
            sum_x2 += float(target.pow(2).sum())
            n += take
            bar.update(take)
    finally:
        bar.close()
    if n == 0:
        raise ValueError(f"the store holds no tokens of {read}")
    variance = sum_x2 - float((sum_x * sum_x).sum()) / n
    fvu = err / variance if variance > 0 else math.nan
    result = FeatureEval(read, out if transcoder else None, n, d.d_sae, active / n, fvu, err / n,
                         (count.double() / n).float().cpu(), dense_threshold, name=name)
    if not ce:
        return result
    result.ce_clean, result.ce_spliced, result.ce_zero, result.ce_tokens = lm_effect(
        model, texts, store, ce_tokens, lm_batch_size, progress, dictionary_hooks(d, splice=True),
        {d.writes: zero_ablate()}, clean)
    return result


@dataclass
class DictionaryComparison:
    """:func:`compare_dictionaries`'s result: one :class:`FeatureEval` per dictionary."""

    evals: dict[str, FeatureEval]

    def table(self) -> list[tuple[Any, ...]]:
        """``[(metric, value of each dictionary...), ...]``; the first row names the dictionaries."""
        names = list(self.evals)
        tables = [dict(e.table()) for e in self.evals.values()]
        metrics: list[str] = []
        for e in self.evals.values():
            metrics += [m for m, _ in e.table() if m not in metrics]
        return [("dictionary", *names)] + [(m, *(t.get(m) for t in tables)) for m in metrics]

    def __repr__(self) -> str:
        rows = self.table()
        return "\n".join(f"{str(r[0]):<26} " + " ".join(f"{format_value(v):>22}" for v in r[1:]) for r in rows)

    def __getitem__(self, name: str) -> FeatureEval:
        return self.evals[name]


def compare_dictionaries(model: Gemma3, dictionaries: Mapping[str, Dictionary] | Sequence[Dictionary], store: Any,
                         **kwargs: Any) -> DictionaryComparison:
    """:func:`evaluate` each dictionary on the same tokens and texts (the clean loss computed once
    when the loss is evaluated on the same texts); keywords as :func:`evaluate`."""
    items = dict(dictionaries) if isinstance(dictionaries, Mapping) else {
        f"{i}: {type(d).__name__} {d.d_sae}": d for i, d in enumerate(dictionaries)}
    evals: dict[str, FeatureEval] = {}
    clean: float | None = None
    options = {**inspect.signature(evaluate).parameters}
    bad = set(kwargs) - set(options)
    if bad:
        raise TypeError(f"compare_dictionaries got unknown keywords {sorted(bad)}; it takes evaluate's")
    settings = {k: p.default for k, p in options.items() if p.default is not inspect.Parameter.empty}
    settings.update(kwargs)
    settings.pop("name", None)
    for label, d in items.items():
        if isinstance(d, CrossLayerTranscoder):
            raise TypeError(f"{label}: compare_dictionaries takes single-site dictionaries; evaluate a CLT alone")
        e = _evaluate_one(model, d, store, name=label, clean=clean, **settings)
        clean = e.ce_clean if clean is None else clean
        evals[label] = e
    return DictionaryComparison(evals)


__all__ = ["evaluate", "FeatureEval", "compare_dictionaries", "DictionaryComparison"]

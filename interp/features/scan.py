"""What a dictionary feature responds to and what it writes: :func:`top_activations` scans an
:class:`~interp.data.ActivationStore` once for any number of features (a running top-k per
feature, the activations around each top token, firing counts and a sample for histograms);
:func:`logit_effects` reads a feature's decoder direction through the unembedding (see
:mod:`interp.features.dashboard` for what that leaves out). The pages are in
:mod:`interp.features.dashboard`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..hooks.checks import is_int
from ..model import Gemma3
from ..progress import progress_bar
from ..tokens import str_tokens
from .dictionary import Dictionary

RESIDUAL_KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "post_attn_norm", "post_mlp_norm")
ELEMENT_BUDGET = 1 << 24  # activations [tokens, d_sae] computed at once during a scan


# ---------------------------------------------------------------------- the scan
@dataclass
class TopActivations:
    """What :func:`top_activations` finds, for features ``features [n_f]``, on ``n_tokens`` tokens.

    ``values [n_f, k]`` (largest first), ``rows``/``positions [n_f, k]`` (the store row and the
    token's position in it) -- where a feature fires on fewer than ``k`` tokens, the rest are
    value 0 and row and position -1 --, ``windows [n_f, k, before + 1 + after]`` (the feature's activation on the tokens
    ``positions - before .. positions + after`` of the same row; NaN where there is no token or
    no harvested activation), ``count [n_f]`` (tokens it fires on), ``max [n_f]``, ``total [n_f]``
    (sum of its activations) and ``sample``: for each feature a uniform random sample (without
    replacement) of at most ``sample_size`` of its non-zero activations (all of them when fewer).
    """

    site: str
    features: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    windows: torch.Tensor
    before: int
    after: int
    count: torch.Tensor
    total: torch.Tensor
    max: torch.Tensor
    n_tokens: int
    sample: list[torch.Tensor]

    def index_of(self, feature: int) -> int:
        hits = (self.features == int(feature)).nonzero().flatten()
        if not hits.numel():
            raise KeyError(f"feature {feature} was not scanned (scanned: {self.features.tolist()[:10]}...)")
        return int(hits[0])

    def frequency(self, feature: int) -> float:
        return float(self.count[self.index_of(feature)]) / max(self.n_tokens, 1)

    def top(self, feature: int) -> list[tuple[int, int, float]]:
        """``[(row, position, activation), ...]`` of the tokens the feature fires on most (largest
        first; only tokens where it fires)."""
        i = self.index_of(feature)
        return [(int(r), int(p), float(v)) for r, p, v in zip(self.rows[i], self.positions[i], self.values[i])
                if v > 0]


def _feature_list(features: Any, d_sae: int) -> torch.Tensor:
    if features is None:
        return torch.arange(d_sae)
    if isinstance(features, (int, torch.Tensor)) and not isinstance(features, bool) and \
            (not isinstance(features, torch.Tensor) or features.dim() == 0):
        features = [int(features)]
    out = torch.as_tensor([int(f) for f in features], dtype=torch.long)
    if not out.numel():
        raise ValueError("no features to scan")
    bad = out[(out < 0) | (out >= d_sae)]
    if bad.numel():
        raise IndexError(f"feature {int(bad[0])} is outside the dictionary's {d_sae} features")
    if out.unique().numel() != out.numel():
        raise ValueError("features must not repeat")
    return out


@torch.no_grad()
def top_activations(dictionary: Dictionary, store: Any, features: Iterable[int] | int | None = None, *,
                    k: int = 20, window: tuple[int, int] = (12, 4), site: str | None = None,
                    sample_size: int = 2000, seed: int = 0, progress: bool = True) -> TopActivations:
    """One pass over ``store`` (shard by shard, in order) finding each feature's ``k`` largest
    activations, the activations around them (``window = (tokens before, tokens after)``) and
    its firing statistics; see :class:`TopActivations`. ``features`` default to all of them;
    ``site`` is the store's name for the dictionary's input (default ``dictionary.site``)."""
    d = dictionary
    site = site or d.site
    if site is None:
        raise ValueError("the dictionary names no site; set .site or pass site=")
    if site not in store.manifest["sites"]:
        raise KeyError(f"the dictionary reads {site!r}, which this store did not harvest (it has {store.sites})")
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    before, after = (int(w) for w in window)
    if before < 0 or after < 0:
        raise ValueError(f"window is (tokens before, tokens after), both >= 0; got {window!r}")
    feats = _feature_list(features, d.d_sae)
    device = d.W_enc.device
    fidx = feats.to(device)
    n_f, width = feats.numel(), before + 1 + after
    kept = torch.tensor(store.positions, dtype=torch.long, device=device)
    n_pos, ctx = kept.numel(), store.context
    offsets = torch.arange(-before, after + 1, device=device)

    top_v = torch.empty(n_f, 0, device=device)
    top_r = torch.empty(n_f, 0, dtype=torch.long, device=device)
    top_p = torch.empty(n_f, 0, dtype=torch.long, device=device)
    top_w = torch.empty(n_f, 0, width, device=device)
    samp_key = torch.empty(n_f, 0, device=device)
    samp_v = torch.empty(n_f, 0, device=device)
    count = torch.zeros(n_f, dtype=torch.long, device=device)
    total = torch.zeros(n_f, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    vmax = torch.zeros(n_f, device=device)
    gen = torch.Generator().manual_seed(seed)
    n_tokens = 0
    n_shards = -(-store.n_rows // store.shard_rows)
    chunk_rows = max(1, ELEMENT_BUDGET // max(n_pos * d.d_sae, ctx * n_f, n_f * width))
    bar = progress_bar(store.manifest.get("n_tokens"), "top activations", "tok", progress)
    try:
        for shard in range(n_shards):
            start = shard * store.shard_rows
            stop = min(start + store.shard_rows, store.n_rows)
            block = store.shard_slice(shard, site, 0, stop - start)  # [rows, positions, *dims]: the one read
            valid_block = store.valid(slice(start, stop))
            for a in range(0, stop - start, chunk_rows):
                b = min(a + chunk_rows, stop - start)
                r = b - a
                x = block[a:b].reshape(r, n_pos, -1).to(device=device, dtype=d.W_enc.dtype)
                valid = valid_block[a:b].to(device)
                acts = d.encode(x)[..., fidx].float()  # [r, n_pos, n_f]
                acts = torch.where(valid[..., None], acts, torch.zeros((), device=device))
                fired = (acts > 0) & valid[..., None]
                count += fired.sum((0, 1))
                total += acts.sum((0, 1)).to(total.dtype)
                vmax = torch.maximum(vmax, acts.amax((0, 1)))
                n_valid = int(valid.sum())
                n_tokens += n_valid
                # the top k of this chunk, then merged with the running top k
                flat = acts.permute(2, 0, 1).reshape(n_f, r * n_pos)
                flat = flat.masked_fill(~valid.reshape(1, -1), -math.inf)
                kk = min(k, flat.shape[1])
                v, i = flat.topk(kk, dim=1)
                local_row, local_pos = i // n_pos, kept[i % n_pos]
                full = torch.full((r, ctx, n_f), math.nan, device=device)  # activations by token position
                full[:, kept] = acts.masked_fill(~valid[..., None], math.nan)
                wpos = local_pos[..., None] + offsets  # [n_f, kk, width]
                inside = (wpos >= 0) & (wpos < ctx)
                w = full[local_row[..., None].expand_as(wpos), wpos.clamp(0, ctx - 1),
                         torch.arange(n_f, device=device)[:, None, None].expand_as(wpos)]
                w = w.masked_fill(~inside, math.nan)
                v_all = torch.cat([top_v, v], 1)
                r_all = torch.cat([top_r, local_row + start + a], 1)
                p_all = torch.cat([top_p, local_pos], 1)
                w_all = torch.cat([top_w, w], 1)
                top_v, j = v_all.topk(min(k, v_all.shape[1]), dim=1)
                top_r, top_p = r_all.gather(1, j), p_all.gather(1, j)
                top_w = w_all.gather(1, j[..., None].expand(-1, -1, width))
                # a uniform sample of the non-zero activations: the smallest random keys win
                keys = torch.rand(r, n_pos, generator=gen).to(device)
                cand = torch.where(fired, -keys[..., None], torch.full((), -math.inf, device=device))
                cand = cand.permute(2, 0, 1).reshape(n_f, -1)
                ks = min(sample_size, cand.shape[1])
                ck, ci = cand.topk(ks, dim=1)
                cv = flat.gather(1, ci)
                key_all = torch.cat([samp_key, ck], 1)
                val_all = torch.cat([samp_v, cv], 1)
                samp_key, j = key_all.topk(min(sample_size, key_all.shape[1]), dim=1)
                samp_v = val_all.gather(1, j)
                bar.update(n_valid)
    finally:
        bar.close()
    missing = ~(top_v > 0)  # not firing (or no token at all): no entry
    top_v = top_v.masked_fill(missing, 0.0)
    top_r = top_r.masked_fill(missing, -1)
    top_p = top_p.masked_fill(missing, -1)
    top_w = top_w.masked_fill(missing[..., None], math.nan)
    sample = [samp_v[i][samp_key[i] > -math.inf].cpu() for i in range(n_f)]
    return TopActivations(site, feats, top_v.cpu(), top_r.cpu(), top_p.cpu(), top_w.cpu(), before, after,
                          count.cpu(), total.cpu(), vmax.cpu(), n_tokens, sample)


# ---------------------------------------------------------------------- logit effects
Effects = tuple[list[tuple[int, str, float]], list[tuple[int, str, float]]]


def logit_effects(model: Gemma3, dictionary: Dictionary, feature: int, k: int = 10) -> Effects | None:
    """The ``k`` tokens whose logits the feature's decoder direction raises most, and the ``k`` it
    lowers most: ``(W_dec[f] * (1 + final_norm.weight)) @ W_E.T`` (the final norm's
    data-dependent scale left out; see the module docstring). ``[(token id, token, effect), ...]``
    each; None when the dictionary's output is not residual-stream wide."""
    return logit_effects_of(model, dictionary, [int(feature)], k).get(int(feature))


@torch.no_grad()
def logit_effects_of(model: Gemma3, dictionary: Dictionary, features: list[int], k: int = 10,
                     chunk: int = 64) -> dict[int, Effects]:
    """:func:`logit_effects` of many features, ``chunk`` at a time through one matmul with the
    unembedding each (one pass over the vocabulary per chunk, not per feature); ``{}`` when the
    dictionary's output is not residual-stream wide."""
    if dictionary.d_out != model.cfg.d_model:
        return {}
    emb = model.embed.weight
    gain = 1.0 + model.final_norm.weight.float()
    out: dict[int, Effects] = {}
    for start in range(0, len(features), chunk):
        part = features[start:start + chunk]
        idx = torch.tensor(part, device=dictionary.W_dec.device)
        directions = dictionary.W_dec[idx].to(device=emb.device, dtype=torch.float32) * gain  # [c, d]
        effect = emb.float() @ directions.T  # [vocab, c]
        kk = min(k, effect.shape[0])
        high_v, high_i = effect.topk(kk, dim=0)
        low_v, low_i = effect.topk(kk, dim=0, largest=False)
        for j, f in enumerate(part):
            pair = []
            for v, i in ((high_v[:, j], high_i[:, j]), (low_v[:, j], low_i[:, j])):
                names = str_tokens(model, i.tolist())
                pair.append([(int(t), n, float(x)) for t, n, x in zip(i.tolist(), names, v.tolist())])
            out[f] = (pair[0], pair[1])
    return out


__all__ = ["top_activations", "TopActivations", "logit_effects", "logit_effects_of", "Effects", "ELEMENT_BUDGET",
           "RESIDUAL_KINDS"]

"""A run_with_cache / run_with_grads call is prepared once: one tokenization, one name
resolution, one reach check per site (counted, not timed), with the same results as before."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from support import FakeTokenizer

from interp.model import Gemma3, Gemma3Config, InputError
from interp.model.inputs import PreparedInput, to_ids
from interp.model.sites import site_shape

CFG = Gemma3Config(n_layers=3, d_model=16, d_mlp=32, n_heads=2, n_kv_heads=1, d_head=8, vocab_size=40)
TEXT = " w5| w9| w11| w3"
TEXTS = [" w5| w9| w11| w3", " w4| w6"]


class CountingTokenizer(FakeTokenizer):
    def __init__(self, n: int):
        super().__init__(n)
        self.encodes = self.batches = 0

    def encode(self, text: str, bos: bool = True) -> list[int]:
        self.encodes += 1
        return super().encode(text, bos)

    def batch_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches += 1
        rows = [FakeTokenizer.encode(self, t) for t in texts]  # not counted as single encodes
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
        return ids, mask


@pytest.fixture
def counted(monkeypatch):
    """A model whose tokenizer, name resolution and reach checks count their calls."""
    m = Gemma3.from_config(CFG, seed=1, tokenizer=CountingTokenizer(CFG.vocab_size))
    calls = {"resolve": 0, "reaches": 0}
    resolve, reaches = m.registry.names.resolve, m.reaches

    def counting_resolve(spec):
        calls["resolve"] += 1
        return resolve(spec)

    def counting_reaches(*args, **kwargs):
        calls["reaches"] += 1
        return reaches(*args, **kwargs)

    monkeypatch.setattr(m.registry.names, "resolve", counting_resolve)
    monkeypatch.setattr(m, "reaches", counting_reaches)
    m.calls = calls
    return m


@pytest.mark.parametrize("names", ["blocks.*.resid_post", None, ["embed", "blocks.1.mlp.out"]])
def test_run_with_cache_of_text_tokenizes_resolves_and_checks_reach_once(counted, names):
    m = counted
    n_sites = len(m.registry.names.names if names is None else Gemma3.from_config(CFG).registry.resolve(names))
    _, cache = m.run_with_cache(TEXT, names)
    assert m.tokenizer.encodes == 1
    assert m.calls["resolve"] == 1
    assert m.calls["reaches"] == n_sites == len(cache)


def test_a_batch_of_texts_is_tokenized_once(counted):
    _, cache = counted.run_with_cache(TEXTS, "blocks.*.resid_post")
    assert counted.tokenizer.batches == 1 and counted.tokenizer.encodes == 0
    assert cache["blocks.0.resid_post"].shape[:2] == (2, 5)


def test_run_with_grads_tokenizes_resolves_and_checks_reach_once(counted):
    m = counted
    m.run_with_grads(TEXT, lambda logits: logits[0, -1, 3], "blocks.*.resid_post")
    assert m.tokenizer.encodes == 1
    assert m.calls["resolve"] == 2  # the names, and the leaf hook's own "embed"
    assert m.calls["reaches"] == CFG.n_layers + 1  # the cached sites, and the leaf hook's site in forward


def test_other_hooks_are_still_checked_for_reach(counted):
    m = counted
    with pytest.raises(InputError, match="cannot fire"):
        m.run_with_cache(TEXT, "blocks.0.resid_post", stop_at_layer=1,
                         hooks={"blocks.2.mlp.out": lambda x, site: None})


def test_prepared_text_gives_the_results_of_ids_and_mask():
    m = Gemma3.from_config(CFG, seed=1, tokenizer=FakeTokenizer(CFG.vocab_size))
    ids, mask = m.to_tokens_and_mask(TEXTS)
    logits, cache = m.run_with_cache(TEXTS, "blocks.*.resid_post")
    ref_logits, ref = m.run_with_cache(ids, "blocks.*.resid_post", attention_mask=mask)
    assert torch.equal(logits, ref_logits) and torch.equal(logits, m(TEXTS))
    assert all(torch.equal(cache[n], ref[n]) for n in ref)


def test_a_glob_warning_still_names_the_caller():
    m = Gemma3.from_config(CFG, seed=1)
    for call in (lambda: m.run_with_cache(torch.tensor([[2, 5, 7]]), "blocks.*.resid_post", stop_at_layer=1),
                 lambda: m.run_with_grads(torch.tensor([[2, 5, 7]]), lambda r: r.sum(), "blocks.*.resid_post",
                                          stop_at_layer=1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in caught] == [__file__]


def test_a_prepared_input_must_match_the_runs_layers():
    m = Gemma3.from_config(CFG, seed=1)
    ids, mask = to_ids(CFG, None, [2, 5, 7])
    prepared = PreparedInput([2, 5, 7], ids, mask, 0, None, ())
    assert torch.equal(m(prepared), m([2, 5, 7]))
    with pytest.raises(InputError, match="prepare it with the run's bounds"):
        m(prepared, stop_at_layer=1)


def test_the_cache_estimate_sums_every_sites_shape():
    m = Gemma3.from_config(CFG, seed=1)
    for names, positions in ((None, None), ("blocks.*.attn.{pattern,q}", [-1]), ("logits", None)):
        kept = 7 if positions is None else 1
        by_site = sum(math.prod(site_shape(CFG, n, 2, kept, keys=7)) for n in m.registry.resolve(names)) * 4
        assert m.estimate_cache_bytes(names, 2, 7, positions=positions) == by_site

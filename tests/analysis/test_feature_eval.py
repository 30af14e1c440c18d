"""interp.features.quality: a dictionary's sparsity, reconstruction and language-model effect on a
harvested store, against hand computations on the tiny model.

The model is ``support.TINY`` with a char-level tokenizer and its embedding scaled by 16, and the
documents are runs of repeated characters: the residual stream then mostly carries the current
token, which the tied unembedding predicts again, so the clean model beats a zero-ablated one by
a clear margin (CE about 2.4 against log(100) = 4.6) and "CE loss recovered" is well conditioned.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings

import pytest
import torch
from support import TINY, make_model

from interp.data import harvest
from interp.features import DictionaryFileError, JumpReLUSAE, TopKSAE, Transcoder
from interp.features.quality import FeatureEval, compare_dictionaries, evaluate

SAE_SITE = "blocks.1.resid_post"
TC_IN, TC_OUT = "blocks.2.pre_mlp_norm", "blocks.2.post_mlp_norm"
SITES = [SAE_SITE, TC_IN, TC_OUT]
D = TINY.d_model
IDS = torch.tensor([[2, 40, 41, 42, 7, 8]])


class CharTokenizer:
    """One token per character: printable ASCII c -> 3 + ord(c) - 32 (BOS 2, pad 0)."""

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([2] if bos else []) + [3 + ord(c) - 32 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - 3 + 32) for i in ids if int(i) >= 3)

    def to_str_tokens(self, ids) -> list[str]:
        return [self.decode([i]) or "<bos>" for i in ids]


def documents(n: int = 12, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(c * rng.randint(3, 8) for c in rng.choices("abcdefghij", k=10)) for _ in range(n)]


def copying_model(seed: int = 0):
    m = make_model(TINY, seed=seed, tokenizer=CharTokenizer())
    with torch.no_grad():
        m.embed.weight.mul_(16.0)
    return m


@pytest.fixture(scope="module")
def model():
    m = copying_model()
    yield m
    assert not m.registry.active, "a test left hooks on the shared model"


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    """12 documents packed into 16-token rows, float32, shards of 4 rows."""
    out = tmp_path_factory.mktemp("eval") / "store"
    return harvest(model, documents(), SITES, out, context=16, batch_size=4, shard_tokens=64, dtype=torch.float32,
                   progress=False)


@contextlib.contextmanager
def intact(m):
    """After the block (which may raise): no hooks left and logits bit-identical to before."""
    before = m(IDS)
    try:
        yield
    finally:
        assert not m.registry.active
        assert torch.equal(m(IDS), before)


# ---------------------------------------------------------------------- hand computations
def tokens(store, site: str, limit: int | None = None) -> torch.Tensor:
    """Every harvested (non-padding) vector of ``site`` in store order: ``[N, d]``."""
    x = store[site][:]
    x = x[store.valid()].reshape(-1, x[0, 0].numel())
    return x if limit is None else x[:limit]


def hand_stats(d, x_in: torch.Tensor, target: torch.Tensor) -> dict:
    acts = d.encode(x_in)
    recon = d(x_in).double()
    t = target.double()
    err = (t - recon).pow(2).sum()
    return {"n": x_in.shape[0], "l0": float((acts > 0).sum(-1).double().mean()),
            "fvu": float(err / (t - t.mean(0)).pow(2).sum()), "mse": float(err / x_in.shape[0]),
            "freq": (acts > 0).double().mean(0).float()}


def store_rows(store) -> list[torch.Tensor]:
    return [store.ids[r][store.doc[r] != -2] for r in range(store.n_rows)]


@torch.no_grad()
def hand_ce(m, rows, hooks=None) -> float:
    """Mean next-token cross-entropy over every predicted token (row by row, plain forward)."""
    total, n = 0.0, 0
    for ids in rows:
        logits = m.run_with_hooks(ids[None], hooks) if hooks else m(ids[None])
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[1:], reduction="sum"))
        n += ids.numel() - 1
    return total / n


def splice(d):
    """The SAE's reconstruction in place of its site (an independent hook, not dictionary_hooks)."""
    return {d.site: lambda x, site: d(x)}


def zero(site):
    return {site: lambda x, s: torch.zeros_like(x)}


def perfect_sae(site: str = SAE_SITE) -> JumpReLUSAE:
    """[I, -I] / [I; -I] with zero thresholds: relu(x) - relu(-x) = x, exactly."""
    eye = torch.cat([torch.eye(D), -torch.eye(D)], 1)
    return JumpReLUSAE(eye, eye.T.contiguous(), site=site)


# ---------------------------------------------------------------------- the numbers
def test_numbers_equal_hand_computations(model, store):
    sae = JumpReLUSAE.random(D, 96, site=SAE_SITE, seed=3, threshold=0.5)
    with intact(model), warnings.catch_warnings():
        warnings.simplefilter("error")  # the store's own model: no fingerprint warning
        result = evaluate(model, sae, store, progress=False)
    x = tokens(store, SAE_SITE)
    hand = hand_stats(sae, x, x)
    assert result.n_tokens == hand["n"] == store.manifest["n_tokens"]
    assert result.l0 == pytest.approx(hand["l0"], rel=1e-6)
    assert result.fvu == pytest.approx(hand["fvu"], rel=1e-6)
    assert result.explained_variance == pytest.approx(1 - hand["fvu"], rel=1e-6)
    assert result.mse == pytest.approx(hand["mse"], rel=1e-6)
    torch.testing.assert_close(result.frequency, hand["freq"], rtol=0, atol=1e-7)
    assert result.n_dead == int((hand["freq"] == 0).sum())
    assert result.n_dense == int((hand["freq"] > 0.1).sum())
    rows = store_rows(store)
    assert result.ce_tokens == sum(r.numel() - 1 for r in rows)
    assert result.ce_clean == pytest.approx(hand_ce(model, rows), rel=1e-5)
    assert result.ce_spliced == pytest.approx(hand_ce(model, rows, splice(sae)), rel=1e-5)
    assert result.ce_zero == pytest.approx(hand_ce(model, rows, zero(SAE_SITE)), rel=1e-5)
    assert result.ce_recovered == pytest.approx((result.ce_zero - result.ce_spliced)
                                                / (result.ce_zero - result.ce_clean), rel=1e-9)
    assert result.ce_zero - result.ce_clean > 1.0  # the model is well conditioned for the ratio


def test_max_tokens_and_odd_batches_read_the_first_tokens(model, store):
    sae = TopKSAE.random(D, 40, k=5, site=SAE_SITE, seed=1)
    result = evaluate(model, sae, store, max_tokens=75, batch_size=7, ce=False, progress=False)
    x = tokens(store, SAE_SITE, limit=75)
    hand = hand_stats(sae, x, x)
    assert result.n_tokens == 75
    assert result.l0 == pytest.approx(5.0)  # TopK fires exactly k (pre-activations positive here)
    assert result.l0 == pytest.approx(hand["l0"])
    assert result.fvu == pytest.approx(hand["fvu"], rel=1e-6)
    torch.testing.assert_close(result.frequency, hand["freq"], rtol=0, atol=1e-7)
    assert result.ce_clean is None and result.ce_recovered is None
    assert [m for m, _ in result.table()][-1] == "dense features (> 10%)"  # no CE rows


def test_ce_tokens_limits_the_store_rows_scored(model, store):
    sae = perfect_sae()
    result = evaluate(model, sae, store, ce_tokens=40, progress=False)
    rows = store_rows(store)[:2]  # 16-token rows: two fit in 40 tokens
    assert result.ce_tokens == 30
    assert result.ce_clean == pytest.approx(hand_ce(model, rows), rel=1e-5)
    assert result.ce_zero == pytest.approx(hand_ce(model, rows, zero(SAE_SITE)), rel=1e-5)


def test_texts_are_scored_instead_of_the_store_rows(model, store):
    texts = ["aaaabbbbbcccc", "jjjjjiiiihhhhhgg"]
    sae = JumpReLUSAE.random(D, 64, site=SAE_SITE, seed=0)
    result = evaluate(model, sae, store, texts=texts, progress=False)
    rows = [torch.tensor(CharTokenizer().encode(t)) for t in texts]
    assert result.ce_tokens == sum(len(t) for t in texts)
    assert result.ce_clean == pytest.approx(hand_ce(model, rows), rel=1e-5)
    assert result.ce_spliced == pytest.approx(hand_ce(model, rows, splice(sae)), rel=1e-5)
    assert result.ce_zero == pytest.approx(hand_ce(model, rows, zero(SAE_SITE)), rel=1e-5)


def test_a_perfect_dictionary_recovers_everything_and_a_random_one_does_not(model, store):
    perfect = evaluate(model, perfect_sae(), store, progress=False)
    assert perfect.fvu == pytest.approx(0.0, abs=1e-10)
    assert perfect.explained_variance == pytest.approx(1.0, abs=1e-10)
    assert perfect.l0 == pytest.approx(D, abs=1e-9)  # every coordinate is nonzero: one of +x / -x fires
    assert perfect.ce_spliced == pytest.approx(perfect.ce_clean, abs=1e-5)
    assert perfect.ce_recovered == pytest.approx(1.0, abs=1e-5)
    random_sae = evaluate(model, JumpReLUSAE.random(D, 2 * D, site=SAE_SITE, seed=0), store, progress=False)
    assert random_sae.fvu > 0.2
    assert random_sae.explained_variance < 0.8
    assert abs(random_sae.ce_spliced - random_sae.ce_clean) > 0.05
    assert random_sae.ce_recovered < 0.98
    assert random_sae.ce_clean == pytest.approx(perfect.ce_clean, rel=1e-6)
    assert random_sae.ce_zero == pytest.approx(perfect.ce_zero, rel=1e-6)


def cut(values: torch.Tensor, q: float) -> float:
    """A value between two distinct sorted ``values`` near quantile ``q``, with a clear margin on both
    sides (so float rounding cannot move a token across it)."""
    s = values.sort().values
    margin = 1e-4 * float(s[-1] - s[0])
    j = int(q * len(s))
    while float(s[j] - s[j - 1]) <= margin:
        j -= 1
    return float(s[j - 1] + s[j]) / 2


def test_planted_dead_and_dense_features(model, store):
    """Feature 0 always fires (bias 1, no weights), 1 and 5 never (negative biases), 2 and 4 split the
    tokens on either side of a cut through one direction (about half each), 3 fires only far out on
    it (a few percent): frequencies by hand."""
    x = tokens(store, SAE_SITE)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(D, generator=gen)
    u = u / u.norm()
    proj = x @ u
    middle, rare = cut(proj, 0.5), cut(proj, 0.97)
    W = torch.zeros(D, 6)
    W[:, 2] = u
    W[:, 3] = u
    W[:, 4] = -u
    b = torch.tensor([1.0, -1.0, -middle, 0.0, middle, -1e6])
    threshold = torch.tensor([0.0, 0.0, 0.0, rare, 0.0, 0.0])
    sae = JumpReLUSAE(W, torch.randn(6, D, generator=gen), b_enc=b, threshold=threshold, site=SAE_SITE)
    result = evaluate(model, sae, store, ce=False, progress=False)
    n = x.shape[0]
    expected = torch.tensor([1.0, 0.0, float((proj > middle).sum()) / n, float(((proj > rare) & (proj > 0)).sum()) / n,
                             float((proj < middle).sum()) / n, 0.0])
    torch.testing.assert_close(result.frequency, expected, rtol=0, atol=1e-7)
    assert expected[2] + expected[4] == pytest.approx(1.0)
    assert 0.3 < expected[2] < 0.7 and 0 < expected[3] < 0.1
    assert result.dead.tolist() == [1, 5] and result.n_dead == 2
    assert result.dense.tolist() == [0, 2, 4] and result.n_dense == 3
    strict = evaluate(model, sae, store, ce=False, progress=False, dense_threshold=0.99)
    assert strict.dense.tolist() == [0] and strict.n_dead == 2
    assert dict(strict.table())["dense features (> 99%)"] == 1
    assert result.l0 == pytest.approx(float(expected.sum()), rel=1e-6)


def test_transcoder_uses_both_sites_and_zeroes_its_output(model, store):
    tc = Transcoder.random(model, layer=2, d_sae=48, seed=0, skip=True)
    with intact(model):
        result = evaluate(model, tc, store, progress=False)
    x_in, x_out = tokens(store, TC_IN), tokens(store, TC_OUT)
    hand = hand_stats(tc, x_in, x_out)
    assert (result.site, result.site_out) == (TC_IN, TC_OUT)
    assert result.fvu == pytest.approx(hand["fvu"], rel=1e-6)
    assert result.l0 == pytest.approx(hand["l0"], rel=1e-6)
    assert hand["fvu"] != pytest.approx(hand_stats(tc, x_in, x_in)["fvu"], rel=1e-3)  # target is the output
    rows = store_rows(store)
    held = {}

    def read(x, site):
        held["x"] = x

    hooks = [(TC_IN, read), (TC_OUT, lambda y, site: tc(held["x"]))]
    assert result.ce_spliced == pytest.approx(hand_ce(model, rows, hooks), rel=1e-5)
    assert result.ce_zero == pytest.approx(hand_ce(model, rows, zero(TC_OUT)), rel=1e-5)
    assert abs(result.ce_zero - result.ce_clean) > 1e-3 and abs(result.ce_spliced - result.ce_clean) > 1e-3
    assert dict(result.table())["site"] == f"{TC_IN} -> {TC_OUT}"


def test_site_names_an_alias_or_the_stores_name(model, store):
    aliased = perfect_sae("model.layers.1")  # Hugging Face's name for blocks.1.resid_post
    result = evaluate(model, aliased, store, ce=False, progress=False)
    assert result.site == SAE_SITE and result.fvu == pytest.approx(0.0, abs=1e-10)
    # the store's blocks.2.pre_mlp_norm read as if it were the dictionary's site
    other = evaluate(model, perfect_sae(SAE_SITE), store, site=TC_IN, ce=False, progress=False)
    assert other.site == TC_IN and other.fvu == pytest.approx(0.0, abs=1e-10)
    tc = Transcoder.random(model, layer=2, d_sae=16, seed=0)
    swapped = evaluate(model, tc, store, site=(SAE_SITE, TC_OUT), ce=False, progress=False)
    hand = hand_stats(tc, tokens(store, SAE_SITE), tokens(store, TC_OUT))
    assert swapped.fvu == pytest.approx(hand["fvu"], rel=1e-6)


def test_errors_name_the_problem_and_leave_the_model_intact(model, store, tmp_path):
    only_in = harvest(model, documents(4), [TC_IN], tmp_path / "in", context=16, shard_tokens=64, progress=False)
    with intact(model):
        with pytest.raises(KeyError, match=r"blocks\.3\.resid_post.*did not harvest"):
            evaluate(model, perfect_sae("blocks.3.resid_post"), store, progress=False)
        with pytest.raises(KeyError, match=r"predicts 'blocks\.2\.post_mlp_norm'.*did not harvest"):
            evaluate(model, Transcoder.random(model, layer=2, d_sae=8), only_in, progress=False)
        with pytest.raises(DictionaryFileError, match="width 64"):
            evaluate(model, JumpReLUSAE.random(D, 8, site="blocks.1.mlp.hidden"), store, progress=False)
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            evaluate(model, perfect_sae(), store, batch_size=0, progress=False)
        with pytest.raises(ValueError, match="max_tokens must be a positive int"):
            evaluate(model, perfect_sae(), store, max_tokens=0, progress=False)
        with pytest.raises(ValueError, match=r"dense_threshold .* \[0, 1\)"):
            evaluate(model, perfect_sae(), store, dense_threshold=1.5, progress=False)
        with pytest.raises(ValueError, match="got 3 names"):
            evaluate(model, perfect_sae(), store, site=[SAE_SITE, TC_IN, TC_OUT], progress=False)


def test_a_store_from_another_model_warns(store):
    other = copying_model(seed=5)
    with pytest.warns(UserWarning, match="harvested from another model"):
        result = evaluate(other, perfect_sae(), store, ce_tokens=16, progress=False)
    assert result.ce_recovered == pytest.approx(1.0, abs=1e-5)


def test_table_repr_and_plot(model, store):
    gen = torch.Generator().manual_seed(1)
    sae = JumpReLUSAE(torch.randn(D, 8, generator=gen), torch.randn(8, D, generator=gen),
                      b_enc=torch.tensor([5.0, -1e6, 0, 0, 0, 0, 0, 0]), site=SAE_SITE)
    result = evaluate(model, sae, store, progress=False, name="planted <b>")
    table = dict(result.table())
    assert list(table) == ["site", "tokens", "features", "L0", "FVU", "explained variance", "MSE per token",
                           "dead features", "dense features (> 10%)", "CE clean", "CE spliced", "CE zero-ablated",
                           "CE loss recovered", "CE tokens"]
    assert table["L0"] == result.l0 and table["CE loss recovered"] == result.ce_recovered
    assert table["dead features"] == result.n_dead == int((result.frequency == 0).sum()) >= 1
    assert isinstance(table["tokens"], int)
    text = repr(result)
    assert text.splitlines()[0] == "FeatureEval  planted <b>"
    assert f"{result.fvu:.4g}" in text and "CE loss recovered" in text
    fig = result.plot()
    live, dense, dead = fig.data
    assert len(live.x) + len(dense.x) == 8 - result.n_dead
    assert len(dense.x) == result.n_dense and list(dead.y) == [result.n_dead]
    title = fig.layout.title.text
    assert "planted &lt;b&gt;" in title and "<b>" not in title
    assert f"L0 {result.l0:.1f}" in title and f"CE recovered {result.ce_recovered:.1%}" in title
    assert f"{result.n_dead} dead" in title and f"{result.n_dense} dense" in title
    assert isinstance(result, FeatureEval)


def test_compare_dictionaries_shares_the_clean_loss(model, store):
    comparison = compare_dictionaries(model, {"perfect": perfect_sae(), "random": JumpReLUSAE.random(
        D, 64, site=SAE_SITE, seed=0)}, store, ce_tokens=48, progress=False)
    rows = comparison.table()
    assert rows[0] == ("dictionary", "perfect", "random")
    fvu = dict((r[0], r[1:]) for r in rows)["FVU"]
    assert fvu[0] == pytest.approx(0.0, abs=1e-10) and fvu[1] > 0.2
    assert comparison["perfect"].ce_clean == comparison["random"].ce_clean
    alone = evaluate(model, JumpReLUSAE.random(D, 64, site=SAE_SITE, seed=0), store, ce_tokens=48, progress=False)
    assert comparison["random"].ce_recovered == pytest.approx(alone.ce_recovered, rel=1e-6)
    assert "perfect" in repr(comparison) and not math.isnan(comparison["random"].fvu)

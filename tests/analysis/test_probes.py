"""Linear probes: a planted direction is found (and only where it is), the batched fit equals
one fit per site, the split is seeded and stratified, ridge recovers a linear target, stores
harvested from a model give the same probes as activations computed by hand, errors are clear."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from support import TINY, make_model

from interp.data import Corpus, harvest, sentence_pairs
from interp.hooks import NonFiniteError
from interp.probes import ProbeError, ProbeResult, probe
from interp.tokens import Top

N, D = 1200, 32


class CharTokenizer:
    """One token per character: id ``3 + (ord(c) - 32) % 90`` (BOS 2, padding 0)."""

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([2] if bos else []) + [3 + (ord(c) - 32) % 90 for c in text]

    def batch_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.encode(t) for t in texts]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
        return ids, mask

    def decode(self, ids) -> str:
        return "".join(chr(32 + (int(i) - 3)) if i >= 3 else "" for i in ids)

    def to_str_tokens(self, ids) -> list[str]:
        return [self.decode([i]) for i in ids]


def planted(seed: int = 0, n: int = N, d: int = D, noise: float = 0.1):
    """Site 'info' holds x (anisotropic, offset) with labels sign(x.w + noise); 'noise' is independent."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen)
    w = w / w.norm()
    scale = torch.rand(d, generator=gen) * 2 + 0.5
    # isotropic (so the best direction is w itself), offset (so the probe needs its bias)
    x = torch.randn(n, d, generator=gen) + torch.randn(d, generator=gen) * 3
    labels = ((x - x.mean(0)) @ w + noise * torch.randn(n, generator=gen) > 0).long()
    return {"noise": torch.randn(n, d, generator=gen) * scale, "info": x}, labels, w


# ---------------------------------------------------------------------- recovery
def test_recovers_a_planted_direction_only_where_it_is():
    feats, labels, w = planted()
    result = probe(feats, labels)
    assert isinstance(result, ProbeResult) and result.sites == ["noise", "info"]
    assert result.metric == "accuracy" and result.classes == [0, 1]
    assert float(result.test_score[1]) > 0.9 and float(result.train_score[1]) > 0.9
    assert 0.4 < float(result.test_score[0]) < 0.6  # chance at the noise site
    cos = float(result.direction("info") @ w)
    assert cos > 0.9  # the direction points to class 1, in the original space
    assert result.directions.shape == (2, D)
    torch.testing.assert_close(result.directions.norm(dim=-1), torch.ones(2))
    assert result.best() == result.top(1)[0] and result.best().label == "info"


def test_directions_live_in_the_original_space():
    """Scaling one dimension by 10 is undone by the standardisation: the direction's component
    along it shrinks by 10, and predictions on raw activations still match the scores."""
    feats, labels, w = planted(seed=3)
    x = feats["info"].clone()
    x[:, 0] *= 10.0
    result = probe({"info": x}, labels)
    w_scaled = w.clone()
    w_scaled[0] /= 10.0
    assert float(result.directions[0] @ (w_scaled / w_scaled.norm())) > 0.9
    pred = result.predict(x, "info")
    acc = (pred == labels).float()
    torch.testing.assert_close(acc[result.test_rows].mean(), result.test_score[0])
    torch.testing.assert_close(acc[result.train_rows].mean(), result.train_score[0])


def test_batched_fit_equals_each_site_alone():
    feats, labels, _ = planted(seed=1)
    feats["other"] = feats["info"][:, torch.randperm(D, generator=torch.Generator().manual_seed(5))] * 0.5 + 1.0
    together = probe(feats, labels, weight_decay=1e-2)
    for i, site in enumerate(together.sites):
        alone = probe({site: feats[site]}, labels, weight_decay=1e-2)
        torch.testing.assert_close(alone.weights[0], together.weights[i], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(alone.bias[0], together.bias[i], atol=2e-3, rtol=2e-3)
        assert float(alone.directions[0] @ together.directions[i]) > 0.9999
        assert float(alone.test_score[0]) == pytest.approx(float(together.test_score[i]), abs=2 / alone.n_test)
        assert torch.equal(alone.test_rows, together.test_rows)


def test_tensor_source_equals_dict_source():
    feats, labels, _ = planted(seed=2)
    a = probe(feats, labels)
    b = probe(torch.stack([feats["noise"], feats["info"]]), labels, names=["noise", "info"])
    c = probe(torch.stack([feats["noise"], feats["info"]]), labels)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.test_score, b.test_score)
    assert b.sites == ["noise", "info"] and c.sites == ["0", "1"]


def test_multiclass_directions_per_class():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(900, D, generator=gen)
    labels = ["abc"[int(i)] for i in x[:, :3].argmax(1)]  # string classes
    result = probe({"x": x, "noise": torch.randn(900, D, generator=gen)}, labels)
    assert result.classes == ["a", "b", "c"]
    assert result.directions.shape == (2, 3, D) and result.weights.shape == (2, D, 3)
    assert float(result.test_score[0]) > 0.9 and float(result.test_score[1]) < 0.5
    # class c's direction loads on dimension 2 more than on any other
    assert int(result.directions[0, 2].argmax()) == 2
    test_labels = [labels[i] for i in result.test_rows.tolist()]
    assert result.chance == pytest.approx(max(test_labels.count(k) for k in "abc") / len(test_labels))


def test_linear_kind_recovers_a_planted_target():
    feats, _, w = planted(seed=6)
    gen = torch.Generator().manual_seed(7)
    target = feats["info"] @ w * 3.0 + 1.5 + 0.01 * torch.randn(N, generator=gen)
    result = probe(feats, target, kind="linear")
    assert result.metric == "r2" and result.classes == []
    assert float(result.test_score[1]) > 0.999 and float(result.train_score[1]) > 0.999
    assert float(result.test_score[0]) < 0.05
    assert float(result.direction("info") @ w) > 0.999
    pred = result.predict(feats["info"], "info")
    torch.testing.assert_close(pred, target, atol=0.05, rtol=0)
    assert result.chance == 0.0


def test_linear_kind_multi_target_batched_equals_alone():
    feats, _, w = planted(seed=8)
    target = torch.stack([feats["info"] @ w, feats["info"][:, 0] - feats["info"][:, 1]], 1)
    together = probe(feats, target, kind="linear", weight_decay=1e-3)
    alone = probe({"info": feats["info"]}, target, kind="linear", weight_decay=1e-3)
    torch.testing.assert_close(alone.weights[0], together.weights[1], atol=1e-5, rtol=1e-5)
    assert together.directions.shape == (2, 2, D)


# ---------------------------------------------------------------------- splits and seeds
def test_deterministic_with_a_seed_and_stratified():
    feats, labels, _ = planted(seed=9)
    a, b = probe(feats, labels, seed=3), probe(feats, labels, seed=3)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.test_score, b.test_score)
    assert torch.equal(a.test_rows, b.test_rows)
    c = probe(feats, labels, seed=4)
    assert not torch.equal(a.test_rows, c.test_rows)
    # disjoint, complete, and stratified: each class is held out at test_fraction
    assert sorted(a.train_rows.tolist() + a.test_rows.tolist()) == list(range(N))
    for cls in (0, 1):
        n_cls = int((labels == cls).sum())
        assert int((labels[a.test_rows] == cls).sum()) == round(0.25 * n_cls)
    d = probe(feats, labels, test_fraction=0.5)
    assert d.n_test == pytest.approx(N / 2, abs=1)


def test_plot_top_and_table():
    feats, labels, _ = planted(seed=10)
    feats = {"<b>site</b>": feats["noise"], "blocks.3.resid_post": feats["info"]}
    result = probe(feats, labels)
    fig = result.plot()
    assert isinstance(fig, go.Figure)
    assert [t.name for t in fig.data] == ["train", "test"]
    assert list(fig.data[1].x) == ["&lt;b&gt;site&lt;/b&gt;", "blocks.3.resid_post"]
    assert "<b>site" not in str(fig.to_dict()["data"])
    assert fig.layout.shapes and fig.layout.shapes[0].y0 == pytest.approx(result.chance)  # the chance line
    top = result.top(2)
    assert all(isinstance(t, Top) for t in top)
    assert [t.label for t in top] == ["blocks.3.resid_post", "<b>site</b>"]
    assert top[0].index == (1,) and top[0].value == pytest.approx(float(result.test_score[1]))
    assert [row[0] for row in result.table()] == result.sites
    assert "best blocks.3.resid_post" in repr(result)
    lin = probe(feats, feats["blocks.3.resid_post"][:, 0], kind="linear")
    assert "R²" in lin.plot().layout.yaxis.title.text and not lin.plot().layout.shapes


def test_sites_select_with_globs():
    feats, labels, _ = planted(seed=11)
    feats = {"blocks.0.resid_post": feats["noise"], "blocks.1.resid_post": feats["info"], "embed": feats["info"]}
    result = probe(feats, labels, "blocks.*.resid_post")
    assert result.sites == ["blocks.0.resid_post", "blocks.1.resid_post"]
    assert probe(feats, labels, ["embed"]).sites == ["embed"]


# ---------------------------------------------------------------------- errors
def test_errors_are_clear():
    feats, labels, _ = planted(seed=12, n=200)
    with pytest.raises(ProbeError, match="labels has 199 entries, but the activations have 200 rows"):
        probe(feats, labels[:199])
    with pytest.raises(ProbeError, match="single class"):
        probe(feats, torch.ones(200, dtype=torch.long))
    bad = feats["info"].clone()
    bad[17, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'info' hold NaN or inf \(1 of 200 rows, the first row 17\)"):
        probe({"noise": feats["noise"], "info": bad}, labels)
    bad[17, 3] = float("inf")
    with pytest.raises(NonFiniteError, match="'info' hold NaN or inf"):
        probe({"info": bad}, labels)
    with pytest.raises(ProbeError, match="kind must be one of"):
        probe(feats, labels, kind="svm")
    with pytest.raises(ProbeError, match="test_fraction must be between 0 and 1"):
        probe(feats, labels, test_fraction=1.0)
    with pytest.raises(ProbeError, match="site 'blocks.9' is not in the source"):
        probe(feats, labels, "blocks.9")
    with pytest.raises(ProbeError, match=r"a tensor source is \[sites, n, d\]"):
        probe(torch.zeros(200, D), labels)
    with pytest.raises(ProbeError, match="names= gives 3 names, but the tensor holds 2 sites"):
        probe(torch.zeros(2, 200, D), labels, names=["a", "b", "c"])
    with pytest.raises(ProbeError, match="one shape"):
        probe({"a": feats["info"], "b": feats["info"][:, :8]}, labels)
    with pytest.raises(ProbeError, match="source must be an ActivationStore"):
        probe([feats["info"]], labels)
    with pytest.raises(ProbeError, match="linear targets must be finite"):
        probe(feats, torch.full((200,), float("nan")), kind="linear")
    with pytest.raises(ProbeError, match="too few"):
        probe({"a": torch.randn(1, D)}, [0], kind="linear")
    with pytest.raises(ProbeError, match="steps must be a positive int"):
        probe(feats, labels, steps=0)


# ---------------------------------------------------------------------- from a harvest
@pytest.fixture(scope="module")
def char_model():
    return make_model(TINY, seed=3, tokenizer=CharTokenizer())


def test_probe_from_an_activation_store(char_model, tmp_path):
    texts, labels = sentence_pairs(160, seed=0)  # questions (1) end in '?', statements (0) in '.'
    store = harvest(char_model, Corpus(texts), "blocks.*.resid_post", tmp_path / "h", context=72, pack=False,
                    dtype=torch.float32, progress=False, batch_size=16)
    assert store.n_rows == len(texts) and bool((~store.valid()).any())  # rows of several lengths: padding
    result = probe(store, labels, "blocks.*.resid_post", test_fraction=0.25, seed=0)
    assert result.sites == [f"blocks.{i}.resid_post" for i in range(TINY.n_layers)]
    assert bool((result.test_score > 0.9).all())  # the last token is '?' or '.': every layer sees it

    # the same probe from activations computed by hand at each text's last token
    by_hand: dict[str, list[torch.Tensor]] = {s: [] for s in result.sites}
    for text in texts:
        _, cache = char_model.run_with_cache(text, names="blocks.*.resid_post")
        for s in result.sites:
            by_hand[s].append(cache[s][0, -1])
    direct = probe({s: torch.stack(v) for s, v in by_hand.items()}, labels, seed=0)
    assert torch.equal(direct.test_rows, result.test_rows)
    torch.testing.assert_close(direct.mean, result.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct.test_score, result.test_score)
    for i in range(len(result.sites)):
        assert float(direct.directions[i] @ result.directions[i]) > 0.999

    # positions=0 is BOS in every row: identical activations, so nothing to learn
    bos = probe(store, labels, "blocks.0.resid_post", positions=0)
    assert float(bos.test_score[0]) <= 0.6
    mean = probe(store, labels, "blocks.5.resid_post", positions="mean")
    assert mean.sites == ["blocks.5.resid_post"]
    with pytest.raises(ProbeError, match=r"positions=-40, but row \d+ has only \d+ harvested tokens"):
        probe(store, labels, positions=-40)
    with pytest.raises(ProbeError, match="positions must be an int"):
        probe(store, labels, positions="last")
    with pytest.raises(ProbeError, match="labels has 159 entries, but the activations have 160 rows"):
        probe(store, labels[:-1], "blocks.0.resid_post")


def test_the_joint_fit_used_on_gpus_equals_fitting_each_site():
    from interp.probe_fit import fit_logistic

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 200, 6, generator=gen)
    y = (x[0, :, 0] + 0.5 * x[1, :, 1] > 0).long()
    w, b = fit_logistic(x, y, 2, 1e-3, 200)
    for i in range(3):
        wi, bi = fit_logistic(x[i:i + 1], y, 2, 1e-3, 200)
        torch.testing.assert_close(w[i:i + 1], wi, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(b[i:i + 1], bi, atol=2e-3, rtol=2e-3)

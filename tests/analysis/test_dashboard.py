"""interp.features.dashboard: the one-pass top-activation scan against brute force, feature pages
(escaped token text, checked in the source and as headless Chromium renders it), logit effects,
and the index of many features.

The tiny model reads characters; the character ``~`` reads back as the token text
``<script>alert(1)</script>`` (``support.SCRIPT``), so any page that shows it unescaped would run it.
A planted SAE on ``embed`` has feature 0 firing exactly on ``~``.
"""

from __future__ import annotations

import html
import json
import math
import os
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from support import SCRIPT, TINY, make_model

from interp.data import ActivationStore, harvest
from interp.features import JumpReLUSAE, Transcoder
from interp.features.dashboard import (
    feature_dashboard,
    feature_index,
    logit_effects,
    logit_effects_of,
    page_name,
    top_activations,
)

D = TINY.d_model
TILDE = 3 + ord("~") - 32  # 97
CONTEXT = 16
IDS = torch.tensor([[2, 40, 41, 42, 7, 8]])


class CharTokenizer:
    """One token per printable ASCII character (3 + ord(c) - 32); ``~`` shows as SCRIPT."""

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([2] if bos else []) + [3 + ord(c) - 32 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - 3 + 32) for i in ids if int(i) >= 3)

    def to_str_tokens(self, ids) -> list[str]:
        return [SCRIPT if int(i) == TILDE else (self.decode([i]) or "<bos>") for i in ids]


def documents(n: int = 16, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ~") for _ in range(rng.randint(5, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    m = make_model(TINY, tokenizer=CharTokenizer())
    yield m
    assert not m.registry.active


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "store"
    return harvest(model, documents(), ["embed", "blocks.1.resid_post"], out, context=CONTEXT, batch_size=4,
                   shard_tokens=64, dtype=torch.float32, progress=False)


def planted(model) -> JumpReLUSAE:
    """Feature 0 reads the direction of ``~``'s embedding with a threshold half way to the next token,
    so it fires on ``~`` only; features 1..7 are random."""
    with torch.no_grad():
        x = model.embed.weight * math.sqrt(D)  # what the embed site holds (the sqrt(d) scale)
        u = x[TILDE] / x[TILDE].norm()
        pre = x @ u
        others = torch.cat([pre[:TILDE], pre[TILDE + 1:]])
        assert float(others.max()) < 0.8 * float(pre[TILDE])
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(D, 8, generator=gen) / math.sqrt(D)
        W[:, 0] = u
        threshold = torch.full((8,), 0.1)
        threshold[0] = (float(others.max()) + float(pre[TILDE])) / 2
        W_dec = torch.randn(8, D, generator=gen)
        W_dec[0] = u
        return JumpReLUSAE(W, W_dec, threshold=threshold, site="embed")


def brute(d, store, site) -> torch.Tensor:
    """Activations ``[rows, context, d_sae]`` of every token (NaN where nothing was harvested or padding)."""
    x = store[site][:]
    acts = d.encode(x.reshape(*x.shape[:2], -1)).float()
    full = torch.full((store.n_rows, store.context, d.d_sae), math.nan)
    full[:, store.positions] = acts.masked_fill(~store.valid()[..., None], math.nan)
    return full


def check_against_brute(tops, full, k: int) -> None:
    """Each scanned feature's top k equals a per-feature brute-force top k (ties may swap places)."""
    for i, f in enumerate(tops.features.tolist()):
        col = full[..., f]
        valid = ~col.isnan()
        values = col[valid]
        want = values[values > 0].sort(descending=True).values[:k]
        top = tops.top(f)
        got = torch.tensor([v for _, _, v in top])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for row, pos, v in top:
            assert full[row, pos, f] == pytest.approx(v, rel=1e-6)
        if len(want) == k:  # every token strictly above the k-th value must be listed
            above = {(int(r), int(p)) for r, p in ((col > want[-1] + 1e-6) & valid).nonzero().tolist()}
            assert above <= {(r, p) for r, p, _ in top}
        assert int(tops.count[i]) == int((values > 0).sum())
        assert len(top) == len({(r, p) for r, p, _ in top})  # no token twice
        for n, (row, pos, _) in enumerate(top):  # the windows hold the activations around each top token
            span = torch.arange(pos - tops.before, pos + tops.after + 1)
            inside = (span >= 0) & (span < store_context(full))
            want_w = torch.full((span.numel(),), math.nan)
            want_w[inside] = full[row, span[inside], f]
            torch.testing.assert_close(tops.windows[i, n], want_w, rtol=1e-6, atol=1e-6, equal_nan=True)


def store_context(full: torch.Tensor) -> int:
    return full.shape[1]


@pytest.fixture
def count_reads(monkeypatch):
    """Every ``ActivationStore.shard_slice`` call, as ``(shard, site, lo, hi)``."""
    calls: list[tuple[int, str, int, int]] = []
    original = ActivationStore.shard_slice

    def spy(self, shard, site, lo, hi):
        calls.append((shard, site, lo, hi))
        return original(self, shard, site, lo, hi)

    monkeypatch.setattr(ActivationStore, "shard_slice", spy)
    return calls


# ---------------------------------------------------------------------- the scan
def test_planted_feature_tops_are_the_planted_token(model, store):
    sae = planted(model)
    tops = top_activations(sae, store, [0, 3], k=6, window=(3, 2), progress=False)
    top = tops.top(0)
    assert len(top) == 6
    assert all(int(store.ids[r, p]) == TILDE for r, p, _ in top)
    n_tilde = int(((store.ids == TILDE) & (store.doc != -2)).sum())
    assert int(tops.count[0]) == n_tilde and tops.n_tokens == store.manifest["n_tokens"]
    assert tops.frequency(0) == pytest.approx(n_tilde / tops.n_tokens)
    check_against_brute(tops, brute(sae, store, "embed"), k=6)
    assert tops.windows.shape == (2, 6, 6)
    assert tops.sample[0].numel() == n_tilde  # fewer than sample_size: every activation


def test_many_features_in_one_pass_equal_brute_force(store, count_reads):
    sae = JumpReLUSAE.random(D, 24, site="blocks.1.resid_post", seed=2, threshold=0.3)
    tops = top_activations(sae, store, None, k=5, window=(4, 3), progress=False)
    n_shards = -(-store.n_rows // store.shard_rows)
    assert sorted(c[0] for c in count_reads) == list(range(n_shards))  # each shard read once
    assert sum(hi - lo for _, _, lo, hi in count_reads) == store.n_rows
    assert {c[1] for c in count_reads} == {"blocks.1.resid_post"}
    assert tops.features.tolist() == list(range(24))
    check_against_brute(tops, brute(sae, store, "blocks.1.resid_post"), k=5)


def test_sample_is_a_subset_of_the_activations(store):
    sae = JumpReLUSAE.random(D, 6, site="blocks.1.resid_post", seed=0, threshold=0.0)
    tops = top_activations(sae, store, [0, 1], k=3, sample_size=20, progress=False)
    full = brute(sae, store, "blocks.1.resid_post")
    for i in range(2):
        firing = full[..., i][full[..., i] > 0]
        assert int(tops.count[i]) > 20 and tops.sample[i].numel() == 20
        for v in tops.sample[i].tolist():
            assert (firing - v).abs().min() < 1e-5
        assert float(tops.max[i]) == pytest.approx(float(firing.max()))
        assert float(tops.total[i]) == pytest.approx(float(firing.sum()), rel=1e-5)


def test_padding_is_never_a_top_and_unharvested_positions_are_unknown(model, tmp_path):
    unpacked = harvest(model, documents(8, seed=1), ["embed"], tmp_path / "u", context=CONTEXT, pack=False,
                       shard_tokens=64, dtype=torch.float32, progress=False)
    assert bool((unpacked.doc == -2).any())
    always = JumpReLUSAE(torch.zeros(D, 2), torch.randn(2, D), b_enc=torch.tensor([1.0, -1.0]), site="embed")
    tops = top_activations(always, unpacked, [0, 1], k=200, progress=False)
    assert int(tops.count[0]) == int((unpacked.doc != -2).sum()) == tops.n_tokens
    assert all(int(unpacked.doc[r, p]) != -2 for r, p, _ in tops.top(0))
    assert tops.top(1) == [] and int(tops.count[1]) == 0
    assert (tops.rows[1] == -1).all() and (tops.positions[1] == -1).all() and (tops.values[1] == 0).all()
    assert tops.windows[1].isnan().all()
    even = harvest(model, documents(), ["embed"], tmp_path / "e", context=CONTEXT, positions=list(range(0, 16, 2)),
                   shard_tokens=64, dtype=torch.float32, progress=False)
    sae = planted(model)
    tops = top_activations(sae, even, [0], k=4, window=(2, 2), progress=False)
    assert all(p % 2 == 0 for _, p, _ in tops.top(0))
    assert tops.windows[0, :, [1, 3]].isnan().all() and not tops.windows[0, :, 2].isnan().any()
    check_against_brute(tops, brute(sae, even, "embed"), k=4)
    page = feature_dashboard(model, sae, 0, even, k=4, window=(2, 2), progress=False)
    assert 'class="tok unknown" title="not harvested"' in page


# ---------------------------------------------------------------------- pages
def scripts(page: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>", page)


def test_dashboard_escapes_token_text_and_embeds_plotly_once(model, store, tmp_path):
    from plotly.offline import get_plotlyjs

    path = tmp_path / "sub" / "feature0.html"
    page = feature_dashboard(model, planted(model), 0, store, k=5, path=path, progress=False)
    assert path.read_text(encoding="utf-8") == page
    assert repr(page) == f"<HTML page, {len(page.encode()) / 1e6:.1f} MB, written to {path}>"  # a notebook's echo
    assert SCRIPT not in page
    assert page.count(html.escape(SCRIPT)) >= 5  # each context's top token (and the logit tables)
    assert 'class="tok top" style="background: rgba(255, 90, 0, 1.000)" title="activation' in page
    assert not any("src=" in tag for tag in scripts(page))  # nothing fetched: no CDN, no file
    assert page.count('id="plotlyjs"') == 1 and page.count(get_plotlyjs()[:400]) == 1
    assert page.count("Plotly.newPlot") == 1  # the histogram


def test_never_firing_feature_page(model, store):
    dead = JumpReLUSAE(torch.zeros(D, 2), torch.randn(2, D), b_enc=torch.tensor([-1.0, 1.0]), site="embed")
    page = feature_dashboard(model, dead, 0, store, progress=False)
    assert "never fires" in page and "No non-zero activations" in page and "Plotly.newPlot" not in page
    assert f"fires on 0 of {store.manifest['n_tokens']:,} tokens" in page


def test_logit_effects_equal_hand_computation(model, store):
    sae = planted(model)
    up, down = logit_effects(model, sae, 0, k=4)
    with torch.no_grad():
        effect = model.embed.weight @ (sae.W_dec[0] * (1 + model.final_norm.weight))
    assert [t for t, _, _ in up] == effect.topk(4).indices.tolist()
    assert [t for t, _, _ in down] == effect.topk(4, largest=False).indices.tolist()
    assert [v for _, _, v in up] == pytest.approx(effect.topk(4).values.tolist(), rel=1e-5)
    assert up[0][0] == TILDE and up[0][1] == SCRIPT  # the token it reads is the one it writes
    page = feature_dashboard(model, sae, 0, store, k=3, k_logits=4, progress=False)
    assert page.count('<td class="token">') == 8
    assert f'<td class="token">{html.escape(SCRIPT)}</td><td class="num">{up[0][2]:+.4g}</td>' in page
    assert "data-dependent scale" in page


def test_logit_effects_need_a_residual_width(model, store, tmp_path):
    mlp = JumpReLUSAE.random(TINY.d_mlp, 8, site="blocks.1.mlp.hidden", seed=0)
    assert logit_effects(model, mlp, 0) is None
    wide = harvest(model, documents(4), ["blocks.1.mlp.hidden"], tmp_path / "w", context=CONTEXT, shard_tokens=64,
                   progress=False)
    page = feature_dashboard(model, mlp, 0, wide, k=3, progress=False)
    assert "writes width 64, not the residual stream's 32: no logit effects" in page
    tc = Transcoder.random(model, layer=1, d_sae=8, seed=0)
    assert logit_effects(model, tc, 0) is not None


def test_feature_index_one_pass_pages_and_links(model, store, tmp_path, count_reads):
    sae = JumpReLUSAE.random(D, 16, site="blocks.1.resid_post", seed=4, threshold=0.3)
    features = [0, 3, 5, 6, 11, 15]
    out = feature_index(model, sae, store, features, tmp_path / "pages", k=4, progress=False)
    assert out == tmp_path / "pages"
    n_shards = -(-store.n_rows // store.shard_rows)
    assert sorted(c[0] for c in count_reads) == list(range(n_shards))  # one pass for all six features
    assert sum(hi - lo for _, _, lo, hi in count_reads) == store.n_rows
    index = (out / "index.html").read_text(encoding="utf-8")
    links = re.findall(r'<a href="([^"]+)">', index)
    assert links == [page_name(f) for f in features]
    data = json.loads((out / "index.json").read_text(encoding="utf-8"))
    full = brute(sae, store, "blocks.1.resid_post")
    n = store.manifest["n_tokens"]
    assert data["n_tokens"] == n and [e["feature"] for e in data["features"]] == features
    for entry in data["features"]:
        f = entry["feature"]
        col = full[..., f]
        values = col[~col.isnan()]
        assert entry["count"] == int((values > 0).sum()) and entry["frequency"] == pytest.approx(entry["count"] / n)
        want = values[values > 0].sort(descending=True).values[:4]
        assert [v for _, _, v in entry["top"]] == pytest.approx(want.tolist(), rel=1e-6)
        for row, pos, v in entry["top"]:
            assert float(col[row, pos]) == pytest.approx(v, rel=1e-6)
        assert f'<td class="num">{entry["frequency"]:.4%}</td>' in index
        page = (out / page_name(f)).read_text(encoding="utf-8")
        assert '<a href="index.html">' in page and f"<h1>Feature {f}</h1>" in page
        assert [t for t in scripts(page) if "src=" in t] == ['<script id="plotlyjs" type="text/javascript" '
                                                            'src="plotly.min.js">']
        assert len(page) < 200_000  # plotly.js is not inlined in every page
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.html", "index.json", "plotly.min.js"] + [page_name(f) for f in features])


def test_feature_index_top_tokens_are_escaped(model, store, tmp_path):
    out = feature_index(model, planted(model), store, [0], tmp_path / "p", k=3, progress=False)
    index = (out / "index.html").read_text(encoding="utf-8")
    assert SCRIPT not in index and f'<span class="tok">{html.escape(SCRIPT)}</span>' in index
    assert json.loads((out / "index.json").read_text())["features"][0]["top_tokens"] == [SCRIPT]


def test_errors(model, store, tmp_path):
    sae = planted(model)
    before = model(IDS)
    with pytest.raises(IndexError, match="feature 8 is outside the dictionary's 8 features"):
        feature_dashboard(model, sae, 8, store, progress=False)
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_activations(sae, store, [0], k=0, progress=False)
    with pytest.raises(ValueError, match="features must not repeat"):
        top_activations(sae, store, [1, 1], progress=False)
    with pytest.raises(ValueError, match="window is"):
        top_activations(sae, store, [1], window=(-1, 2), progress=False)
    with pytest.raises(KeyError, match=r"'blocks\.3\.resid_post', which this store did not harvest"):
        top_activations(JumpReLUSAE.random(D, 4, site="blocks.3.resid_post"), store, progress=False)
    with pytest.raises(TypeError, match="out_dir"):  # a required argument, not a None that then raises
        feature_index(model, sae, store, [0])
    assert not model.registry.active and torch.equal(model(IDS), before)


# ---------------------------------------------------------------------- in a browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _Visible(HTMLParser):
    """The text a person sees (outside script and style) and the contents of every script element."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "script":
            self.scripts.append("")
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data: str) -> None:
        if "script" in self.stack:
            self.scripts[-1] += data
        elif "style" not in self.stack:
            self.text.append(data)


@pytest.mark.subprocess
def test_chromium_shows_the_token_as_text(model, store, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("INTERP_REQUIRE_BROWSER"):
            pytest.fail("INTERP_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium); CI installs it")
    path = tmp_path / "feature.html"
    feature_dashboard(model, planted(model), 0, store, k=5, path=path, progress=False)
    dom = _dump_dom(path, tmp_path)
    assert 'class="main-svg"' in dom, "plotly did not draw the histogram (offline plotly.js not run)"
    seen = _Visible()
    seen.feed(dom)
    visible = "".join(seen.text)
    assert visible.count(SCRIPT) >= 5, visible[:2000]
    assert not any("alert(1)" in s for s in seen.scripts)
    assert "Feature 0" in visible and "Top activations" in visible
    # the index of a folder of pages: the same token in the top-tokens column, as text
    folder = feature_index(model, planted(model), store, [0, 1], tmp_path / "pages", k=3, progress=False)
    seen = _Visible()
    seen.feed(_dump_dom(folder / "index.html", tmp_path))
    visible = "".join(seen.text)
    assert SCRIPT in visible and "2 features of JumpReLUSAE" in visible
    assert not any("alert(1)" in s for s in seen.scripts)


def _dump_dom(path, tmp_path) -> str:
    try:
        proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                               "--virtual-time-budget=10000", "--dump-dom", path.as_uri()], capture_output=True,
                              text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("Chromium did not finish rendering the page (a script on it, e.g. an alert(), blocked it)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_logit_effects_of_many_features_equal_one_at_a_time(model):
    d = JumpReLUSAE.random(D, 70, site="blocks.1.resid_post", seed=5)
    many = logit_effects_of(model, d, list(range(70)), k=5, chunk=16)  # several chunks
    for f in (0, 15, 16, 69):  # same tokens; values equal to float32 rounding (another matmul shape)
        for got, want in zip(many[f], logit_effects(model, d, f, k=5)):
            assert [t for t, _, _ in got] == [t for t, _, _ in want]
            assert [v for _, _, v in got] == pytest.approx([v for _, _, v in want], rel=1e-5, abs=1e-7)

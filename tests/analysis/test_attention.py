"""Attention analyses (interp/attention.py): patterns, head scores, distance, induction loss.

A tiny random model with grouped-query attention and a window (4) shorter than the sequences
checks the scores against the cached pattern by hand, and against patterns forced through a
hook on ``attn.pattern`` to be exactly a previous-token / induction / duplicate / BOS head.
The demo model (Gemma 3 270M) checks that induction heads exist and are few.
"""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from support import TINY

from interp.attention import (
    HEAD_SCORE_KINDS,
    AttentionDistance,
    HeadScores,
    InductionLoss,
    PatternResult,
    ablate_heads_hooks,
    all_head_scores,
    attention_distance,
    attention_patterns,
    head_scores,
    induction_loss,
    repeated_random_tokens,
    target_mask,
)
from interp.model import Gemma3, Gemma3Config

CFG = TINY
N = 6  # length of the random block r in BOS + r + r (13 tokens > window)


class StubTokenizer:
    """Token strings with HTML in them: id 5 is '<b>', id 6 is ' x\\n'."""

    def to_str_tokens(self, ids):
        return ["<b>" if i == 5 else " x\n" if i == 6 else f"t{i}" for i in ids]


@pytest.fixture(scope="module")
def model() -> Gemma3:
    return Gemma3.from_config(CFG, seed=0)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return repeated_random_tokens(CFG, seq_len=N, batch_size=2, seed=1)


@pytest.fixture(scope="module")
def patterns(model, tokens) -> dict[int, torch.Tensor]:
    _, cache = model.run_with_cache(tokens, "blocks.*.attn.pattern")
    return {i: cache[f"blocks.{i}.attn.pattern"] for i in range(CFG.n_layers)}


# ---------------------------------------------------------------------- tokens and masks
def test_repeated_random_tokens_layout():
    t = repeated_random_tokens(CFG, seq_len=N, batch_size=3, seed=4)
    assert t.shape == (3, 1 + 2 * N)
    assert (t[:, 0] == CFG.bos_token_id).all()
    assert torch.equal(t[:, 1:N + 1], t[:, N + 1:])
    for row in t[:, 1:N + 1]:
        assert len(set(row.tolist())) == N  # no repeats inside r
    assert int(t[:, 1:].min()) > max(CFG.pad_token_id, CFG.eos_token_id, CFG.bos_token_id)
    assert torch.equal(t, repeated_random_tokens(CFG, seq_len=N, batch_size=3, seed=4))  # seeded
    big = repeated_random_tokens(Gemma3Config.preset("1b"), seq_len=20, batch_size=1)
    assert int(big[0, 1:].min()) >= 1000
    with pytest.raises(ValueError, match="distinct"):
        repeated_random_tokens(CFG, seq_len=200)


def test_target_masks_on_repeated_tokens(tokens):
    s = tokens.shape[1]
    ind, dup = target_mask(tokens, "induction"), target_mask(tokens, "duplicate_token")
    for q in range(s):
        want_ind = [q - N + 1] if q > N else []
        want_dup = [q - N] if q > N else []
        for b in range(tokens.shape[0]):
            assert ind[b, q].nonzero().flatten().tolist() == want_ind
            assert dup[b, q].nonzero().flatten().tolist() == want_dup
    assert target_mask(tokens, "previous_token")[0].nonzero().tolist() == [[q, q - 1] for q in range(1, s)]
    assert target_mask(tokens, "bos")[0].nonzero().tolist() == [[q, 0] for q in range(1, s)]
    with pytest.raises(ValueError, match="unknown"):
        target_mask(tokens, "copying")


# ---------------------------------------------------------------------- scores by hand
def test_scores_match_hand_computation(model, patterns):
    """Each kind's score equals the mean of the right diagonal of the cached pattern."""
    scores = all_head_scores(model, seq_len=N, batch_size=2, seed=1)
    assert set(scores) == set(HEAD_SCORE_KINDS)
    for layer, p in patterns.items():
        s = p.shape[-1]
        prev = torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).mean((0, 2))  # p[q, q-1], q >= 1
        bos = p[:, :, 1:, 0].mean((0, 2))
        dup = torch.diagonal(p, offset=-N, dim1=-2, dim2=-1)[..., 1:].mean((0, 2))  # q = N+1 .. 2N
        ind = torch.diagonal(p, offset=-(N - 1), dim1=-2, dim2=-1)[..., 2:].mean((0, 2))
        assert torch.diagonal(p, offset=-(N - 1), dim1=-2, dim2=-1)[..., 2:].shape[-1] == N
        for kind, want in (("previous_token", prev), ("bos", bos), ("duplicate_token", dup), ("induction", ind)):
            got = scores[kind].scores[layer]
            torch.testing.assert_close(got, want.float(), msg=f"{kind} layer {layer}")
        assert s == 1 + 2 * N
    # local layers: the induction target (N-1 = 5 back) is outside the window of 4
    for layer in range(CFG.n_layers):
        if not CFG.is_global(layer):
            assert float(scores["induction"].scores[layer].abs().max()) == 0.0


def test_scores_on_a_prompt_match_hand_computation(model):
    prompt = torch.tensor([[2, 7, 8, 9, 7, 8, 30, 7]])
    _, cache = model.run_with_cache(prompt, "blocks.5.attn.pattern")
    p = cache["blocks.5.attn.pattern"][0]  # [h, q, k]
    dup = head_scores(model, "duplicate_token", prompt, layers=[5])
    # queries with an earlier copy: 4 (7 at 1), 5 (8 at 2), 7 (7 at 1 and 4)
    want = (p[:, 4, 1] + p[:, 5, 2] + p[:, 7, 1] + p[:, 7, 4]) / 3
    torch.testing.assert_close(dup.scores[0], want)
    ind = head_scores(model, "induction", prompt, layers=[5])
    # token after an earlier copy: 4 -> 2 (after 7 at 1), 5 -> 3, 7 -> 2 and 5
    want = (p[:, 4, 2] + p[:, 5, 3] + p[:, 7, 2] + p[:, 7, 5]) / 3
    torch.testing.assert_close(ind.scores[0], want)
    assert ind.layers == [5] and ind.source == "prompt"
    with pytest.raises(ValueError, match="repeats no token"):
        head_scores(model, "induction", [2, 7, 8, 9])


def _forced(kind: str, s: int, n: int) -> torch.Tensor:
    """An exact pattern [s, s] of one kind on BOS + r + r (queries without a target attend to BOS)."""
    p = torch.zeros(s, s)
    p[:, 0] = 1.0
    for q in range(1, s):
        k = {"previous_token": q - 1, "bos": 0,
             "duplicate_token": q - n if q > n else None, "induction": q - n + 1 if q > n else None}[kind]
        if k is not None:
            p[q] = 0.0
            p[q, k] = 1.0
    return p


@pytest.mark.parametrize("kind", HEAD_SCORE_KINDS)
def test_forced_pattern_scores_one(model, kind):
    """Patch head 1 of a local layer (2) and head 3 of the global layer (5) to an exact
    pattern of ``kind`` with ``model.hooks``: their score is 1, the other heads' below 1."""
    s = 1 + 2 * N
    forced = _forced(kind, s, N)

    def force(x, site):
        x = x.clone()
        x[:, {2: 1, 5: 3}[site.layer]] = forced
        return x

    with model.hooks({"blocks.{2,5}.attn.pattern": force}):
        res = head_scores(model, kind, seq_len=N, batch_size=2, seed=3)
    assert res[2, 1] == pytest.approx(1.0, abs=1e-6)
    assert res[5, 3] == pytest.approx(1.0, abs=1e-6)
    if kind != "bos":  # random heads do not put all their attention on one target (they may on BOS)
        others = [res[layer, h] for layer in range(CFG.n_layers) for h in range(4)
                  if (layer, h) not in ((2, 1), (5, 3))]
        assert max(others) < 0.99
        assert {t.index for t in res.top(2)} == {(2, 1), (5, 3)}
    # the same through the hooks= argument
    again = head_scores(model, kind, seq_len=N, batch_size=2, seed=3, hooks={"blocks.{2,5}.attn.pattern": force})
    torch.testing.assert_close(again.scores, res.scores)


def test_top_and_repr(model):
    res = head_scores(model, "previous_token", seq_len=N, batch_size=1)
    assert isinstance(res, HeadScores)
    top = res.top(5)
    assert len(top) == 5 and [t.value for t in top] == sorted((t.value for t in top), reverse=True)
    (layer, head), score, label = top[0]
    assert label == f"L{layer}H{head}"
    assert score == pytest.approx(float(res.scores.max()))
    assert res[layer, head] == pytest.approx(score)
    assert "previous_token" in repr(res)


def test_layers_selection_caches_only_those(model, tokens):
    res = attention_patterns(model, tokens, layers=[3, 1])
    assert sorted(res.patterns) == [1, 3]
    assert res.pattern(1).shape == (4, tokens.shape[1], tokens.shape[1])
    with pytest.raises(KeyError, match="not computed"):
        res.pattern(2)
    with pytest.raises(ValueError, match="outside"):
        attention_patterns(model, tokens, layers=[6])
    sc = head_scores(model, "bos", seq_len=N, batch_size=1, layers=[4])
    assert sc.scores.shape == (1, 4) and sc.layers == [4]


def test_patterns_match_a_full_run(model, tokens, patterns):
    res = attention_patterns(model, tokens)
    for layer in range(CFG.n_layers):
        torch.testing.assert_close(res.patterns[layer], patterns[layer])
    assert res.tokens[0] == [str(i) for i in tokens[0].tolist()]


def test_errors(model):
    with pytest.raises(ValueError, match="unknown head-score kind"):
        head_scores(model, "copy")
    padded_tok = type("Tok", (), {"batch_encode": staticmethod(lambda texts: (torch.tensor([[0, 5], [6, 7]]),
                                                                              torch.tensor([[0, 1], [1, 1]])))})()
    m = Gemma3.from_config(CFG, seed=0, tokenizer=padded_tok)
    with pytest.raises(ValueError, match="unpadded"):
        attention_patterns(m, ["a", "b c"])


# ---------------------------------------------------------------------- distance
def test_distance_matches_pattern_and_window(model, patterns):
    tokens = repeated_random_tokens(CFG, seq_len=N, batch_size=2, seed=1)
    res = attention_distance(model, tokens)
    assert isinstance(res, AttentionDistance) and res.distance.shape == (6, 4) and res.seq_len == 1 + 2 * N
    s = 1 + 2 * N
    d = (torch.arange(s)[:, None] - torch.arange(s)[None, :]).abs().float()
    for layer, p in patterns.items():
        torch.testing.assert_close(res.distance[layer], (p * d).sum(-1).mean((0, 2)))
        if not CFG.is_global(layer):
            assert float(res.distance[layer].max()) < CFG.window - 1 + 1e-6
    assert res.is_global == [CFG.is_global(i) for i in range(6)]
    # all attention on BOS: mean distance = mean query index
    bos = _forced("bos", s, N)
    forced = attention_distance(model, tokens, layers=[5],
                                hooks={"blocks.5.attn.pattern": lambda x, site: bos.expand_as(x).clone()})
    torch.testing.assert_close(forced.distance, torch.full((1, 4), (s - 1) / 2))


def test_distance_default_tokens(model):
    res = attention_distance(model, seq_len=10, layers=[0, 5])
    assert res.seq_len == 11 and res.layers == [0, 5]
    assert float(res.distance[0].max()) < CFG.window


# ---------------------------------------------------------------------- plots
@pytest.fixture(scope="module")
def html_model() -> Gemma3:
    return Gemma3.from_config(CFG, seed=0, tokenizer=StubTokenizer())


def _no_raw_html(values) -> None:
    for v in values:
        assert "<b>" not in str(v), v


def test_pattern_plot_head_selector_and_escaping(html_model):
    res = attention_patterns(html_model, [2, 5, 6, 5, 9], layers=[0, 5])
    assert isinstance(res, PatternResult)
    assert res.tokens[0] == ["t2", "<b>", " x\n", "<b>", "t9"]
    fig = res.plot(5)
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == CFG.n_heads
    buttons = fig.layout.updatemenus[0].buttons
    assert len(buttons) == CFG.n_heads
    assert [b.args[0]["visible"] for b in buttons] == [[i == h for i in range(4)] for h in range(4)]
    assert [t.visible for t in fig.data] == [None, False, False, False]
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks == ["t2", "&lt;b&gt;", "·x↵", "&lt;b&gt;", "t9"] == list(fig.layout.yaxis.ticktext)
    _no_raw_html(v for row in fig.data[0].customdata for v in row)
    torch.testing.assert_close(torch.tensor(fig.data[2].z, dtype=torch.float32), res.pattern(5, 2))
    one = res.plot(0, head=2)
    assert len(one.data) == 1 and not one.layout.updatemenus and "head 2" in one.layout.title.text
    assert "local" in one.layout.title.text
    grid = res.plot_grid(5)
    assert len(grid.data) == CFG.n_heads
    _no_raw_html(grid.layout.xaxis.ticktext)
    assert "&lt;b&gt;" in grid.layout.xaxis4.ticktext
    _no_raw_html(v for row in grid.data[0].customdata for v in row)


def test_score_and_distance_plots(model):
    sc = head_scores(model, "induction", seq_len=N, batch_size=1)
    fig = sc.plot()
    assert isinstance(fig, go.Figure)
    assert list(fig.layout.yaxis.ticktext) == [f"L{i} {'global' if CFG.is_global(i) else 'local'}" for i in range(6)]
    assert list(fig.layout.xaxis.ticktext) == ["H0", "H1", "H2", "H3"]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == 4.5  # layer 5 outlined
    dist = attention_distance(model, seq_len=10).plot()
    assert [t.name for t in dist.data] == ["local (window 4)", "global"]
    assert len(dist.data[0].x) == 5 * 4 and list(dist.data[1].x) == ["L5H0", "L5H1", "L5H2", "L5H3"]
    assert any("window" in (a.text or "") for a in dist.layout.annotations)  # the local limit line


# ---------------------------------------------------------------------- induction loss
def test_induction_loss_by_hand_and_ablation(model):
    res = induction_loss(model, seq_len=N, batch_size=2, seed=1)
    assert isinstance(res, InductionLoss) and res.per_token.shape == (2, 2 * N)
    tokens = repeated_random_tokens(CFG, seq_len=N, batch_size=2, seed=1)
    logp = model(tokens).float().log_softmax(-1)
    want = -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(res.per_token, want)
    assert res.first == pytest.approx(float(want[:, 1:N].mean()))
    assert res.second == pytest.approx(float(want[:, N + 1:].mean()))
    ablated = induction_loss(model, seq_len=N, batch_size=2, seed=1, ablate=[(5, 0), (5, 3)])
    assert not torch.allclose(ablated.per_token, res.per_token)
    via_hooks = induction_loss(model, seq_len=N, batch_size=2, seed=1,
                               hooks=ablate_heads_hooks(model, [(5, 0), (5, 3)]))
    torch.testing.assert_close(via_hooks.per_token, ablated.per_token)
    names = [name for name, _ in ablate_heads_hooks(model, [(5, 3), (1, 0), (5, 0)])]
    assert names == ["blocks.1.attn.z", "blocks.5.attn.z"]
    fig = res.plot({"ablated L5H0, L5H3": ablated})
    assert isinstance(fig, go.Figure) and len(fig.data) == 2


# ---------------------------------------------------------------------- the demo model
def test_demo_induction_heads_are_few(demo_model):
    """On repeated random tokens a few heads do induction (Gemma 3 270M: L5H1 ~0.87, L11H2
    ~0.65, L5H2 ~0.55, L13H3 and L17H2 ~0.33; median ~0.005); zero-ablating the top two
    undoes the drop in loss on the second copy."""
    ind = head_scores(demo_model, "induction", seq_len=40, batch_size=2, seed=0)
    flat = ind.scores.flatten()
    median = float(flat.median())
    top = ind.top(3)
    assert top[0].value > 0.5, ind
    assert top[0].value > 20 * max(median, 1e-3), ind
    strong = int((flat > 0.25).sum())
    assert 1 <= strong <= flat.numel() // 8, ind  # a few heads, not a broad effect
    loss = induction_loss(demo_model, seq_len=30, batch_size=1, seed=0)
    assert loss.second < 0.25 * loss.first, loss
    ablated = induction_loss(demo_model, seq_len=30, batch_size=1, seed=0, ablate=top[:2])
    assert ablated.second > 4 * loss.second, (loss, ablated)


def test_batch_size_is_the_number_of_random_rows(model):
    """``batch_size`` as everywhere else (rows of one forward pass; here the whole input)."""
    assert repeated_random_tokens(CFG, seq_len=N, batch_size=3).shape[0] == 3
    assert head_scores(model, "bos", seq_len=N, batch_size=3).source.endswith("batch_size=3, seed=0")
    assert induction_loss(model, seq_len=N, batch_size=3).per_token.shape[0] == 3
    with pytest.raises(ValueError, match="batch_size and repeats must be positive"):
        repeated_random_tokens(CFG, seq_len=N, batch_size=0)
    with pytest.raises(TypeError, match="batch"):
        head_scores(model, "bos", seq_len=N, batch=3)  # the old spelling is gone

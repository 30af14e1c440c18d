"""The logit lens: its last row is the model's output, intermediate rows are the residual after
each layer read through the final norm, top-k and targets agree, plots escape token text."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from support import SCRIPT, TINY, FakeTokenizer

from interp.lens import LensResult, logit_lens
from interp.model import Gemma3
from interp.tokens import MultiTokenWarning, layer_labels, str_tokens, token_id

CFG = TINY
IDS = torch.tensor([[2, 17, 5, 9, 7, 33, 41]])  # 7 tokens > window 4; id 7 is "<script>..." below


@pytest.fixture(scope="module")
def tiny() -> Gemma3:
    return Gemma3.from_config(CFG, seed=1)


@pytest.fixture(scope="module")
def tiny_tok() -> Gemma3:
    return Gemma3.from_config(CFG, seed=2, tokenizer=FakeTokenizer(CFG.vocab_size))


def strings_of(fig: go.Figure) -> list[str]:
    """Every string anywhere in a figure's JSON-able dict."""
    out: list[str] = []

    def walk(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "tolist"):
            walk(x.tolist())

    walk(fig.to_dict())
    return out


# ---------------------------------------------------------------------- correctness
def test_last_stage_is_the_model_output(tiny):
    lens = logit_lens(tiny, IDS, targets=list(range(CFG.vocab_size)), k=CFG.vocab_size)
    probs = tiny(IDS)[0].float().softmax(-1)  # [seq, vocab]
    torch.testing.assert_close(lens.target_probs[-1], probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lens.top_probs[-1], probs.sort(-1, descending=True).values, atol=1e-6, rtol=1e-5)
    assert torch.equal(lens.top_ids[-1, :, 0], probs.argmax(-1))


def test_each_stage_is_the_residual_after_that_layer(tiny):
    lens = logit_lens(tiny, IDS, targets=list(range(CFG.vocab_size)), k=3)
    for stage in range(CFG.n_layers + 1):
        resid = tiny(IDS, stop_at_layer=stage)  # the residual entering layer `stage`
        expect = (tiny.final_norm(resid) @ tiny.embed.weight.T)[0].softmax(-1)
        torch.testing.assert_close(lens.target_probs[stage], expect, atol=1e-6, rtol=1e-5)


def test_topk_shape_sorted_and_strings(tiny):
    lens = logit_lens(tiny, IDS, k=4)
    assert isinstance(lens, LensResult)
    assert lens.top_ids.shape == lens.top_probs.shape == (CFG.n_layers + 1, IDS.shape[1], 4)
    assert (lens.top_probs[..., :-1] >= lens.top_probs[..., 1:]).all()
    assert lens.tokens == [str(i) for i in IDS[0].tolist()]  # no tokenizer: ids as strings
    assert lens.top_tokens[3][2] == [str(i) for i in lens.top_ids[3, 2].tolist()]
    assert lens.target_probs is None and lens.positions == list(range(IDS.shape[1]))


def test_target_prob_and_rank_agree_with_topk(tiny):
    lens = logit_lens(tiny, IDS, targets=list(range(CFG.vocab_size)), k=CFG.vocab_size)
    ranks, probs = lens.target_ranks, lens.target_probs  # [stages, pos, vocab]
    # every token's rank is 1 + the number of tokens more likely than it
    assert torch.equal(ranks, (probs[..., None, :] > probs[..., :, None]).sum(-1) + 1)
    # the top-1 token has rank 1, and its target prob is the top-1 prob
    top1 = lens.top_ids[..., :1]
    assert (ranks.gather(-1, top1) == 1).all()
    torch.testing.assert_close(probs.gather(-1, top1), lens.top_probs[..., :1])


def test_targets_as_strings_take_the_first_token_without_bos(tiny_tok):
    assert token_id(tiny_tok, " w40") == 40
    with pytest.warns(MultiTokenWarning, match=r"' w40\| w41' is 2 tokens \[' w40', ' w41'\]; using its first"):
        assert token_id(tiny_tok, " w40| w41") == 40  # several tokens: the first, with a warning
    assert token_id(tiny_tok, 41) == 41
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_id(tiny_tok, CFG.vocab_size)
    lens = logit_lens(tiny_tok, IDS, targets=[" w40", 41])
    lens_ids = logit_lens(tiny_tok, IDS, targets=[40, 41])
    assert lens.targets == [40, 41] and lens.target_tokens == [" w40", " w41"]
    assert torch.equal(lens.target_probs, lens_ids.target_probs)
    assert torch.equal(lens.target_ranks, lens_ids.target_ranks)


def test_string_target_needs_a_tokenizer(tiny):
    with pytest.raises(ValueError, match="no tokenizer"):
        logit_lens(tiny, IDS, targets=[" Paris"])


def test_positions_option_reads_only_those_positions(tiny):
    full = logit_lens(tiny, IDS, targets=[5, 9])
    part = logit_lens(tiny, IDS, targets=[5, 9], positions=[-1, 1])
    assert part.positions == [1, 6]
    assert part.top_ids.shape == (CFG.n_layers + 1, 2, 5)
    torch.testing.assert_close(part.top_probs, full.top_probs[:, [1, 6]])
    torch.testing.assert_close(part.target_probs, full.target_probs[:, [1, 6]])
    assert part.table(1) == full.table(1)
    with pytest.raises(IndexError, match="not read"):
        part.table(3)
    assert logit_lens(tiny, IDS, positions=slice(0, 2)).positions == [0, 1]
    with pytest.raises(IndexError):
        logit_lens(tiny, IDS, positions=[7])


def test_one_prompt_only(tiny):
    with pytest.raises(ValueError, match="one prompt"):
        logit_lens(tiny, IDS.expand(2, -1))


def test_labels_mark_global_layers(tiny):
    lens = logit_lens(tiny, IDS)
    assert lens.labels == layer_labels(CFG) == ["embed", "L0", "L1", "L2", "L3", "L4", "L5 (global)"]
    assert lens.layer_types == list(CFG.layer_types)


def test_table_and_format_table(tiny_tok):
    lens = logit_lens(tiny_tok, IDS, targets=[" w40"])
    rows = lens.table()
    assert [r[0] for r in rows] == lens.labels
    assert rows[-1][1] == lens.top_tokens[-1][-1][0] and rows[-1][2] == pytest.approx(float(lens.top_probs[-1, -1, 0]))
    text = lens.format_table()
    assert text.splitlines()[0].split()[:3] == ["layer", "top", "token"]
    assert "p(' w40')" in text and len(text.splitlines()) == CFG.n_layers + 2
    assert "LensResult" in repr(lens)


# ---------------------------------------------------------------------- plots
def test_plot_is_an_escaped_heatmap(tiny_tok):
    lens = logit_lens(tiny_tok, IDS, targets=[7])  # token 7 is "<script>alert(1)</script>"
    fig = lens.plot()
    assert isinstance(fig, go.Figure) and isinstance(fig.data[0], go.Heatmap)
    assert fig.data[0].z.shape == (CFG.n_layers + 1, IDS.shape[1])
    strings = strings_of(fig)
    assert not any("<script" in s for s in strings)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fig.layout.xaxis.ticktext  # position 4's token
    assert "L5 (global)" in fig.layout.yaxis.ticktext
    hover = fig.data[0].customdata[-1][-1]
    assert "top 5" in hover and "<br>" in hover  # the top-5 list, one per line
    html = fig.to_html(include_plotlyjs=False)
    assert "<script>alert(1)" not in html


def test_plot_shows_top_token_in_each_cell(tiny_tok):
    lens = logit_lens(tiny_tok, IDS, positions=[0, -1])
    fig = lens.plot()
    text = fig.data[0].text
    assert len(text) == CFG.n_layers + 1 and len(text[0]) == 2
    assert text[2][1] == lens.top_tokens[2][1][0].replace(" ", "·", 1)


def test_plot_targets(tiny_tok):
    lens = logit_lens(tiny_tok, IDS, targets=[SCRIPT, " w40"])
    fig = lens.plot_targets()
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    assert list(fig.data[0].y) == pytest.approx(lens.target_probs[:, -1, 0].tolist())
    assert not any("<script" in s for s in strings_of(fig))
    rank = lens.plot_targets(position=2, metric="rank")
    assert list(rank.data[1].y) == lens.target_ranks[:, 2, 1].tolist()
    assert rank.layout.yaxis.type == "log"
    with pytest.raises(ValueError, match="metric"):
        lens.plot_targets(metric="logit")
    with pytest.raises(ValueError, match="no targets"):
        logit_lens(tiny_tok, IDS).plot_targets()


def test_str_tokens_show_tokenizer_text(tiny_tok):
    assert str_tokens(tiny_tok, torch.tensor([2, 7])) == ["<bos>", SCRIPT]
    assert logit_lens(tiny_tok, IDS).tokens[4] == SCRIPT


# ---------------------------------------------------------------------- the real model
def test_demo_lens_matches_output_and_finds_paris(demo_model):
    prompt = "The capital of France is"
    lens = logit_lens(demo_model, prompt, targets=[" Paris"])
    logits = demo_model(prompt)[0, -1].float()
    torch.testing.assert_close(lens.target_probs[-1, -1, 0], logits.softmax(-1)[lens.targets[0]], atol=1e-5, rtol=1e-4)
    assert lens.top_ids[-1, -1, 0] == logits.argmax()
    assert lens.target_ranks[-1, -1, 0] <= 5
    assert lens.tokens[0] == "<bos>" and len(lens.labels) == demo_model.cfg.n_layers + 1


def test_table_aligns_wide_characters_by_display_width(tiny_tok):
    """CJK text takes two terminal columns per character: columns line up by display width."""
    from interp.lens import aligned, display_width

    rows = [("layer", "top token", "prob"), ("L0", "'東京'", "0.500"), ("L10 (global)", "'x'", "0.250")]
    lines = aligned(rows).splitlines()
    for row, line in zip(rows, lines):
        second = line.index(row[1], len(row[0]))
        third = line.index(row[2], second + len(row[1]))
        assert display_width(line[:second]) == display_width("L10 (global)") + 2, lines
        assert display_width(line[:third]) == display_width("L10 (global)") + 2 + display_width("top token") + 2
    # and the lens table uses it: a wide target name shifts every row's later columns alike
    tiny_tok.tokenizer.vocab[40] = " 東京"
    table = logit_lens(tiny_tok, IDS, targets=[40]).format_table().splitlines()
    rank = display_width(table[0][: table[0].index("rank")])
    widths = {display_width(line[: line.rstrip().rindex("  ") + 2]) for line in table[1:]}
    assert widths == {rank}, table

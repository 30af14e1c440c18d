"""Direct logit attribution: the parts sum exactly (fp32) to the logit or logit difference, heads
to each attention part, neurons to each MLP part; heads agree with the model's head_out site."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

# grouped-query (4 query heads on 2 kv heads), 7 tokens > window 4, one global layer (5)
from support import SCRIPT, TINY, FakeTokenizer

from interp.dla import DLAResult, direct_logit_attribution
from interp.model import Gemma3

CFG = TINY
IDS = torch.tensor([[2, 17, 5, 9, 7, 33, 41]])


@pytest.fixture(scope="module")
def tiny() -> Gemma3:
    # larger weights than the default N(0, 0.02) so logits and norms are far from trivial
    m = Gemma3.from_config(CFG, seed=3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(10)
    return m


@pytest.fixture(scope="module")
def tiny_tok() -> Gemma3:
    return Gemma3.from_config(CFG, seed=4, tokenizer=FakeTokenizer(CFG.vocab_size))


def close(a, b, scale: float = 1.0) -> bool:
    return abs(float(a) - float(b)) <= 1e-5 * max(1.0, scale)


@pytest.mark.parametrize("position", [-1, 3])
def test_parts_sum_to_the_logit(tiny, position):
    logits = tiny(IDS)[0, position]
    target = int(logits.argmax())
    dla = direct_logit_attribution(tiny, IDS, target, position=position)
    assert isinstance(dla, DLAResult)
    assert dla.position == position % IDS.shape[1]
    assert dla.logit == pytest.approx(float(logits[target]), abs=1e-5)  # the model's own output
    scale = float(dla.values.abs().sum())
    assert scale > 1.0  # non-trivial parts
    assert close(dla.values.sum(), dla.logit, scale)
    assert dla.labels == ["embed"] + [f"L{i} {p}" for i in range(CFG.n_layers) for p in ("attn", "mlp")]


@pytest.mark.parametrize("position", [-1, 2])
def test_parts_sum_to_the_logit_difference(tiny, position):
    logits = tiny(IDS)[0, position]
    dla = direct_logit_attribution(tiny, IDS, 11, baseline=42, position=position)
    assert dla.logit == pytest.approx(float(logits[11] - logits[42]), abs=1e-5)
    assert close(dla.values.sum(), dla.logit, float(dla.values.abs().sum()))
    # attribution is linear in the unembedding direction: diff = target part - baseline part
    a = direct_logit_attribution(tiny, IDS, 11, position=position)
    b = direct_logit_attribution(tiny, IDS, 42, position=position)
    torch.testing.assert_close(dla.values, a.values - b.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dla.heads, a.heads - b.heads, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", [-1, 4])
def test_heads_and_neurons_sum_to_their_layer(tiny, position):
    dla = direct_logit_attribution(tiny, IDS, 5, baseline=6, position=position)
    assert dla.heads.shape == (CFG.n_layers, CFG.n_heads)
    assert dla.neurons.shape == (CFG.n_layers, CFG.d_mlp)
    torch.testing.assert_close(dla.heads.sum(-1), dla.attn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dla.neurons.sum(-1), dla.mlp, atol=1e-5, rtol=1e-5)
    assert torch.equal(dla.attn, dla.values[1::2]) and torch.equal(dla.mlp, dla.values[2::2])


def test_heads_agree_with_the_head_out_site(tiny):
    """Each head's part is its ``attn.head_out`` through the frozen post-attention-norm scale
    and the frozen final-norm scale: recompute that from the model's own sites."""
    pos, target = 5, 13
    dla = direct_logit_attribution(tiny, IDS, target, position=pos)
    _, cache = tiny.run_with_cache(IDS, names=["blocks.*.attn.head_out", "blocks.*.attn.out",
                                               f"blocks.{CFG.n_layers - 1}.resid_post"])

    def rms(x):
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + CFG.eps)

    final = cache[f"blocks.{CFG.n_layers - 1}.resid_post"][0, pos]
    u = tiny.embed.weight[target] * (1 + tiny.final_norm.weight) * rms(final)
    for i, block in enumerate(tiny.blocks):
        scale = (1 + block.post_attn_norm.weight) * rms(cache[f"blocks.{i}.attn.out"][0, pos])
        expect = cache[f"blocks.{i}.attn.head_out"][0, pos] @ (u * scale)  # [heads]
        torch.testing.assert_close(dla.heads[i], expect, atol=1e-5, rtol=1e-5)


def test_a_dead_neuron_contributes_nothing(tiny):
    """Zeroing one neuron's down-projection column zeroes its part and leaves the others."""
    dla = direct_logit_attribution(tiny, IDS, 9)
    (layer, neuron), value, _ = dla.top_neurons(1)[0]
    assert value != 0
    w = tiny.blocks[layer].mlp.down_proj.weight
    saved = w[:, neuron].clone()
    try:
        with torch.no_grad():
            w[:, neuron] = 0
        after = direct_logit_attribution(tiny, IDS, 9)
    finally:
        with torch.no_grad():
            w[:, neuron] = saved
    assert float(after.neurons[layer, neuron]) == 0.0
    assert close(after.values.sum(), after.logit, float(after.values.abs().sum()))


def test_top_neurons(tiny):
    dla = direct_logit_attribution(tiny, IDS, 9, top_neurons=7)
    top = dla.top_neurons()
    assert len(top) == 7
    mags = [abs(t.value) for t in top]
    assert mags == sorted(mags, reverse=True)
    assert mags[0] == pytest.approx(float(dla.neurons.abs().max()))
    for (layer, n), v, label in top:
        assert v == pytest.approx(float(dla.neurons[layer, n])) and label == f"L{layer} N{n}"
    per_layer = dla.top_neurons(3, layer=2)
    assert [t.index[0] for t in per_layer] == [2, 2, 2]
    assert abs(per_layer[0].value) == pytest.approx(float(dla.neurons[2].abs().max()))
    assert dla.top(1)[0].label in dla.labels and dla.top_heads(1)[0].label.startswith("L")


def test_bad_inputs(tiny):
    with pytest.raises(IndexError):
        direct_logit_attribution(tiny, IDS, 5, position=7)
    with pytest.raises(ValueError, match="one prompt"):
        direct_logit_attribution(tiny, IDS.expand(2, -1), 5)
    with pytest.raises(ValueError, match="vocabulary"):
        direct_logit_attribution(tiny, IDS, CFG.vocab_size)


def test_bfloat16_model_parts_sum_to_rounding(tiny):
    m = Gemma3.from_config(CFG, seed=3, dtype=torch.bfloat16)
    dla = direct_logit_attribution(m, IDS, 5, baseline=6)
    assert dla.values.dtype == torch.float32
    scale = float(dla.values.abs().sum())
    assert abs(float(dla.values.sum()) - dla.logit) <= 2e-2 * max(1.0, scale)


# ---------------------------------------------------------------------- plots
def test_plots(tiny_tok):
    dla = direct_logit_attribution(tiny_tok, IDS, SCRIPT, baseline=" w40", position=4)
    assert dla.target == 7 and dla.baseline == 40 and dla.target_token == SCRIPT
    assert "logit('<script>" in dla.metric and "DLAResult" in repr(dla)
    fig = dla.plot()
    assert isinstance(fig, go.Figure) and isinstance(fig.data[0], go.Bar)
    assert list(fig.data[0].x) == dla.labels
    assert list(fig.data[0].y) == pytest.approx(dla.values.tolist())
    heads = dla.plot_heads()
    assert heads.data[0].z.shape == (CFG.n_layers, CFG.n_heads)
    assert list(heads.layout.yaxis.ticktext)[-1] == "L5 (global)"
    neurons = dla.plot_neurons(k=5)
    assert len(neurons.data[0].x) == 5 and neurons.data[0].x[0].startswith("L")
    for f in (fig, heads, neurons):
        text = f.to_html(include_plotlyjs=False)
        assert "<script>alert" not in text
        assert "&lt;script&gt;" in f.layout.title.text  # the target token, escaped, in the title
    assert dla.table()[0][0] == "embed"


# ---------------------------------------------------------------------- the real model
def test_demo_parts_sum_exactly(demo_model):
    prompt = "The capital of France is"
    dla = direct_logit_attribution(demo_model, prompt, " Paris", baseline=" London")
    logits = demo_model(prompt)[0, -1].float()
    assert dla.logit == pytest.approx(float(logits[dla.target] - logits[dla.baseline]), abs=1e-3)
    scale = float(dla.values.abs().sum())
    assert abs(float(dla.values.sum()) - dla.logit) <= 1e-5 * scale
    torch.testing.assert_close(dla.heads.sum(-1), dla.attn, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(dla.neurons.sum(-1), dla.mlp, atol=1e-5 * scale, rtol=1e-5)
    at_two = direct_logit_attribution(demo_model, prompt, " of", position=2)
    assert abs(float(at_two.values.sum()) - at_two.logit) <= 1e-5 * float(at_two.values.abs().sum())

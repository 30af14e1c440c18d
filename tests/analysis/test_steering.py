"""Steering vectors: the vector is the difference of means computed by hand (prompts of several
lengths, batched with padding or not), scale 0 changes nothing, the hook is interp.add at the
site, errors leave the model clean; on the real model a sentiment vector moves the next token
towards positive or negative words and changes the generated text."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from support import TINY, make_model

from interp import add
from interp.hooks import NonFiniteError, PositionError, UnknownSiteError
from interp.steering import SteeringVector, site_activations, steering_vector

SITE = "blocks.3.resid_pre"
POSITIVES = ["a cat sat", "the good dog ran far", "yes!"]
NEGATIVES = ["no", "a bad cat sat down here", "the dog is gone"]


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


@pytest.fixture(scope="module")
def model():
    m = make_model(TINY, seed=4, tokenizer=CharTokenizer())
    yield m
    assert not m.registry.active


def by_hand(model, prompts, site=SITE, position=-1) -> torch.Tensor:
    """Each prompt alone (no padding), the site's activation at ``position``."""
    out = []
    for p in prompts:
        _, cache = model.run_with_cache(p, names=[site])
        out.append(cache[site][0, position])
    return torch.stack(out)


# ---------------------------------------------------------------------- the vector
def test_vector_is_the_difference_of_means(model):
    sv = steering_vector(model, POSITIVES, NEGATIVES, site=SITE)
    assert isinstance(sv, SteeringVector) and sv.site == SITE and sv.position == -1
    pos, neg = by_hand(model, POSITIVES), by_hand(model, NEGATIVES)
    torch.testing.assert_close(sv.positive_mean, pos.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sv.vector, pos.mean(0) - neg.mean(0), atol=1e-5, rtol=1e-5)
    assert sv.vector.shape == (TINY.d_model,) and sv.vector.dtype == torch.float32
    assert sv.n_pairs == 3 and sv.norm == pytest.approx(float(sv.vector.norm()))
    torch.testing.assert_close(sv.unit.norm(), torch.tensor(1.0))
    assert "3 positive / 3 negative" in repr(sv)
    # batch size does not matter (one prompt per batch = no padding at all)
    one = steering_vector(model, POSITIVES, NEGATIVES, site=SITE, batch_size=1)
    torch.testing.assert_close(one.vector, sv.vector, atol=1e-5, rtol=1e-5)


def test_position_counts_each_prompts_own_tokens(model):
    # position 0 is BOS in every prompt: the same activation whatever follows (and whatever padding)
    bos = steering_vector(model, POSITIVES, NEGATIVES, site=SITE, position=0)
    assert float(bos.vector.abs().max()) < 1e-5
    sv = steering_vector(model, POSITIVES, NEGATIVES, site=SITE, position=1)
    expect = by_hand(model, POSITIVES, position=1).mean(0) - by_hand(model, NEGATIVES, position=1).mean(0)
    torch.testing.assert_close(sv.vector, expect, atol=1e-5, rtol=1e-5)
    # token ids as prompts, of unequal counts
    ids = [[2, 10, 11], [2, 12]]
    sv_ids = steering_vector(model, ids, [[2, 40, 41, 42]], site=SITE)
    expect = by_hand(model, ids).mean(0) - by_hand(model, [[2, 40, 41, 42]]).mean(0)
    torch.testing.assert_close(sv_ids.vector, expect, atol=1e-5, rtol=1e-5)
    assert (sv_ids.n_positive, sv_ids.n_negative, sv_ids.n_pairs) == (2, 1, 1)


def test_other_sites_and_aliases(model):
    sv = steering_vector(model, POSITIVES, NEGATIVES, site="blocks.2.attn.z")
    assert sv.vector.shape == (TINY.n_heads, TINY.d_head)
    expect = by_hand(model, POSITIVES, "blocks.2.attn.z").mean(0) - by_hand(model, NEGATIVES, "blocks.2.attn.z").mean(0)
    torch.testing.assert_close(sv.vector, expect, atol=1e-5, rtol=1e-5)
    steered = model.run_with_hooks("a cat", sv.hook(2.0))  # a [h, hd] vector broadcasts at its site
    assert steered.shape == (1, 6, TINY.vocab_size)
    assert steering_vector(model, POSITIVES, NEGATIVES, site="model.layers.3.input").site == SITE  # HF alias
    emb = steering_vector(model, POSITIVES, NEGATIVES, site="embed")
    torch.testing.assert_close(emb.vector, by_hand(model, POSITIVES, "embed").mean(0)
                               - by_hand(model, NEGATIVES, "embed").mean(0), atol=1e-5, rtol=1e-5)
    fin = steering_vector(model, POSITIVES, NEGATIVES, site="final_norm")
    assert fin.vector.shape == (TINY.d_model,)


# ---------------------------------------------------------------------- the hook
def test_scale_zero_changes_nothing(model):
    sv = steering_vector(model, POSITIVES, NEGATIVES, site=SITE)
    prompt = "the cat and the dog"
    base = model(prompt)
    assert torch.equal(model.run_with_hooks(prompt, sv.hook(0.0)), base)
    g0 = model.generate(prompt, 8, stop_at_eos=False)
    assert torch.equal(model.generate(prompt, 8, stop_at_eos=False, hooks=sv.hook(0.0)).ids, g0.ids)
    assert not model.registry.active


def test_hook_adds_the_scaled_vector_at_the_site(model):
    sv = steering_vector(model, POSITIVES, NEGATIVES, site=SITE)
    prompt = "the cat and the dog"
    (name, fn), = sv.hook(3.0)
    assert name == SITE
    manual = model.run_with_hooks(prompt, {SITE: lambda x, site: x + 3.0 * sv.vector})
    assert torch.equal(model.run_with_hooks(prompt, sv.hook(3.0)), manual)
    assert torch.equal(model.run_with_hooks(prompt, {SITE: add(sv.vector, 3.0)}), manual)
    base = model(prompt)
    assert not torch.allclose(manual, base)
    # positions: only from position 4 on; earlier logits are untouched
    late = model.run_with_hooks(prompt, sv.hook(3.0, positions=slice(4, None)))
    assert torch.equal(late[:, :4], base[:, :4]) and not torch.allclose(late[:, 4:], base[:, 4:])
    # steering the generation changes it (a large scale on a random model)
    g0 = model.generate(prompt, 8, stop_at_eos=False)
    g1 = model.generate(prompt, 8, stop_at_eos=False, hooks=sv.hook(50.0))
    assert not torch.equal(g0.ids, g1.ids)
    assert not model.registry.active and torch.equal(model(prompt), base)


def test_projections_and_plot(model):
    sv = steering_vector(model, POSITIVES, NEGATIVES, site=SITE)
    proj_pos, proj_neg = sv.projections(model, POSITIVES), sv.projections(model, NEGATIVES)
    # measured from the midpoint of the means: the positives' mean projects to +norm/2, the negatives' to -norm/2
    assert float(proj_pos.mean()) == pytest.approx(sv.norm / 2, rel=1e-4)
    assert float(proj_neg.mean()) == pytest.approx(-sv.norm / 2, rel=1e-4)
    prompts = ["<b>bold</b>", "yes!"]
    fig = sv.plot_projection(model, prompts)
    assert isinstance(fig, go.Figure)
    assert list(fig.data[0].x) == ["&lt;b&gt;bold&lt;/b&gt;", "yes!"]
    torch.testing.assert_close(torch.tensor(list(fig.data[0].y), dtype=torch.float32),
                               sv.projections(model, prompts))
    assert site_activations(model, prompts, SITE).shape == (2, TINY.d_model)


# ---------------------------------------------------------------------- errors
def test_errors_leave_the_model_clean(model):
    prompt = "the cat"
    base = model(prompt)
    with pytest.raises(ValueError, match="lives at one site; 'blocks.\\*.resid_pre' matches 6"):
        steering_vector(model, POSITIVES, NEGATIVES, site="blocks.*.resid_pre")
    with pytest.raises(UnknownSiteError):
        steering_vector(model, POSITIVES, NEGATIVES, site="blocks.3.resid_middle")
    with pytest.raises(ValueError, match="one value per pair of tokens"):
        steering_vector(model, POSITIVES, NEGATIVES, site="blocks.3.attn.pattern")
    with pytest.raises(PositionError, match="negatives: position 3 is outside prompt 0 of 3 tokens"):
        steering_vector(model, POSITIVES, ["no"], site=SITE, position=3)
    with pytest.raises(PositionError, match="positives: position -6 is outside prompt 2 of 5 tokens"):
        steering_vector(model, POSITIVES, NEGATIVES, site=SITE, position=-6)
    with pytest.raises(ValueError, match="negatives must be a non-empty list of prompts"):
        steering_vector(model, POSITIVES, [], site=SITE)
    with pytest.raises(ValueError, match="positives must be a non-empty list of prompts, got str"):
        steering_vector(model, "a cat", NEGATIVES, site=SITE)
    with pytest.raises(TypeError, match="position must be an int"):
        steering_vector(model, POSITIVES, NEGATIVES, site=SITE, position=1.0)  # type: ignore[arg-type]
    with model.hooks({"blocks.1.mlp.out": lambda x, site: x * float("nan")}):
        with pytest.raises(NonFiniteError, match="blocks.1.mlp.out"):
            steering_vector(model, POSITIVES, NEGATIVES, site=SITE)
    assert not model.registry.active
    assert torch.equal(model(prompt), base)


# ---------------------------------------------------------------------- the real model
SENTIMENT_POS = ["I love this. It is wonderful and", "What a great day. I feel happy and",
                 "The food was delicious. We were delighted and", "This movie is amazing. It was fantastic and",
                 "She is kind and lovely. Everyone is glad and", "Best purchase ever. I am thrilled and"]
SENTIMENT_NEG = ["I hate this. It is terrible and", "What an awful day. I feel sad and",
                 "The food was disgusting. We were disappointed and", "This movie is boring. It was dreadful and",
                 "She is cruel and nasty. Everyone is upset and", "Worst purchase ever. I am furious and"]
GOOD = [" great", " wonderful", " happy", " good", " amazing"]
BAD = [" terrible", " awful", " sad", " bad", " horrible"]


def test_sentiment_vector_steers_the_demo_model(demo_model):
    m = demo_model
    sv = steering_vector(m, SENTIMENT_POS, SENTIMENT_NEG, site="blocks.8.resid_pre")
    good = [m.tokenizer.encode(w, bos=False)[0] for w in GOOD]
    bad = [m.tokenizer.encode(w, bos=False)[0] for w in BAD]

    def preference(prompt: str, scale: float) -> float:
        """log p(positive words) - log p(negative words) at the next token."""
        logp = m.run_with_hooks(prompt, sv.hook(scale))[0, -1].float().log_softmax(-1)
        return float(logp[good].logsumexp(0) - logp[bad].logsumexp(0))

    for prompt in ["The weather this weekend was", "I just finished reading the book, and I thought it was"]:
        base, up, down = preference(prompt, 0.0), preference(prompt, 6.0), preference(prompt, -6.0)
        assert up > base + 1.0, (prompt, base, up)
        assert down < base - 1.0, (prompt, base, down)

    prompt = "The weather this weekend was"
    plain = m.generate(prompt, 6)
    steered = m.generate(prompt, 6, hooks=sv.hook(6.0))
    assert steered.text != plain.text
    assert not m.registry.active

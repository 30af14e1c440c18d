"""lm_loss equals a hand computation (batches, padding, hooks); test_prompt ranks the answer."""

from __future__ import annotations

import pytest
import torch
from support import TINY, FakeTokenizer, make_model

import interp
from interp.hooks import zero_ablate


@pytest.fixture(scope="module")
def m():
    return make_model(TINY, seed=3, sensitive=True, tokenizer=FakeTokenizer(TINY.vocab_size))


TEXTS = [" w10| w11| w12| w13| w14", " w20| w21", " w30| w31| w32| w33| w34| w35| w36| w37"]


def hand_losses(m, texts, hooks=None):
    out = []
    for t in texts:
        ids = torch.tensor([m.tokenizer.encode(t)])
        logits = m.run_with_hooks(ids, hooks or {})[0].float()
        out.append(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none"))
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_lm_loss_equals_a_hand_computation(m, batch_size):
    want = hand_losses(m, TEXTS)
    got = interp.lm_loss(m, TEXTS, per_token=True, batch_size=batch_size, progress=False)
    for g, w in zip(got.per_token, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert got.n_tokens == sum(w.numel() for w in want)
    assert got.mean == pytest.approx(float(torch.cat(want).mean()), abs=1e-5)
    torch.testing.assert_close(got.per_text, torch.stack([w.mean() for w in want]), rtol=0, atol=1e-5)
    assert got.tokens[1] == ["<bos>", " w20", " w21"]


def test_lm_loss_with_hooks_and_on_token_ids(m):
    hooks = {"blocks.3.mlp.out": zero_ablate()}
    want = hand_losses(m, TEXTS[:2], hooks)
    got = interp.lm_loss(m, TEXTS[:2], per_token=True, hooks=hooks, progress=False)
    for g, w in zip(got.per_token, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert got.mean != interp.lm_loss(m, TEXTS[:2], progress=False).mean
    ids = torch.tensor([m.tokenizer.encode(TEXTS[0])])
    plain = hand_losses(m, TEXTS[:1])[0]
    assert interp.lm_loss(m, ids, progress=False).mean == pytest.approx(float(plain.mean()), abs=1e-5)
    # a hook on the logits runs the plain forward (the chunked unembedding would skip it)
    doubled = interp.lm_loss(m, TEXTS[:1], hooks={"logits": lambda x, s: x * 2}, progress=False)
    assert doubled.mean == pytest.approx(float(hand_losses(m, TEXTS[:1], {"logits": lambda x, s: x * 2})[0].mean()),
                                         abs=1e-5)
    assert not m.registry.active


def test_lm_loss_errors(m):
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        interp.lm_loss(m, [[2, 10, 11], [2]], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        interp.lm_loss(m, TEXTS, batch_size=0, progress=False)


def test_test_prompt_reports_rank_and_probability(m, capsys):
    ids = torch.tensor([m.tokenizer.encode(" w10| w11")])
    logits = m(ids)[0, -1]
    best = int(logits.argmax())
    answer = m.tokenizer.vocab[best]
    out = interp.test_prompt(m, " w10| w11", answer, k=3)
    assert out[0].rank == 1 and out[0].prob == pytest.approx(float(logits.softmax(-1)[best]), rel=1e-5)
    assert out[0].top[0][0] == answer
    printed = capsys.readouterr().out
    assert "Tokenized prompt" in printed and f"answer {answer!r}: rank 1" in printed
    two = interp.test_prompt(m, " w10| w11", answer + "| w40", print_results=False)
    after = m(torch.tensor([ids[0].tolist() + [best]]))[0, -1]  # the second answer token is predicted here
    assert len(two) == 2 and two[1].token == " w40" and two[1].rank == 1 + int((after > after[40]).sum())


def test_test_prompt_on_the_demo_model(demo_model):
    out = interp.test_prompt(demo_model, "The capital of France is", " Paris", print_results=False)
    assert out[0].token == " Paris" and out[0].rank == 3 and out[0].prob == pytest.approx(0.084, abs=0.005)

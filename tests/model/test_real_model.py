"""The real Gemma 3 270M (the embedded demo model): our model against transformers' own
loading of the same GGUF, and real predictions."""

from __future__ import annotations

import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "東京は日本の首都です。 Emoji: 🦜🌍 and   spaces",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers_gguf_loading(demo_model, hf_gguf_model, prompt):
    ids = torch.tensor([demo_model.tokenizer.encode(prompt)])
    with torch.no_grad():
        theirs = hf_gguf_model(ids).logits
    ours = demo_model(ids)
    diff = (ours - theirs).abs().max().item()
    print(f"{prompt[:20]!r}: max |logit diff| {diff:.2e} (logit scale {theirs.abs().max().item():.1f})")
    assert diff <= 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_padded_batch_of_real_prompts_matches_each_prompt_alone(demo_model):
    texts = PROMPTS[:2]
    batch = demo_model(texts)  # left-padded by the tokenizer
    for row, text in enumerate(texts):
        alone = demo_model(text)
        n = alone.shape[1]
        assert (batch[row, -n:] - alone[0]).abs().max().item() <= 1e-4


def test_paris_is_in_the_top_five(demo_model):
    probs = demo_model("The capital of France is")[0, -1].softmax(-1)
    top = probs.topk(5)
    words = [demo_model.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert " Paris" in words
    # the published reference: ' the' 0.19, ' a' 0.11, ' Paris' 0.08 as the top three
    assert words[:3] == [" the", " a", " Paris"]
    assert top.values[:3].tolist() == pytest.approx([0.19, 0.11, 0.08], abs=0.01)


def test_real_tokenizer_ids(demo_model):
    assert demo_model.tokenizer.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]


def test_residual_stream_is_the_sum_of_its_parts_on_the_real_model(demo_model):
    _, cache = demo_model.run_with_cache("The capital of France is", names=lambda n: n.endswith(
        ("embed", "post_attn_norm", "post_mlp_norm", "resid_post")))
    parts, _ = cache.decompose_resid()
    last = cache[f"blocks.{demo_model.cfg.n_layers - 1}.resid_post"]
    assert (parts.sum(0) - last).abs().max().item() <= 1e-3 * last.abs().max().item()


def test_bf16_demo_model_agrees_with_fp32(demo_path, demo_model):
    from interp.model import Gemma3

    bf16 = Gemma3.from_pretrained(demo_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    ours = bf16("The capital of France is")[0, -1].float().softmax(-1)
    ref = demo_model("The capital of France is")[0, -1].softmax(-1)
    assert (ours - ref).abs().max().item() < 0.03
    assert ref.argmax() == ours.argmax()


def test_generation_continues_greedily(demo_model):
    text = demo_model.generate("The capital of France is", max_new_tokens=5).text
    ids = demo_model.tokenizer.encode("The capital of France is")
    for _ in range(5):  # the same greedy tokens without the key/value prefix
        ids.append(int(demo_model(ids)[0, -1].argmax()))
    assert text == demo_model.tokenizer.decode(ids[6:])

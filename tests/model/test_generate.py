"""Generation with a real key/value cache: every step's logits equal a full recompute (across the
sliding window, with padding, with prompts of different lengths), ring buffers stay at the
window, sampling options, stop conditions, seeds, streaming, observable generation, chat.
"""

from __future__ import annotations

import pytest
import torch
from support import FakeTokenizer, make_model

from interp.hooks import Site, add
from interp.model import Gemma3Config, InputError, KVCache
from interp.model.config import GLOBAL, SLIDING
from interp.model.sampling import Sampler

# window 3 with 14 generated tokens: the sliding layers' rings wrap several times
CFG = Gemma3Config(n_layers=4, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, d_head=8, vocab_size=60, window=3,
                   layer_types=(SLIDING, GLOBAL, SLIDING, SLIDING))


@pytest.fixture(scope="module")
def m():
    return make_model(CFG, seed=1, sensitive=True, tokenizer=FakeTokenizer(CFG.vocab_size))


def step_logits(m, prompt, **kwargs):
    """Each step's logits ``[batch, steps, vocab]``, read with a hook on the logits site."""
    seen = []
    out = m.generate(prompt, hooks={"logits": lambda x, s: seen.append(x[:, -1].clone())}, **kwargs)
    return out, torch.stack(seen, 1)


@pytest.mark.parametrize("eager", [False, True])
def test_every_step_equals_a_full_recompute_across_the_window(m, eager):
    m.attn_impl = "eager" if eager else "auto"
    try:
        out, logits = step_logits(m, torch.tensor([[2, 7, 9]]), max_new_tokens=14, stop_at_eos=False)
        seq = out.sequences
        full = m(seq)
        for t in range(14):  # step t predicts token 3 + t from the tokens before it
            torch.testing.assert_close(logits[:, t], full[:, 2 + t], rtol=0, atol=1e-5)
        assert torch.equal(out.ids[0], full[0, 2:-1].argmax(-1))  # greedy picks what the full run picks
    finally:
        m.attn_impl = "auto"


def test_a_padded_batch_of_different_lengths_equals_each_prompt_alone(m):
    prompts = [[2, 7, 9, 11, 13, 5], [2, 30], [2, 8, 21, 4]]
    width = max(map(len, prompts))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    out, logits = step_logits(m, ids, attention_mask=mask, max_new_tokens=9, stop_at_eos=False)
    for r, p in enumerate(prompts):
        alone, alone_logits = step_logits(m, torch.tensor([p]), max_new_tokens=9, stop_at_eos=False)
        assert torch.equal(out.ids[r], alone.ids[0])
        torch.testing.assert_close(logits[r], alone_logits[0], rtol=0, atol=1e-5)
        full = m(alone.sequences)[0, len(p) - 1:-1]
        torch.testing.assert_close(logits[r], full, rtol=0, atol=1e-5)


def test_texts_are_left_padded_for_you(m):
    out = m.generate([" w10| w11", " w12"], max_new_tokens=4, stop_at_eos=False)
    assert out.prompt_mask is not None and out.prompt_mask[1].tolist() == [0, 1, 1]
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)


def test_ring_buffers_stay_at_the_window_and_global_layers_grow_in_chunks():
    kv = KVCache.empty(CFG, batch=2, capacity=8)
    m = make_model(CFG)
    sizes = []
    m(torch.randint(3, 60, (2, 5)), kv_cache=kv)
    for _ in range(40):
        m(torch.randint(3, 60, (2, 1)), kv_cache=kv)
        sizes.append({i: s.keys.shape[1] for i, s in kv.stores.items()})
    assert kv.length == 45
    for i in (0, 2, 3):  # sliding: 2 x window slots, whatever the length
        assert {s[i] for s in sizes} == {2 * CFG.window} and kv.held(i) == CFG.window
    assert sizes[-1][1] >= 45 and kv.held(1) == 45  # global: every token, grown in chunks of 256


def test_a_failed_forward_marks_a_growing_cache_broken(m):
    kv = KVCache.empty(CFG, batch=1)
    m(torch.tensor([[2, 5, 6]]), kv_cache=kv)

    def boom(x, s):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        m.run_with_hooks(torch.tensor([[7]]), {"blocks.2.mlp.out": boom}, kv_cache=kv)
    with pytest.raises(RuntimeError, match="half-updated"):
        m(torch.tensor([[7]]), kv_cache=kv)
    assert not m.registry.active


# ---------------------------------------------------------------------- sampling
def test_seeds_reproduce_and_each_row_has_its_own():
    m = make_model(CFG, seed=2)
    ids = torch.tensor([[2, 7, 9], [2, 7, 9]])
    kw = dict(max_new_tokens=10, temperature=1.0, stop_at_eos=False)
    a = m.generate(ids, seed=5, **kw)
    assert torch.equal(a.ids, m.generate(ids, seed=5, **kw).ids)
    assert not torch.equal(a.ids[0], a.ids[1])  # one generator for the batch: rows differ
    rows = m.generate(ids, seed=[11, 12], **kw)
    for r, s in enumerate((11, 12)):  # each row draws from its own seed, as if alone
        assert torch.equal(rows.ids[r], m.generate(ids[:1], seed=s, **kw).ids[0])
    with pytest.raises(InputError, match="one per row"):
        m.generate(ids, seed=[1], **kw)


def test_filters_match_transformers_logits_processors():
    import transformers

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 3
    context = torch.randint(0, 50, (4, 6), generator=gen)
    cases = [dict(top_k=5), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=10, top_p=0.8, min_p=0.05),
             dict(repetition_penalty=1.7), dict(repetition_penalty=0.6, top_p=0.9)]
    for temp in (0.7, 1.3):
        for case in cases:
            ours = Sampler(temperature=temp, **case, batch=4)
            ours.observe(context, 50)
            got = ours.probabilities(logits)
            got = got / got.sum(-1, keepdim=True)
            procs = transformers.LogitsProcessorList()
            if "repetition_penalty" in case:
                procs.append(transformers.RepetitionPenaltyLogitsProcessor(case["repetition_penalty"]))
            procs.append(transformers.TemperatureLogitsWarper(temp))
            if "top_k" in case:
                procs.append(transformers.TopKLogitsWarper(case["top_k"]))
            if "top_p" in case:
                procs.append(transformers.TopPLogitsWarper(case["top_p"]))
            if "min_p" in case:
                procs.append(transformers.MinPLogitsWarper(case["min_p"]))
            want = procs(context, logits.clone()).softmax(-1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{case} T={temp}")


def test_greedy_ignores_the_filters_and_the_penalty_changes_greedy_choices():
    m = make_model(CFG, seed=3)
    ids = torch.tensor([[2, 7, 9]])
    plain = m.generate(ids, max_new_tokens=12, stop_at_eos=False).ids
    assert torch.equal(plain, m.generate(ids, max_new_tokens=12, stop_at_eos=False, top_k=2, top_p=0.5).ids)
    penal = m.generate(ids, max_new_tokens=12, stop_at_eos=False, repetition_penalty=1e6).ids[0].tolist()
    assert len(set(penal)) == len(penal) and not set(penal) & {2, 7, 9}  # a huge penalty: nothing repeats


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0, temperature=1.0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(min_p=-0.1), dict(repetition_penalty=0.0),
                                 dict(max_new_tokens=0), dict(stop=[""])])
def test_bad_sampling_options_are_clear_errors(m, bad):
    kwargs = {"max_new_tokens": 3, **bad}
    with pytest.raises(InputError):
        m.generate(torch.tensor([[2, 7]]), **kwargs)
    assert not m.registry.active


# ---------------------------------------------------------------------- stopping
def test_eos_and_end_of_turn_stop_a_row_and_pad_it():
    m = make_model(CFG.replace(vocab_size=120), seed=4)

    def forcing(plan):  # {new token index: (row, token)} forced through a hook on the logits
        def hook(x, site: Site):
            j = 0 if site.offset == 0 else site.offset - 2  # prompts of 3 tokens: the new token it predicts
            x = x.clone()
            x[:, -1, [CFG.eos_token_id, 106]] = -1e4  # no stop unless forced
            for row, token in plan.get(j, []):
                x[row, -1, token] = 1e4
            return x
        return hook

    out = m.generate(torch.tensor([[2, 7, 9]]), max_new_tokens=8, hooks={"logits": forcing({2: [(0, 1)]})})
    assert out.ids.shape[1] == 3 and out.ids[0, 2] == CFG.eos_token_id and out.stop_reasons == ["eos"]
    plan = {1: [(0, 106)], 4: [(1, CFG.eos_token_id)]}  # row 0 stops first, row 1 later
    two = m.generate(torch.tensor([[2, 7, 9], [2, 7, 9]]), max_new_tokens=8, hooks={"logits": forcing(plan)})
    assert two.stop_reasons == ["end_of_turn", "eos"] and two.ids.shape[1] == 5
    assert two.ids[0, 1] == 106 and (two.ids[0, 2:] == CFG.pad_token_id).all() and two.ids[1, 4] == 1
    keep = m.generate(torch.tensor([[2, 7, 9]]), max_new_tokens=8, hooks={"logits": forcing({2: [(0, 1)]})},
                      stop_at_eos=False)
    assert keep.ids.shape[1] == 8 and keep.stop_reasons == ["max_new_tokens"]


def test_stop_strings_cut_the_text(m):
    free = m.generate([" w10| w11"], max_new_tokens=10, stop_at_eos=False)
    words = free.texts[0].split(" w")
    stop = " w" + words[3]  # the text of the third generated token
    out = m.generate([" w10| w11"], max_new_tokens=10, stop_at_eos=False, stop=[stop, "never"])
    assert out.texts[0] == free.texts[0][:free.texts[0].index(stop)]
    assert out.stop_reasons == ["stop string"] and out.ids.shape[1] < 10


def test_stream_yields_the_same_text_piece_by_piece(m):
    pieces = list(m.stream(" w10| w11", max_new_tokens=8, stop_at_eos=False))
    whole = m.generate(" w10| w11", max_new_tokens=8, stop_at_eos=False).text
    assert len(pieces) > 1 and "".join(pieces) == whole
    got: list[str] = []
    assert m.generate(" w10| w11", max_new_tokens=8, stop_at_eos=False, streamer=got.append).text == "".join(got)
    with pytest.raises(InputError, match="one prompt"):
        list(m.stream([" w10", " w11"], max_new_tokens=2))


# ---------------------------------------------------------------------- observable generation
def test_generate_cache_equals_run_with_cache_on_the_final_sequence(m):
    names = ["blocks.0.resid_post", "blocks.1.attn.pattern", "blocks.2.attn.scores", "blocks.3.mlp.hidden", "logits"]
    out = m.generate(torch.tensor([[2, 7, 9, 11]]), max_new_tokens=7, stop_at_eos=False, cache=names)
    _, ref = m.run_with_cache(out.sequences, names)
    assert set(out.cache) == set(ref)
    for name in names:
        got, want = out.cache[name], ref[name]
        if name.endswith("scores"):  # masked entries: -inf in the full run, 0 outside each step's keys
            finite = torch.isfinite(want)
            torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=1e-4)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=name)


def test_steering_only_the_generated_tokens(m):
    prompt = torch.tensor([[2, 7, 9]])
    vec = torch.randn(CFG.d_model) * 5
    names = ["blocks.1.resid_post"]
    plain = m.generate(prompt, max_new_tokens=6, stop_at_eos=False, cache=names)
    steered = m.generate(prompt, max_new_tokens=6, stop_at_eos=False, cache=names,
                         hooks={"blocks.1.resid_post": add(vec, positions=slice(3, None))})
    a, b = plain.cache["blocks.1.resid_post"], steered.cache["blocks.1.resid_post"]
    assert torch.equal(a[:, :3], b[:, :3])  # the prompt is untouched
    assert not torch.equal(a[:, 3:], b[:, 3:])


# ---------------------------------------------------------------------- chat
def test_chat_needs_a_tokenizer_and_stops_at_end_of_turn():
    m = make_model(CFG)
    with pytest.raises(InputError, match="tokenizer"):
        m.chat([{"role": "user", "content": "hi"}])


def test_chat_template_equals_transformers(hf_gguf_tokenizer, demo_model):
    hf_gguf_tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    conversations = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": " What is 2+2? "}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
         {"role": "user", "content": "Tell me a joke.\n"}],
        [{"role": "system", "content": "You speak French."}, {"role": "user", "content": "Bonjour"},
         {"role": "assistant", "content": " Salut ! "}, {"role": "user", "content": "Ça va ? 東京"}],
    ]
    tok = demo_model.tokenizer
    for conv in conversations:
        for gen_prompt in (True, False):
            text = hf_gguf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt)
            assert tok.apply_chat_template(conv, add_generation_prompt=gen_prompt) == text
            ids = hf_gguf_tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen_prompt)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert tok.encode_chat(conv, add_generation_prompt=gen_prompt) == list(ids)


def test_chat_on_the_demo_model(demo_model):
    reply = demo_model.chat([{"role": "user", "content": "Say hello."}], max_new_tokens=12)
    assert reply.prompt_ids[0, :3].tolist() == [2, 105, 2364]  # <bos><start_of_turn>user
    assert reply.stop_reasons[0] in ("end_of_turn", "eos", "max_new_tokens")
    assert "<end_of_turn>" not in reply.text


# Gemma 3's chat template as Google publishes it with the instruction-tuned models
# (tokenizer_config.json), the text part: the reference the tokenizer's own rendering must match.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

"""TransformerLens's spellings where ours had no reason to differ: ``to_tokens`` returns the ids
(the mask comes from ``to_tokens_and_mask``), ``model.to_str_tokens``, ``cache["resid_post", 3]``
and ``run_with_cache(names_filter=...)``."""

from __future__ import annotations

import pytest
import support
import torch

from interp.hooks import ActivationCache
from interp.model import InputError
from interp.model.cache import Gemma3Cache
from interp.model.sites import TL_SHORT, block_site, layer_site, tl_name

TEXTS = [" w5| w6| w10", " w9"]


@pytest.fixture(scope="module")
def model():
    return support.make_model(tokenizer=support.FakeTokenizer(support.TINY.vocab_size))


# ---------------------------------------------------------------------- tokens
def test_to_tokens_returns_the_ids_tensor(model):
    ids = model.to_tokens(" w5| w6")
    assert isinstance(ids, torch.Tensor) and ids.tolist() == [[2, 5, 6]]
    assert model.to_tokens([[3, 4]]).tolist() == [[3, 4]]


def test_to_tokens_and_mask_gives_the_padding_mask(model):
    ids, mask = model.to_tokens_and_mask(TEXTS)
    assert torch.equal(ids, model.to_tokens(TEXTS))
    assert ids.tolist() == [[2, 5, 6, 10], [0, 0, 2, 9]]
    assert mask.tolist() == [[True] * 4, [False, False, True, True]]
    assert model.to_tokens_and_mask(" w5")[1] is None
    given = torch.tensor([[0, 1, 1]])
    assert model.to_tokens_and_mask([[2, 5, 6]], given)[1].tolist() == [[False, True, True]]
    with pytest.raises(InputError, match="mask"):
        model.to_tokens_and_mask([[2, 5, 6]], torch.tensor([[1, 1]]))


def test_model_to_str_tokens(model):
    assert model.to_str_tokens(" w5| w6") == ["<bos>", " w5", " w6"]
    assert model.to_str_tokens(" w5", bos=False) == [" w5"]
    assert model.to_str_tokens(torch.tensor([2, 9])) == ["<bos>", " w9"]


def test_to_str_tokens_without_a_tokenizer_says_so(tiny_model):
    with pytest.raises(InputError, match="no tokenizer.*from_pretrained"):
        tiny_model.to_str_tokens("hello")


# ---------------------------------------------------------------------- cache[kind, layer]
def test_cache_by_kind_and_layer(tiny_model):
    _, cache = tiny_model.run_with_cache(torch.tensor([[2, 5, 6]]), ["blocks.*.resid_post", "blocks.2.attn.pattern",
                                                                     "blocks.1.post_attn_norm", "blocks.4.mlp.hidden"])
    for layer in range(support.TINY.n_layers):
        assert cache["resid_post", layer] is cache[block_site(layer, "resid_post")]
        assert ("resid_post", layer) in cache
    assert cache["attn.pattern", 2] is cache["pattern", 2] is cache["attn", 2]  # ours, TL's short name, its alias
    assert cache["attn_out", 1] is cache["blocks.1.post_attn_norm"]  # TL's hook_attn_out is the post-norm output
    assert cache["post", 4] is cache["blocks.4.mlp.hidden"]
    assert ("resid_pre", 0) not in cache and ("bogus", 0) not in cache and ("resid_post", -1) not in cache


def get_act_name(name: str, layer: int) -> str:
    """TransformerLens's ``utils.get_act_name(name, layer)`` (TransformerLens 4), the expansion
    its ``cache[name, layer]`` uses, for the short names without a layer type."""
    name = {"attn": "pattern", "key": "k", "query": "q", "value": "v", "mlp_pre": "pre", "mlp_post": "post"}.get(
        name, name)
    if name in ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"):
        return f"blocks.{layer}.attn.hook_{name}"
    if name in ("pre", "post", "mid", "pre_linear"):
        return f"blocks.{layer}.mlp.hook_{name}"
    return f"blocks.{layer}.hook_{name}"


def test_every_tl_short_name_means_what_transformerlens_caches_under_it():
    """``cache["pattern", 3]`` is TransformerLens's ``cache["blocks.3.attn.hook_pattern"]``: each short
    name lands on the site whose TransformerLens alias get_act_name builds from it."""
    assert {"pattern", "z", "q", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "pre",
            "post", "pre_linear"} <= set(TL_SHORT)
    for short in TL_SHORT:
        assert tl_name(layer_site(short, 3)) == get_act_name(short, 3), short


@pytest.mark.parametrize("key, message", [
    (("resid_pots", 1), r"'resid_pots' is not a per-layer kind\. Did you mean 'resid_post'"),
    (("logits", 1), r"'logits' is not per layer; index it alone: cache\['logits'\]"),
    (("attn_scores", 1), r"TransformerLens name this model does not alias.*Did you mean 'attn\.scores'"),
    (("resid_post", -1), r"the layer must be an int >= 0"),
    (("resid_post", "3"), r"the layer must be an int >= 0"),
    (("resid_post", 1, "attn"), r"a tuple key is \(kind, layer\)"),
    (("resid_post", 9), r"'blocks\.9\.resid_post' is not in this cache \(resid_post is cached at layers \[0, 1\]\).*"
                        r"names='blocks\.9\.resid_post'"),
    (("mlp.out", 0), r"no layer's mlp\.out is cached"),
])
def test_bad_cache_keys_say_what_is_wrong(key, message):
    cache = Gemma3Cache({block_site(i, "resid_post"): torch.ones(1) for i in (0, 1)})
    with pytest.raises(KeyError, match=message):
        cache[key]


def test_generic_cache_indexes_by_its_layer_format():
    c = ActivationCache({"layers.2.x": torch.ones(1)}, layer_format="layers.{layer}.")
    assert c["x", 2] is c["layers.2.x"]
    with pytest.raises(KeyError, match="no per-layer naming"):
        ActivationCache({"a": torch.ones(1)})["a", 0]


# ---------------------------------------------------------------------- names_filter
def _cached(model, **kw):
    return sorted(model.run_with_cache(torch.tensor([[2, 5, 6]]), **kw)[1])


def test_names_filter_takes_a_name_a_glob_or_a_list(tiny_model):
    assert _cached(tiny_model, names_filter="blocks.3.hook_resid_post") == ["blocks.3.resid_post"]
    assert _cached(tiny_model, names_filter="blocks.*.hook_resid_post") == _cached(tiny_model,
                                                                                   names="blocks.*.resid_post")
    assert _cached(tiny_model, names_filter=["embed", "blocks.0.attn.hook_z"]) == ["blocks.0.attn.z", "embed"]


def test_names_filter_predicate_sees_our_names_and_transformerlens_names(tiny_model):
    every = [block_site(i, "resid_post") for i in range(support.TINY.n_layers)]
    assert _cached(tiny_model, names_filter=lambda n: n.endswith("hook_resid_post")) == sorted(every)
    assert _cached(tiny_model, names_filter=lambda n: n.endswith(".resid_post")) == sorted(every)
    # TransformerLens's hook_mlp_out is our post_mlp_norm: a TL filter gets what TL would cache
    assert _cached(tiny_model, names_filter=lambda n: n == "blocks.2.hook_mlp_out") == ["blocks.2.post_mlp_norm"]


def test_names_and_names_filter_together_are_refused(tiny_model):
    with pytest.raises(TypeError, match="names= or names_filter="):
        tiny_model.run_with_cache(torch.tensor([[2, 5]]), "embed", names_filter="embed")


def test_names_filter_matching_nothing_is_an_error(tiny_model):
    with pytest.raises(KeyError, match="matches no site"):
        tiny_model.run_with_cache(torch.tensor([[2, 5]]), names_filter=lambda n: n == "nothing")

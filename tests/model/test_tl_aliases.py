"""TransformerLens hook names as aliases (``tl=`` in model/sites.py).

The table's facts run on a tiny model; the values are checked against TransformerLens 4 on the
real demo model twice: against the committed golden file that ``tl_reference.py`` wrote with
TransformerLens (runs everywhere), and live when transformer-lens is installed (the bench extra),
on every layer, with and without TransformerLens's weight processing.
"""

from __future__ import annotations

import pytest
import torch
from support import TINY

from interp.model import Gemma3Cache, hf_aliases, site_names, tl_aliases, tl_name
from interp.model.sites import SITES, TL_LEFT_OUT, aliases_of

TL_KINDS = {s.kind: s.tl for s in SITES if s.tl is not None}


def test_the_table_names_the_transformer_lens_hooks_of_the_contract():
    assert TL_KINDS == {
        "embed": "hook_embed", "resid_pre": "hook_resid_pre", "attn.q": "attn.hook_q", "attn.k": "attn.hook_k",
        "attn.v": "attn.hook_v", "attn.q_rot": "attn.hook_rot_q", "attn.k_rot": "attn.hook_rot_k",
        "attn.pattern": "attn.hook_pattern", "attn.z": "attn.hook_z", "attn.out": "attn.hook_out",
        "post_attn_norm": "hook_attn_out", "resid_mid": "hook_resid_mid", "mlp.gate": "mlp.hook_pre",
        "mlp.up": "mlp.hook_pre_linear", "mlp.hidden": "mlp.hook_post", "mlp.out": "mlp.hook_out",
        "post_mlp_norm": "hook_mlp_out", "resid_post": "hook_resid_post"}
    left_out = {n.replace("blocks.{i}.", "") for n in TL_LEFT_OUT}
    assert len(left_out) == 8 and not left_out & set(TL_KINDS.values())


def test_tl_aliases_point_at_sites_and_collide_with_nothing():
    tl, hf, names = tl_aliases(TINY), hf_aliases(TINY), set(site_names(TINY))
    assert len(tl) == 1 + 17 * TINY.n_layers
    assert set(tl.values()) <= names and not set(tl) & names and not set(tl) & set(hf)
    assert tl["blocks.3.hook_resid_post"] == "blocks.3.resid_post" and tl["hook_embed"] == "embed"


def test_tl_name_is_the_inverse_of_the_aliases():
    tl = tl_aliases(TINY)
    for name in site_names(TINY):
        t = tl_name(name)
        assert (t is None) == (name not in tl.values())
        if t is not None:
            assert tl[t] == name and t in aliases_of(name)
    assert tl_name("blocks.3.attn.pattern") == "blocks.3.attn.hook_pattern"
    assert tl_name("blocks.3.input_norm") is None and tl_name("final_norm") is None and tl_name("logits") is None


@pytest.mark.parametrize("bad", ["blocks.*.resid_post", "blocks.3.hook_resid_post", "resid_post", "blocks.x.mlp.out",
                                 "blocks.3.embed", "nonsense"])
def test_tl_name_refuses_what_is_not_one_site(bad):
    with pytest.raises(KeyError, match="not a site name"):
        tl_name(bad)


def test_tl_names_cache_hook_and_glob_like_site_names(tiny_model):
    ids = torch.tensor([[2, 5, 7, 9]])
    _, by_name = tiny_model.run_with_cache(ids, names="blocks.*.resid_post")
    _, by_tl = tiny_model.run_with_cache(ids, names="blocks.*.hook_resid_post")
    assert list(by_tl) == list(by_name) == [f"blocks.{i}.resid_post" for i in range(TINY.n_layers)]
    names = ["hook_embed", "blocks.3.attn.hook_pattern", "blocks.{1,2}.hook_mlp_out"]
    _, mixed = tiny_model.run_with_cache(ids, names=names)
    assert list(mixed) == ["embed", "blocks.1.post_mlp_norm", "blocks.2.post_mlp_norm", "blocks.3.attn.pattern"]
    seen = []
    tiny_model.run_with_hooks(ids, {"blocks.2.mlp.hook_post": lambda x, site: seen.append(site.name)})
    assert seen == ["blocks.2.mlp.hidden"]


def test_caches_answer_to_aliases_and_keep_site_names(tiny_model, tmp_path):
    _, cache = tiny_model.run_with_cache(torch.tensor([[2, 5, 7]]), names=["blocks.3.resid_post", "embed"])
    assert cache["blocks.3.hook_resid_post"] is cache["blocks.3.resid_post"]
    assert cache["model.layers.3"] is cache["blocks.3.resid_post"] and cache["hook_embed"] is cache["embed"]
    assert "blocks.3.hook_resid_post" in cache and "blocks.2.hook_resid_post" not in cache
    assert list(cache) == ["embed", "blocks.3.resid_post"]
    with pytest.raises(KeyError, match="not in this cache"):
        cache["blocks.3.hook_mlp_out"]
    cache.save(tmp_path / "c.safetensors")
    loaded = Gemma3Cache.load(tmp_path / "c.safetensors")
    assert torch.equal(loaded["blocks.3.hook_resid_post"], cache["blocks.3.resid_post"])
    assert torch.equal(cache.to(torch.float64)["blocks.3.hook_resid_post"], cache["blocks.3.resid_post"].double())


def test_a_left_out_name_is_unknown(tiny_model):
    with pytest.raises(KeyError, match="unknown site 'blocks.3.ln1.hook_out'"):
        tiny_model.run_with_cache(torch.tensor([[2, 5]]), names="blocks.3.ln1.hook_out")

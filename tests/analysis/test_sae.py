"""JumpReLU SAEs: encode/decode, loading formats, reading and splicing sites."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support import TINY

from interp.model import Gemma3
from interp.sae import JumpReLUSAE, run_with_saes, top_features

CFG = TINY
IDS = torch.tensor([[2, 17, 5, 9, 33, 41, 7]])


@pytest.fixture(scope="module")
def m() -> Gemma3:
    return Gemma3.from_config(CFG, seed=1)


def test_jumprelu_zeroes_below_the_threshold():
    sae = JumpReLUSAE(torch.eye(2), torch.eye(2), torch.zeros(2), torch.zeros(2), torch.tensor([0.5, 0.5]))
    acts = sae.encode(torch.tensor([[0.4, 0.6], [-1.0, 2.0]]))
    assert torch.equal(acts, torch.tensor([[0.0, 0.6], [0.0, 2.0]]))
    assert torch.equal(sae(torch.tensor([[0.4, 0.6]])), torch.tensor([[0.0, 0.6]]))


def test_misshaped_tensors_are_named():
    with pytest.raises(ValueError, match="threshold"):
        JumpReLUSAE(torch.zeros(4, 8), torch.zeros(8, 4), torch.zeros(8), torch.zeros(4), torch.zeros(7))


def test_reading_a_site_caches_features_and_changes_nothing(m):
    sae = JumpReLUSAE.random(CFG.d_model, 96, site="blocks.3.resid_post", seed=0)
    logits, feats = run_with_saes(m, IDS, [sae])
    assert torch.equal(logits, m(IDS))
    _, cache = m.run_with_cache(IDS, names="blocks.3.resid_post")
    assert torch.equal(feats["blocks.3.resid_post"], sae.encode(cache["blocks.3.resid_post"]))
    assert not m.registry.active


def test_splicing_replaces_the_site_and_keep_error_restores_the_output(m):
    sae = JumpReLUSAE.random(CFG.d_model, 96, site="model.layers.2", seed=0)  # an HF alias
    spliced, feats = run_with_saes(m, IDS, [sae], splice=True)
    _, cache = m.run_with_cache(IDS, names="blocks.2.resid_post")
    recon = sae(cache["blocks.2.resid_post"])
    expected = m(recon, start_at_layer=3)
    torch.testing.assert_close(spliced, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(spliced, m(IDS), atol=1e-3)
    kept, _ = run_with_saes(m, IDS, [sae], splice=True, keep_error=True)
    torch.testing.assert_close(kept, m(IDS), rtol=0, atol=1e-5)
    assert set(feats) == {"blocks.2.resid_post"}


def test_several_saes_and_bad_sites(m):
    saes = [JumpReLUSAE.random(CFG.d_model, 40, site=f"blocks.{i}.post_mlp_norm", seed=i) for i in (0, 4)]
    _, feats = run_with_saes(m, IDS, saes)
    assert sorted(feats) == ["blocks.0.post_mlp_norm", "blocks.4.post_mlp_norm"]
    with pytest.raises(ValueError, match="no site"):
        run_with_saes(m, IDS, [JumpReLUSAE.random(CFG.d_model, 8)])
    with pytest.raises(ValueError, match="one site"):
        run_with_saes(m, IDS, [JumpReLUSAE.random(CFG.d_model, 8, site="blocks.*.resid_post")])
    with pytest.raises(ValueError, match="width 64"):
        run_with_saes(m, IDS, [JumpReLUSAE.random(CFG.d_model, 8, site="blocks.1.mlp.hidden")])
    assert not m.registry.active


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_loading_gemma_scope_layouts(tmp_path, fmt, m):
    ref = JumpReLUSAE.random(CFG.d_model, 48, seed=3)
    params = {"W_enc": ref.w_enc, "W_dec": ref.w_dec, "b_enc": ref.b_enc, "b_dec": ref.b_dec,
              "threshold": ref.threshold}
    folder = tmp_path / "layer_3_width_16k"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hf_hook_point_in": "model.layers.3.output"}))
    if fmt == "safetensors":
        path = folder / "params.safetensors"
        save_file({k.lower(): v.contiguous() for k, v in params.items()}, str(path))
    else:
        path = folder / "params.npz"
        np.savez(path, **{k: v.numpy() for k, v in params.items()})
    sae = JumpReLUSAE.from_file(path)
    assert sae.site == "model.layers.3" and sae.d_in == CFG.d_model and sae.d_sae == 48
    assert torch.equal(sae.w_dec, ref.w_dec)
    _, feats = run_with_saes(m, IDS, [sae])
    assert "blocks.3.resid_post" in feats


def test_loading_errors(tmp_path):
    path = tmp_path / "params.safetensors"
    save_file({"w_enc": torch.zeros(4, 8)}, str(path))
    with pytest.raises(KeyError, match="w_dec"):
        JumpReLUSAE.from_file(path)
    with pytest.raises(ValueError, match="safetensors or .npz"):
        JumpReLUSAE.from_file(tmp_path / "params.pt")


def test_top_features():
    acts = torch.zeros(1, 2, 5)
    acts[0, -1, 3], acts[0, -1, 1] = 2.0, 1.0
    assert [(t.index, t.value, t.label) for t in top_features(acts, k=3)] == [((3,), 2.0, "F3"), ((1,), 1.0, "F1")]


def test_an_sae_on_the_o_proj_input_reads_the_heads_flattened(m):
    width = CFG.n_heads * CFG.d_head
    sae = JumpReLUSAE.random(width, 64, site="model.layers.1.self_attn.o_proj.input", seed=0)
    _, feats = run_with_saes(m, IDS, [sae])
    _, cache = m.run_with_cache(IDS, names="blocks.1.attn.z")
    assert torch.equal(feats["blocks.1.attn.z"], sae.encode(cache["blocks.1.attn.z"].flatten(-2)))
    kept, _ = run_with_saes(m, IDS, [sae], splice=True, keep_error=True)
    torch.testing.assert_close(kept, m(IDS), rtol=0, atol=1e-5)

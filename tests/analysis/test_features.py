"""Dictionaries (JumpReLU and TopK SAEs, transcoders with and without a skip term): encode/decode
against hand computations, the layouts they load from and save to, and running them on the
registry (read, splice, edit features)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support import TINY

from interp.features import (
    DictionaryFileError,
    JumpReLUSAE,
    TopKSAE,
    Transcoder,
    load_dictionary,
    run_with_dictionaries,
    run_with_saes,
    save_dictionary,
    top_features,
)
from interp.model import Gemma3

CFG = TINY
IDS = torch.tensor([[2, 17, 5, 9, 33, 41, 7]])


@pytest.fixture(scope="module")
def m() -> Gemma3:
    return Gemma3.from_config(CFG, seed=1)


def test_jumprelu_zeroes_below_the_threshold():
    sae = JumpReLUSAE(torch.eye(2), torch.eye(2), torch.zeros(2), torch.zeros(2), torch.tensor([0.5, 0.5]))
    acts = sae.encode(torch.tensor([[0.4, 0.6], [-1.0, 2.0]]))
    assert torch.equal(acts, torch.tensor([[0.0, 0.6], [0.0, 2.0]]))
    negative = JumpReLUSAE(torch.eye(2), torch.eye(2), threshold=torch.tensor([-1.0, -1.0]))
    assert torch.equal(negative.encode(torch.tensor([[-0.5, 0.5]])), torch.tensor([[0.0, 0.5]]))  # relu first
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
    with pytest.raises(DictionaryFileError, match="no site"):
        run_with_saes(m, IDS, [JumpReLUSAE.random(CFG.d_model, 8)])
    with pytest.raises(DictionaryFileError, match="one site"):
        run_with_saes(m, IDS, [JumpReLUSAE.random(CFG.d_model, 8, site="blocks.*.resid_post")])
    with pytest.raises(DictionaryFileError, match=r"width 64 \(site shape \[64\] per token\) but the dictionary's is"):
        run_with_saes(m, IDS, [JumpReLUSAE.random(CFG.d_model, 8, site="blocks.1.mlp.hidden")])
    assert not m.registry.active


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_loading_gemma_scope_layouts(tmp_path, fmt, m):
    ref = JumpReLUSAE.random(CFG.d_model, 48, seed=3)
    params = {"W_enc": ref.W_enc, "W_dec": ref.W_dec, "b_enc": ref.b_enc, "b_dec": ref.b_dec,
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
    sae = load_dictionary(path)
    assert isinstance(sae, JumpReLUSAE) and sae.site == "model.layers.3" and sae.d_in == CFG.d_model
    assert sae.d_sae == 48 and torch.equal(sae.W_dec, ref.W_dec)
    assert load_dictionary(folder, model=m).site == "blocks.3.resid_post"  # resolved through the aliases
    _, feats = run_with_saes(m, IDS, [sae])
    assert "blocks.3.resid_post" in feats


def test_loading_errors(tmp_path):
    path = tmp_path / "params.safetensors"
    save_file({"w_enc": torch.zeros(4, 8)}, str(path))
    with pytest.raises(DictionaryFileError, match="w_dec"):
        load_dictionary(path)
    (tmp_path / "params.pt").write_bytes(b"x")
    with pytest.raises(DictionaryFileError, match="safetensors or .npz"):
        load_dictionary(tmp_path / "params.pt")
    with pytest.raises(DictionaryFileError, match="holds no dictionary"):
        load_dictionary(tmp_path / "empty_dir_that_is_missing")


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


# ---------------------------------------------------------------------- hand computations
def test_encode_and_decode_equal_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen)
    w_enc, w_dec = torch.randn(6, 10, generator=gen), torch.randn(10, 4, generator=gen)
    b_enc, b_dec, thr = torch.randn(10, generator=gen), torch.randn(4, generator=gen), torch.rand(10, generator=gen)
    pre = x @ w_enc + b_enc
    jr = JumpReLUSAE(w_enc, torch.randn(10, 6, generator=gen), b_enc, torch.zeros(6), threshold=thr)
    torch.testing.assert_close(jr.encode(x), torch.where(pre > thr, pre.clamp_min(0), torch.zeros(())))
    tk = TopKSAE(w_enc, torch.randn(10, 6, generator=gen), b_enc, k=3)
    want = torch.zeros_like(pre)
    top = pre.topk(3, dim=-1)
    want.scatter_(-1, top.indices, top.values.clamp_min(0))
    torch.testing.assert_close(tk.encode(x), want)
    w_skip = torch.randn(6, 4, generator=gen)
    tc = Transcoder(w_enc, w_dec, b_enc, b_dec, threshold=thr, W_skip=w_skip)
    acts = torch.where(pre > thr, pre.clamp_min(0), torch.zeros(()))
    torch.testing.assert_close(tc.decode(tc.encode(x)), acts @ w_dec + b_dec)
    torch.testing.assert_close(tc(x), acts @ w_dec + b_dec + x @ w_skip)  # skip: x @ W_skip, W_skip [d_in, d_out]


def test_skip_orientation_follows_the_released_shape():
    """Gemma Scope 2 stores affine_skip_connection as [d_in, d_out] and applies x @ A (SAELens
    reads it the same way, transposing into its own [d_out, d_in] W_skip). A non-square layout
    pins the orientation: the transposed matrix is refused with both shapes named."""
    with pytest.raises(ValueError, match=r"W_skip has shape \(4, 6\).*\(6, 4\)"):
        Transcoder(torch.zeros(6, 10), torch.zeros(10, 4), W_skip=torch.zeros(4, 6))


def test_normalize_decoder_keeps_the_output():
    sae = JumpReLUSAE.random(8, 16, seed=2)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3, 16)[:, None])
    x = torch.randn(4, 8)
    before = sae(x)
    sae.normalize_decoder()
    torch.testing.assert_close(sae(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))


# ---------------------------------------------------------------------- transcoders on the model
def test_a_transcoder_spliced_with_its_error_leaves_the_logits_unchanged(m):
    for skip in (False, True):
        tc = Transcoder.random(m, layer=2, d_sae=80, seed=4, skip=skip)
        clean = m(IDS)
        kept, feats = run_with_dictionaries(m, IDS, [tc], splice=True, keep_error=True)
        torch.testing.assert_close(kept, clean, rtol=0, atol=1e-5)
        spliced, _ = run_with_dictionaries(m, IDS, [tc], splice=True)
        _, cache = m.run_with_cache(IDS, names=["blocks.2.pre_mlp_norm", "blocks.2.resid_mid"])
        resid = cache["blocks.2.resid_mid"] + tc(cache["blocks.2.pre_mlp_norm"])  # the MLP replaced by the transcoder
        torch.testing.assert_close(spliced, m(resid, start_at_layer=3), rtol=0, atol=1e-5)
        assert torch.equal(feats["blocks.2.pre_mlp_norm"], tc.encode(cache["blocks.2.pre_mlp_norm"]))
    assert not m.registry.active


def test_feature_edits_move_the_output_by_the_decoder_rows(m):
    sae = JumpReLUSAE.random(CFG.d_model, 64, site="blocks.3.resid_post", seed=5)
    _, cache = m.run_with_cache(IDS, names="blocks.3.resid_post")
    x = cache["blocks.3.resid_post"]
    acts = sae.encode(x)
    f = int(acts[0].sum(0).argmax())  # a feature that fires
    for kwargs, change in (
        ({"ablate": {0: [f]}}, -acts[..., f:f + 1] * sae.W_dec[f]),
        ({"clamp": {0: {f: 5.0}}}, (5.0 - acts[..., f:f + 1]) * sae.W_dec[f]),
        ({"steer": {0: {f: 3.0}}}, 3.0 * sae.W_dec[f].expand_as(x)),
    ):
        out, _ = run_with_dictionaries(m, IDS, [sae], **kwargs)
        torch.testing.assert_close(out, m(x + change, start_at_layer=4), rtol=0, atol=1e-4)
    last, _ = run_with_dictionaries(m, IDS, [sae], steer={0: {f: 3.0}}, positions=[-1])  # only the last token
    moved = x.clone()
    moved[:, -1] += 3.0 * sae.W_dec[f]
    torch.testing.assert_close(last, m(moved, start_at_layer=4), rtol=0, atol=1e-4)
    with pytest.raises(IndexError, match="outside the dictionary's 64 features"):
        run_with_dictionaries(m, IDS, [sae], ablate={0: [64]})


def test_steering_with_a_feature_during_generation(m):
    sae = JumpReLUSAE.random(CFG.d_model, 64, site="blocks.3.resid_post", seed=5)
    from interp.features import check_fits, dictionary_hooks

    check_fits(sae, m)
    plain = m.generate(IDS[:, :3], max_new_tokens=6, stop_at_eos=False)
    steered = m.generate(IDS[:, :3], max_new_tokens=6, stop_at_eos=False,
                         hooks=dictionary_hooks(sae, steer={7: 50.0}, positions=slice(3, None)))
    assert steered.ids[0, 0] == plain.ids[0, 0]  # the prompt (and its prediction) is untouched
    assert not torch.equal(steered.ids, plain.ids)


# ---------------------------------------------------------------------- formats
@pytest.mark.parametrize("make", [lambda: JumpReLUSAE.random(32, 40, site="blocks.1.resid_post", seed=1),
                                  lambda: TopKSAE.random(32, 40, k=5, site="blocks.1.resid_post", seed=1),
                                  lambda: Transcoder.random(Gemma3.from_config(CFG), layer=1, d_sae=40, skip=True),
                                  lambda: Transcoder.random(Gemma3.from_config(CFG), layer=1, d_sae=40, k=6)],
                         ids=["jumprelu", "topk", "skip-transcoder", "topk-transcoder"])
def test_saelens_format_round_trip(tmp_path, make, m):
    d = make()
    topk_tc = isinstance(d, Transcoder) and d.k is not None  # SAELens has no TopK transcoder: our own layout
    folder = save_dictionary(d, tmp_path / "dict", saelens_readable=not topk_tc)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == d.d_in and cfg["d_sae"] == d.d_sae and cfg["apply_b_dec_to_input"] is False
    back = load_dictionary(folder)
    assert type(back) is type(d) and back.site == d.site and back.site_out == d.site_out
    x = torch.randn(3, d.d_in)
    assert torch.equal(back(x), d(x)) and torch.equal(back.encode(x), d.encode(x))


def test_gemma_scope_2_transcoder_layout(tmp_path, m):
    ref = Transcoder.random(m, layer=2, d_sae=48, seed=6, skip=True)
    folder = tmp_path / "transcoder_all" / "layer_2_width_16k_l0_small_affine"
    folder.mkdir(parents=True)
    save_file({"w_enc": ref.W_enc, "w_dec": ref.W_dec, "b_enc": ref.b_enc, "b_dec": ref.b_dec,
               "threshold": ref.threshold, "affine_skip_connection": ref.W_skip.contiguous()},
              str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "hf_hook_point_in": "model.layers.2.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.2.post_feedforward_layernorm.output", "affine_connection": True}))
    tc = load_dictionary(folder, model=m)
    assert isinstance(tc, Transcoder) and (tc.site, tc.site_out) == ("blocks.2.pre_mlp_norm", "blocks.2.post_mlp_norm")
    x = torch.randn(4, CFG.d_model)
    assert torch.equal(tc(x), ref(x))
    misfit = Gemma3.from_config(CFG.replace(d_model=48, n_layers=3))
    with pytest.raises(DictionaryFileError, match=r"has width 48 .* dictionary's is 32"):
        load_dictionary(folder, model=misfit)

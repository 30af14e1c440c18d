"""SAELens files read exactly, and our files read by SAELens.

The golden folders under ``golden/saelens`` were written by SAELens itself (``make_golden.py``,
run with SAELens installed; ``VERSION`` says which), each with SAELens's own encode / decode /
forward outputs on a fixed input. The round trip through SAELens runs only where
``INTERP_SAELENS_PYTHON`` names a Python with SAELens installed (``.ci/saelens-venv`` builds one).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interp.features import (
    AbsTopKSAE,
    DictionaryFileError,
    GatedSAE,
    JumpReLUSAE,
    StandardSAE,
    TopKSAE,
    Transcoder,
    load_dictionary,
    save_dictionary,
)
from interp.features.settings import Settings

GOLDEN = Path(__file__).parent / "golden" / "saelens"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "cfg.json").is_file())
REFUSED = {"standard_expected_average": "expected_average_only_in"}


def test_the_golden_set_covers_every_architecture():
    archs = {json.loads((GOLDEN / c / "cfg.json").read_text())["architecture"] for c in CASES}
    assert archs >= {"standard", "gated", "jumprelu", "topk", "abstopk", "transcoder", "skip_transcoder",
                     "jumprelu_transcoder", "jumprelu_skip_transcoder"}


@pytest.mark.parametrize("case", [c for c in CASES if c not in REFUSED])
def test_saelens_files_equal_saelens_outputs(case):
    d = load_dictionary(GOLDEN / case)
    gold = load_file(str(GOLDEN / case / "outputs.safetensors"))
    cfg = json.loads((GOLDEN / case / "cfg.json").read_text())
    assert str(d.W_enc.dtype) == "torch." + cfg["dtype"]
    tol = {"atol": 2e-2, "rtol": 2e-2} if cfg["dtype"] == "bfloat16" else {"atol": 1e-6, "rtol": 1e-5}
    with torch.no_grad():
        acts = d.encode(gold["x"])
        dec = d.decode(acts)
        fwd = d.forward(gold["x"])
    for name, ours in (("encode", acts), ("decode", dec), ("forward", fwd)):
        assert ours.shape == gold[name].shape and ours.dtype == gold[name].dtype, name
        torch.testing.assert_close(ours, gold[name], **tol, msg=f"{case} {name}")
    assert d.site == "blocks.1." + ("attn.z" if "hook_z" in case else "resid_post")
    if isinstance(d, Transcoder):
        assert d.site_out == "blocks.1.post_mlp_norm"


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_settings_saelens_files_cannot_carry_are_refused_by_name(case):
    with pytest.raises(DictionaryFileError, match=REFUSED[case]):
        load_dictionary(GOLDEN / case)


def test_the_classes_match_the_architectures():
    kinds = {c: type(load_dictionary(GOLDEN / c)) for c in ("standard", "gated", "jumprelu", "topk", "abstopk",
                                                             "transcoder")}
    assert kinds == {"standard": StandardSAE, "gated": GatedSAE, "jumprelu": JumpReLUSAE, "topk": TopKSAE,
                     "abstopk": AbsTopKSAE, "transcoder": Transcoder}


def test_dtype_is_the_files_unless_asked():
    assert load_dictionary(GOLDEN / "jumprelu_bf16").W_enc.dtype == torch.bfloat16
    assert load_dictionary(GOLDEN / "jumprelu_bf16", dtype=torch.float32).W_enc.dtype == torch.float32


def _edit(tmp_path, case, **changes):
    folder = tmp_path / case
    folder.mkdir()
    cfg = json.loads((GOLDEN / case / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "sae_weights.safetensors").write_bytes((GOLDEN / case / "sae_weights.safetensors").read_bytes())
    return folder


@pytest.mark.parametrize("change, named", [
    ({"normalize_activations": "covariance_whitening"}, "covariance_whitening"),
    ({"reshape_activations": "hook_q"}, "hook_q"),
    ({"use_error_term_scale": 2.0}, "use_error_term_scale"),
    ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
    ({"architecture": "matching_pursuit"}, "matching_pursuit"),
    ({"dtype": "int8"}, "int8"),
])
def test_an_unknown_setting_is_an_error_naming_it(tmp_path, change, named):
    with pytest.raises(DictionaryFileError, match=named):
        load_dictionary(_edit(tmp_path, "jumprelu", **change))


def test_a_scaling_factor_in_the_file_is_applied(tmp_path):
    folder = _edit(tmp_path, "standard_expected_average", norm_scaling_factor=2.5)
    d = load_dictionary(folder)
    x = torch.randn(3, 16)
    s = 2.5
    want = torch.relu((x * s - d.b_dec) @ d.W_enc + d.b_enc)
    torch.testing.assert_close(d.encode(x), want)
    torch.testing.assert_close(d.decode(want), (want @ d.W_dec + d.b_dec) / s)
    assert d.settings.scaling_factor == s


def test_hook_z_outputs_are_shaped_like_the_site_and_flat_stays_flat():
    d = load_dictionary(GOLDEN / "jumprelu_hook_z")
    x = load_file(str(GOLDEN / "jumprelu_hook_z" / "outputs.safetensors"))["x"]
    assert d.forward(x).shape == x.shape
    torch.testing.assert_close(d.forward(x.flatten(-2)), d.forward(x).flatten(-2))
    with pytest.raises(ValueError, match="heads"):
        d.encode(torch.zeros(2, 3, 3))


def test_decode_without_encode_under_a_per_input_normalisation_is_an_error():
    d = load_dictionary(GOLDEN / "jumprelu_layer_norm")
    with pytest.raises(RuntimeError, match="layer_norm"):
        d.decode(torch.zeros(2, d.d_sae))


def _ours():
    sae = JumpReLUSAE.random(16, 32, site="blocks.1.resid_post", seed=3)
    return {
        "jumprelu": sae,
        "topk_rescaled": TopKSAE(sae.W_enc, sae.W_dec * 1.7, k=4, site="blocks.2.resid_post",
                                 settings=Settings(rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=True)),
        "standard_ln": StandardSAE(sae.W_enc, sae.W_dec, b_dec=torch.randn(16), site="blocks.0.resid_pre",
                                   settings=Settings(normalize_activations="layer_norm", apply_b_dec_to_input=True)),
        "gated": GatedSAE.random(16, 32, site="blocks.1.resid_post", seed=4),
        "jumprelu_skip_transcoder": Transcoder(sae.W_enc, sae.W_dec[:, :12], threshold=sae.threshold,
                                               W_skip=torch.randn(16, 12), site="blocks.1.pre_mlp_norm",
                                               site_out="blocks.1.post_mlp_norm"),
        "transcoder": Transcoder(sae.W_enc, sae.W_dec[:, :12], site="blocks.1.pre_mlp_norm",
                                 site_out="blocks.1.post_mlp_norm"),
    }


@pytest.mark.parametrize("name", sorted(_ours()))
def test_our_files_read_back_equal_with_settings(tmp_path, name):
    d = _ours()[name]
    back = load_dictionary(save_dictionary(d, tmp_path / name))
    cfg = json.loads((tmp_path / name / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] and meta["hook_name"].startswith("blocks.") and meta["interp_site"] == d.site
    assert meta["hf_hook_name"].startswith("model.layers.")
    if isinstance(d, Transcoder):
        assert (meta["hook_name_out"], meta["hf_hook_name_out"]) == ("blocks.1.hook_mlp_out",
                                                                     "model.layers.1.post_feedforward_layernorm")
    assert type(back) is type(d) and back.settings == d.settings and back.site == d.site
    x = torch.randn(5, 16)
    torch.testing.assert_close(back.forward(x), d.forward(x), rtol=0, atol=0)


def test_what_saelens_cannot_read_is_refused(tmp_path):
    tc = Transcoder(torch.randn(16, 32), torch.randn(32, 12), k=4)
    with pytest.raises(ValueError, match="TopK transcoder"):
        save_dictionary(tc, tmp_path / "a")
    back = load_dictionary(save_dictionary(tc, tmp_path / "b", saelens_readable=False))
    assert back.k == 4
    scaled = StandardSAE(torch.randn(16, 32), torch.randn(32, 16),
                         settings=Settings(normalize_activations="expected_average_only_in", scaling_factor=2.0))
    with pytest.raises(ValueError, match="scaling factor"):
        save_dictionary(scaled, tmp_path / "c")


ROUND_TRIP = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE, HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    folder = sys.argv[1]
    sae = SAE.load_from_disk(folder)
    x = load_file(folder + "/x.safetensors")["x"]
    with torch.no_grad():
        out = {"encode": sae.encode(x).contiguous(), "forward": sae.forward(x).contiguous()}
    save_file(out, folder + "/theirs.safetensors")
    info = {"hook_name": sae.cfg.metadata.hook_name, "attached": None}
    if info["hook_name"] and "transcoder" not in type(sae).__name__.lower():
        cfg = HookedTransformerConfig(n_layers=3, d_model=16, d_head=4, n_heads=4, d_vocab=11, n_ctx=8,
                                      act_fn="relu", d_mlp=12)
        model = HookedSAETransformer(cfg)
        model.add_sae(sae)
        info["attached"] = sorted(model.acts_to_saes)
    print(json.dumps(info))
""")


@pytest.mark.skipif(not os.environ.get("INTERP_SAELENS_PYTHON"),
                    reason="set INTERP_SAELENS_PYTHON to a Python with SAELens installed (.ci/saelens-venv builds one)")
@pytest.mark.parametrize("name", sorted(_ours()))
def test_saelens_reads_our_files_with_their_hook_names(tmp_path, name):
    from safetensors.torch import save_file

    d = _ours()[name]
    folder = save_dictionary(d, tmp_path / name)
    x = torch.randn(5, 16)
    save_file({"x": x}, str(folder / "x.safetensors"))
    run = subprocess.run([os.environ["INTERP_SAELENS_PYTHON"], "-c", ROUND_TRIP, str(folder)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["hook_name"] == json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name"]
    if info["attached"] is not None:
        assert info["attached"] == [info["hook_name"]]
    theirs = load_file(str(folder / "theirs.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), theirs["encode"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(d.forward(x), theirs["forward"], atol=1e-6, rtol=1e-5)


def test_gated_normalize_decoder_keeps_the_output():
    d = GatedSAE.random(16, 32, seed=2)
    with torch.no_grad():
        d.W_dec.mul_(torch.linspace(0.5, 2.0, 32)[:, None])
    x = torch.randn(4, 16)
    before = d.forward(x)
    d.normalize_decoder()
    torch.testing.assert_close(d.forward(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings, named", [
    (Settings(apply_b_dec_to_input=True), "apply_b_dec_to_input"),
    (Settings(rescale_acts_by_decoder_norm=True), "rescale_acts_by_decoder_norm"),
    (Settings(reshape_activations="hook_z"), "hook_z"),
])
def test_a_transcoder_refuses_what_saelens_transcoders_refuse(settings, named):
    with pytest.raises(ValueError, match=named):
        Transcoder(torch.randn(16, 32), torch.randn(32, 12), settings=settings)


@pytest.mark.parametrize("kwargs, named", [({"normalize_activations": "rms"}, "rms"),
                                           ({"scaling_factor": 2.0}, "scaling_factor"),
                                           ({"normalize_activations": "expected_average_only_in",
                                             "scaling_factor": -1.0}, "positive"),
                                           ({"apply_b_dec_to_input": 1}, "apply_b_dec_to_input")])
def test_bad_settings_are_named(kwargs, named):
    with pytest.raises(ValueError, match=named):
        Settings(**kwargs)


def test_decoder_norm_rescaling_forbids_normalising_the_decoder():
    d = TopKSAE(torch.randn(16, 32), torch.randn(32, 16), k=3, settings=Settings(rescale_acts_by_decoder_norm=True))
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        d.normalize_decoder()


def test_settings_apply_where_the_dictionary_is_spliced():
    from support import TINY

    from interp.features import run_with_saes
    from interp.model import Gemma3

    m = Gemma3.from_config(TINY, seed=1)
    ids = torch.tensor([[2, 17, 5, 9, 33]])
    base = StandardSAE.random(TINY.d_model, 48, seed=0)
    sae = StandardSAE(base.W_enc, base.W_dec, b_dec=torch.randn(TINY.d_model) * 0.1, site="blocks.1.resid_post",
                      settings=Settings(normalize_activations="layer_norm", apply_b_dec_to_input=True))
    spliced, _ = run_with_saes(m, ids, [sae], splice=True)
    _, cache = m.run_with_cache(ids, names="blocks.1.resid_post")
    x = cache["blocks.1.resid_post"]
    mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
    acts = torch.relu(((x - mu) / (std + 1e-5) - sae.b_dec) @ sae.W_enc + sae.b_enc)
    recon = (acts @ sae.W_dec + sae.b_dec) * std + mu
    torch.testing.assert_close(spliced, m(recon, start_at_layer=2), rtol=0, atol=1e-5)

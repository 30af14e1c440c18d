"""Gemma Scope 2's folder kinds, written here in the published layout (config keys and tensor
shapes as google/gemma-scope-2-* ship them): single-layer SAEs and transcoders, cross-layer
transcoders (spliced into the model, against the published math done by hand with hooks),
crosscoders (refused), from a local folder and through the hub code path."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import TINY

from interp.features import (
    CrossLayerTranscoder,
    DictionaryFileError,
    JumpReLUSAE,
    Transcoder,
    from_hub,
    load_dictionary,
    run_with_dictionaries,
)
from interp.model import Gemma3

CFG = TINY
IDS = torch.tensor([[2, 17, 5, 9, 33, 41, 7]])
BASE = {"model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 150}
CLT_HOOKS = {"hf_hook_point_in": "model.layers.{all}.pre_feedforward_layernorm.output",
             "hf_hook_point_out": "model.layers.{all}.post_feedforward_layernorm.output"}


@pytest.fixture(scope="module")
def m() -> Gemma3:
    return Gemma3.from_config(CFG, seed=1)


def write_single(folder: Path, hook_in: str, hook_out: str, d_in: int, d_out: int, width: int, kind: str,
                 affine: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = {"w_enc": torch.randn(d_in, width, generator=gen) * 0.3, "b_enc": torch.randn(width, generator=gen) * 0.1,
         "threshold": torch.rand(width, generator=gen) * 0.1, "w_dec": torch.randn(width, d_out, generator=gen) * 0.2,
         "b_dec": torch.randn(d_out, generator=gen) * 0.1}
    if affine:
        t["affine_skip_connection"] = torch.randn(d_in, d_out, generator=gen) * 0.05
    folder.mkdir(parents=True)
    save_file(t, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({**BASE, "hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out,
                                                    "width": width, "affine_connection": affine, "type": kind}))
    return t


def write_clt(folder: Path, n_layers: int, d_model: int, widths: list[int], affine: bool, seed: int = 0,
              config: dict | None = None) -> list[dict[str, torch.Tensor]]:
    """A CLT folder as released: ``params_layer_{i}.safetensors`` with the full decoder output axis."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    layers = []
    for i, w in enumerate(widths):
        t = {"w_enc": torch.randn(d_model, w, generator=gen) * 0.3, "b_enc": torch.randn(w, generator=gen) * 0.1,
             "threshold": torch.rand(w, generator=gen) * 0.1,
             "w_dec": torch.randn(w, n_layers, d_model, generator=gen) * 0.2,
             "b_dec": torch.randn(d_model, generator=gen) * 0.1}
        if affine:
            t["affine_skip_connection"] = torch.randn(d_model, d_model, generator=gen) * 0.05
        save_file(t, str(folder / f"params_layer_{i}.safetensors"))
        layers.append(t)
    cfg = {**BASE, **CLT_HOOKS, "width": sum(widths), "affine_connection": affine, "type": "clt"}
    (folder / "config.json").write_text(json.dumps(config if config is not None else cfg))
    return layers


# ---------------------------------------------------------------------- single-layer kinds
SINGLE = [  # folder kind, hook in, hook out, registry sites, type
    ("resid_post", "model.layers.3.output", "model.layers.3.output", ("blocks.3.resid_post", None), "sae"),
    ("attn_out_all", "model.layers.2.self_attn.o_proj.input", "model.layers.2.self_attn.o_proj.input",
     ("blocks.2.attn.z", None), "sae"),
    ("mlp_out", "model.layers.4.post_feedforward_layernorm.output", "model.layers.4.post_feedforward_layernorm.output",
     ("blocks.4.post_mlp_norm", None), "sae"),
    ("transcoder_all", "model.layers.1.pre_feedforward_layernorm.output",
     "model.layers.1.post_feedforward_layernorm.output", ("blocks.1.pre_mlp_norm", "blocks.1.post_mlp_norm"),
     "transcoder"),
]


@pytest.mark.parametrize("kind, hook_in, hook_out, sites, type_", SINGLE, ids=[s[0] for s in SINGLE])
def test_each_single_layer_kind_loads_exactly(tmp_path, m, kind, hook_in, hook_out, sites, type_):
    d_in = CFG.n_heads * CFG.d_head if "o_proj" in hook_in else CFG.d_model
    t = write_single(tmp_path / kind / "layer_x_width_16k_l0_small", hook_in, hook_out, d_in, d_in, 40, type_, False)
    d = load_dictionary(tmp_path / kind / "layer_x_width_16k_l0_small", model=m)
    assert type(d) is (JumpReLUSAE if type_ == "sae" else Transcoder)
    assert (d.site, d.site_out) == sites
    x = torch.randn(5, d_in)
    pre = x @ t["w_enc"] + t["b_enc"]
    want = (torch.relu(pre) * (pre > t["threshold"])) @ t["w_dec"] + t["b_dec"]
    assert torch.equal(d(x), want)
    _, feats = run_with_dictionaries(m, IDS, [d])
    assert sites[0] in feats


def test_an_affine_transcoder_adds_its_skip_term(tmp_path, m):
    folder = tmp_path / "transcoder_all" / "layer_2_width_16k_l0_small_affine"
    t = write_single(folder, "model.layers.2.pre_feedforward_layernorm.output",
                     "model.layers.2.post_feedforward_layernorm.output", CFG.d_model, CFG.d_model, 40, "transcoder",
                     True)
    tc = load_dictionary(folder, model=m)
    x = torch.randn(5, CFG.d_model)
    pre = x @ t["w_enc"] + t["b_enc"]
    want = (torch.relu(pre) * (pre > t["threshold"])) @ t["w_dec"] + t["b_dec"] + x @ t["affine_skip_connection"]
    assert torch.equal(tc(x), want)


@pytest.mark.parametrize("change, match", [
    ({"affine_connection": True}, r"affine_connection=True but the file lacks affine_skip_connection"),
    ({"type": "sae"}, r"type='sae' but the file writes"),
    ({"width": 41}, r"width=41 but w_enc has 40"),
    ({"type": "mystery"}, r"type='mystery' is unknown"),
    ({"architecture": "topk"}, r"architecture='topk' is not supported"),
    ({"normalize_activations": "layer_norm"}, r"unknown setting\(s\) \['normalize_activations'\]"),
])
def test_a_config_that_disagrees_or_is_unknown_is_refused_by_name(tmp_path, change, match):
    folder = tmp_path / "transcoder" / "layer_1_width_16k_l0_small"
    write_single(folder, "model.layers.1.pre_feedforward_layernorm.output",
                 "model.layers.1.post_feedforward_layernorm.output", CFG.d_model, CFG.d_model, 40, "transcoder", False)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(DictionaryFileError, match=match):
        load_dictionary(folder)


def test_affine_connection_false_with_a_skip_tensor_is_refused(tmp_path):
    folder = tmp_path / "transcoder_all" / "layer_1_width_16k_l0_small_affine"
    write_single(folder, "model.layers.1.pre_feedforward_layernorm.output",
                 "model.layers.1.post_feedforward_layernorm.output", CFG.d_model, CFG.d_model, 40, "transcoder", True)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "affine_connection": False}))
    with pytest.raises(DictionaryFileError, match="affine_connection=False but the file holds affine_skip_connection"):
        load_dictionary(folder)


# ---------------------------------------------------------------------- CLTs
def hand_clt_hooks(layers: list[dict[str, torch.Tensor]], affine: bool, keep_error: bool = False,
                   ablate: tuple[int, int] | None = None) -> list:
    """The published math, written out with plain hooks from the raw file tensors."""
    n = len(layers)
    acts: dict[int, torch.Tensor] = {}
    xs: dict[int, torch.Tensor] = {}

    def read(i):
        def hook(x, site):
            t = layers[i]
            pre = x @ t["w_enc"] + t["b_enc"]
            f = torch.relu(pre) * (pre > t["threshold"])
            if ablate is not None and ablate[0] == i:
                f = f.clone()
                f[..., ablate[1]] = 0
            acts[i], xs[i] = f, x
        return hook

    def write(o):
        def hook(y, site):
            out = layers[o]["b_dec"]
            for i in range(o + 1):
                out = out + acts[i] @ layers[i]["w_dec"][:, o]
            if affine:
                out = out + xs[o] @ layers[o]["affine_skip_connection"]
            return out + (y - out) if keep_error else out
        return hook

    return ([(f"blocks.{i}.pre_mlp_norm", read(i)) for i in range(n)]
            + [(f"blocks.{o}.post_mlp_norm", write(o)) for o in range(n)])


@pytest.mark.parametrize("affine", [False, True], ids=["clt", "clt_affine"])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_a_clt_spliced_into_the_model_equals_the_published_math(tmp_path, m, affine, lazy):
    widths = [12, 9, 14, 8, 11, 10]
    folder = tmp_path / "clt" / ("width_64_l0_big" + ("_affine" if affine else ""))
    layers = write_clt(folder, CFG.n_layers, CFG.d_model, widths, affine)
    clt = CrossLayerTranscoder.load(folder, lazy=lazy, model=m)
    assert clt.widths == widths and clt.lazy == lazy and clt.has_skip == affine
    assert clt.sites_in[3] == "blocks.3.pre_mlp_norm" and clt.sites_out[3] == "blocks.3.post_mlp_norm"
    want = m.run_with_hooks(IDS, hand_clt_hooks(layers, affine))
    logits, feats = run_with_dictionaries(m, IDS, [clt], splice=True)
    assert torch.equal(logits, want)
    assert sorted(feats.keys()) == sorted(f"blocks.{i}.pre_mlp_norm" for i in range(CFG.n_layers))
    assert feats["blocks.2.pre_mlp_norm"].shape == (1, IDS.shape[1], 14)
    # with the error term kept the output is the model's own; an ablation moves it exactly
    clean = m(IDS)
    kept, _ = run_with_dictionaries(m, IDS, [clt], splice=True, keep_error=True)
    torch.testing.assert_close(kept, clean, rtol=0, atol=1e-5)
    live = int(feats["blocks.1.pre_mlp_norm"][0, -1].nonzero()[0])
    ablated, _ = run_with_dictionaries(m, IDS, [clt], splice=True, ablate={0: [(1, live)]})
    torch.testing.assert_close(ablated, m.run_with_hooks(IDS, hand_clt_hooks(layers, affine, ablate=(1, live))),
                               rtol=0, atol=1e-5)
    assert not torch.equal(ablated, logits)


def test_clt_steering_adds_the_decoder_vector_to_every_later_layer(tmp_path, m):
    clt = CrossLayerTranscoder.random(CFG.n_layers, CFG.d_model, 10, seed=3)
    seen: dict[str, torch.Tensor] = {}

    def grab(x, site):
        seen[site.name] = x.clone()

    plain = {o: f"blocks.{o}.post_mlp_norm" for o in range(CFG.n_layers)}
    m.run_with_hooks(IDS, [(s, grab) for s in plain.values()])
    base = dict(seen)
    logits, _ = run_with_dictionaries(m, IDS, [clt], steer={0: {(4, 7): 2.0}},
                                      positions=[-1])
    m.run_with_hooks(IDS, [*((s, grab) for s in plain.values())])
    assert logits.shape[-1] == CFG.vocab_size
    # steering at layer 4 leaves layers 0..3 alone and adds 2 * W_dec_4[7, 4] at layer 4, last position
    hooks = [(s, grab) for s in plain.values()]
    from interp.features.interventions import clt_hooks

    clt.check_fits(m)
    m.run_with_hooks(IDS, clt_hooks(clt, steer={(4, 7): 2.0}, positions=[-1]) + hooks)
    for o in range(4):
        assert torch.equal(seen[plain[o]], base[plain[o]])
    torch.testing.assert_close(seen[plain[4]][0, -1] - base[plain[4]][0, -1], 2.0 * clt.decoder(4, 4)[7],
                               rtol=0, atol=1e-5)
    assert torch.equal(seen[plain[4]][0, :-1], base[plain[4]][0, :-1])
    with pytest.raises(IndexError, match="outside the CLT"):
        clt_hooks(clt, ablate=[(4, 10)])
    with pytest.raises(TypeError, match=r"\(layer, index\)"):
        clt_hooks(clt, ablate=[3])


def test_clt_round_trip_dtype_and_graph_slices(tmp_path):
    clt = CrossLayerTranscoder.random(4, 8, [5, 6, 7, 3], seed=1, skip=True)
    folder = clt.save(tmp_path / "clt" / "mine")
    lazy = CrossLayerTranscoder.load(folder)
    xs = [torch.randn(3, 8) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(lazy(xs), clt(xs)))
    assert torch.equal(lazy.decoder_rows(1, [4, 0]), clt.decoder_rows(1, [4, 0]))
    assert lazy.decoder_rows(1, [4, 0]).shape == (2, 3, 8)
    assert torch.equal(lazy.load_into_memory().W_dec[2], clt.W_dec[2])
    half = CrossLayerTranscoder.load(folder, dtype=torch.bfloat16)
    assert half.encoder(2)[0].dtype == torch.bfloat16 and half.encode(2, xs[2]).dtype == torch.bfloat16
    assert clt.to(torch.float64).decoder(0, 3).dtype == torch.float64
    assert json.loads((folder / "config.json").read_text())["width"] == 21
    with pytest.raises(ValueError, match="not 0"):
        clt.decoder(2, 0)


def test_layer_files_sort_by_number_not_as_strings(tmp_path):
    n, d = 11, 4
    folder = tmp_path / "clt" / "w"
    layers = write_clt(folder, n, d, [2 + i for i in range(n)], False)
    clt = CrossLayerTranscoder.load(folder, lazy=False)
    assert clt.widths == [2 + i for i in range(n)]
    assert torch.equal(clt.W_dec[10][:, 0], layers[10]["w_dec"][:, 10])
    assert torch.equal(clt.encoder(9)[0], layers[9]["w_enc"])


def _break(folder: Path, how: str) -> str:
    if how == "missing":
        (folder / "params_layer_2.safetensors").unlink()
        return r"params_layer_2.safetensors is missing"
    if how == "misshaped":
        t = load_file(str(folder / "params_layer_1.safetensors"))
        t["threshold"] = torch.zeros(3)
        save_file(t, str(folder / "params_layer_1.safetensors"))
        return r"params_layer_1.safetensors: threshold has shape \[3\], expected \[9\]"
    if how == "width":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "width": 7}))
        return r"width=7 but the layer files hold 33"
    if how == "output_axis":
        t = load_file(str(folder / "params_layer_0.safetensors"))
        t["w_dec"] = t["w_dec"][:, :2].contiguous()
        save_file(t, str(folder / "params_layer_0.safetensors"))
        return r"params_layer_0.safetensors: w_dec has shape \[8, 2, 32\].*output axis has 2 layers"
    if how == "affine":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "affine_connection": True}))
        return r"params_layer_0.safetensors: config.json says affine_connection=True but the file lacks"
    if how == "hooks":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["hf_hook_point_in"] = "model.layers.2.pre_feedforward_layernorm.output"
        (folder / "config.json").write_text(json.dumps(cfg))
        return r"names one layer; a CLT's hooks are spelled with \{all\}"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "misshaped", "width", "output_axis", "affine", "hooks"])
def test_a_hostile_clt_folder_is_refused_naming_the_file_and_the_fix(tmp_path, how):
    folder = tmp_path / "clt" / "width_33"
    write_clt(folder, 3, CFG.d_model, [8, 9, 16], False)
    match = _break(folder, how)
    with pytest.raises(DictionaryFileError, match=match):
        load_dictionary(folder)


def test_a_clt_for_another_model_is_refused(tmp_path, m):
    folder = tmp_path / "clt" / "w"
    write_clt(folder, 3, CFG.d_model, [4, 4, 4], False)
    with pytest.raises(DictionaryFileError, match="3 layers of width 32; the model has 6"):
        load_dictionary(folder, model=m)


def test_a_crosscoder_is_refused_because_no_reference_fixes_its_math(tmp_path):
    folder = tmp_path / "crosscoder" / "layer_1_2_3_4_width_64_l0_big"
    write_clt(folder, 4, CFG.d_model, [16] * 4, False, config={
        **BASE, "hf_hook_point_in": "model.layers.{1,2,3,4}.output",
        "hf_hook_point_out": "model.layers.{1,2,3,4}.output",
        "width": 64, "affine_connection": False, "type": "crosscoder"})
    with pytest.raises(DictionaryFileError, match="crosscoder.*no published reference.*does not guess"):
        load_dictionary(folder)


# ---------------------------------------------------------------------- the hub code path
def test_from_hub_fetches_every_kind_including_clt_layer_files(tmp_path, monkeypatch, m):
    """``snapshot_download`` replaced by a copy of the files its ``allow_patterns`` select from a
    local "repository": what the hub code asks for is exactly what loading needs."""
    import huggingface_hub

    repo = tmp_path / "repo"
    write_clt(repo / "clt" / "width_64_l0_big_affine", CFG.n_layers, CFG.d_model, [10] * CFG.n_layers, True)
    write_single(repo / "resid_post" / "layer_3_width_16k_l0_small", "model.layers.3.output", "model.layers.3.output",
                 CFG.d_model, CFG.d_model, 40, "sae", False)
    (repo / "clt" / "width_64_l0_big_affine" / "README.md").write_text("not fetched")
    cache = tmp_path / "cache"

    def fake_snapshot_download(repo_id, allow_patterns=(), token=None, **kwargs):
        for p in repo.rglob("*"):
            rel = p.relative_to(repo).as_posix()
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (cache / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, cache / rel)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    clt = from_hub("google/gemma-scope-2-270m-pt", "clt/width_64_l0_big_affine", model=m, dtype=torch.float64)
    assert isinstance(clt, CrossLayerTranscoder) and clt.dtype == torch.float64 and clt.has_skip
    fetched = sorted(p.name for p in (cache / "clt" / "width_64_l0_big_affine").iterdir())
    assert fetched == ["config.json"] + [f"params_layer_{i}.safetensors" for i in range(CFG.n_layers)]
    sae = from_hub("google/gemma-scope-2-270m-pt", "resid_post/layer_3_width_16k_l0_small", model=m)
    assert isinstance(sae, JumpReLUSAE) and sae.site == "blocks.3.resid_post"

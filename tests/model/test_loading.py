"""``Gemma3.from_pretrained`` on every checkpoint layout it promises to read, and its errors.

Every checkpoint here is written from one tiny random model (``SOURCE``) whose logits we know,
so each format is checked by the logits of what it loads, not just by its parameter names.
Hugging Face directories are written by transformers' own ``save_pretrained``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (the reference implementation; a dev dependency, never skipped)
from hf_reference import hf_logits, hf_state_dict, save_hf_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from interp.model import ConfigError, Gemma3, Gemma3Config
from interp.model.config import GLOBAL, SLIDING
from interp.model.loading import CheckpointError

CFG = Gemma3Config(n_layers=3, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, d_head=16,
                   vocab_size=300, window=4, rope_global_factor=8.0,
                   layer_types=(SLIDING, GLOBAL, SLIDING))
IDS = torch.tensor([[2, 17, 250, 3, 99, 42, 7, 8, 120, 5]])


@pytest.fixture(scope="module")
def source() -> Gemma3:
    m = Gemma3.from_config(CFG, seed=7)
    with torch.no_grad():
        m.embed.weight.mul_(50.0)  # logits O(1), so a wrong weight shows
    return m


@pytest.fixture(scope="module")
def expected(source) -> torch.Tensor:
    with torch.no_grad():
        return source(IDS)


@pytest.fixture(scope="module")
def hf_dir(source, tmp_path_factory):
    """(directory written by transformers' save_pretrained, the HF model that wrote it)."""
    folder = tmp_path_factory.mktemp("hf")
    hf = save_hf_checkpoint(source, folder)
    return folder, hf


def logits_of(model: Gemma3) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def assert_same_logits(model: Gemma3, expected: torch.Tensor, atol: float = 0.0):
    got = logits_of(model)
    assert got.shape == expected.shape
    assert float((got.float() - expected.float()).abs().max()) <= atol


def tensor_sizes(files) -> dict[str, int]:
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_slice(k).get_shape()
    return {k: int(torch.tensor(s).prod()) for k, s in out.items()}


def write_config(folder: Path, hf: dict) -> None:
    (folder / "config.json").write_text(json.dumps(hf))


def text_hf_config(cfg: Gemma3Config = CFG) -> dict:
    return {k: v for k, v in cfg.to_hf().items() if k != "architectures"}


# ---------------------------------------------------------------------- Hugging Face layouts
def test_save_pretrained_directory_matches_transformers(hf_dir, source, expected):
    folder, hf = hf_dir
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    m = Gemma3.from_pretrained(folder)
    assert m.cfg == CFG
    assert_same_logits(m, expected)  # same weights, same code: bit-identical
    diff = float((logits_of(m) - hf_logits(hf, IDS)).abs().max())
    print(f"\nfrom_pretrained(save_pretrained dir) vs transformers: {diff:.2e}")
    assert diff <= 1e-4
    assert not m.training
    assert not any(p.requires_grad for p in m.parameters())
    assert m.dtype == torch.float32 and m.device.type == "cpu"


def test_from_pretrained_accepts_str_and_path(hf_dir, expected):
    folder, _ = hf_dir
    assert_same_logits(Gemma3.from_pretrained(str(folder)), expected)


def test_sharded_checkpoint_with_index(source, expected, tmp_path):
    save_hf_checkpoint(source, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    assert_same_logits(Gemma3.from_pretrained(tmp_path), expected)


def test_index_naming_an_absent_shard_is_an_error(source, tmp_path):
    save_hf_checkpoint(source, tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        Gemma3.from_pretrained(tmp_path)


def test_single_safetensors_file_with_config_beside_it(hf_dir, expected):
    folder, _ = hf_dir
    assert_same_logits(Gemma3.from_pretrained(folder / "model.safetensors"), expected)


def test_bf16_loading(hf_dir, source):
    folder, _ = hf_dir
    m = Gemma3.from_pretrained(folder, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    ref = Gemma3.from_config(CFG)
    ref.load_state_dict(source.state_dict())
    ref = ref.to(torch.bfloat16)
    out = logits_of(m)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, logits_of(ref))


def test_bf16_checkpoint_loads_in_fp32(source, tmp_path):
    save_hf_checkpoint(source, tmp_path, dtype=torch.bfloat16)
    m = Gemma3.from_pretrained(tmp_path)  # default dtype float32: upcast exactly
    assert m.dtype == torch.float32
    for name, p in m.named_parameters():
        assert torch.equal(p, source.get_parameter(name).to(torch.bfloat16).float()), name


def test_float16_is_refused(hf_dir):
    folder, _ = hf_dir
    with pytest.raises(ValueError, match="float16"):
        Gemma3.from_pretrained(folder, dtype=torch.float16)


def test_tied_embedding_is_stored_once(hf_dir):
    folder, _ = hf_dir
    sizes = tensor_sizes([folder / "model.safetensors"])
    assert not any("lm_head" in k for k in sizes)  # transformers does not save the tied head
    m = Gemma3.from_pretrained(folder)
    names = [n for n, _ in m.named_parameters()]
    assert not any("lm_head" in n or "unembed" in n for n in names)
    assert len(names) == len(sizes)
    assert sum(p.numel() for p in m.parameters()) == sum(sizes.values())
    # the output head is the embedding: changing one changes the other
    before = logits_of(m)
    with torch.no_grad():
        m.embed.weight[5] += 1.0
    assert not torch.allclose(logits_of(m)[..., 5], before[..., 5])


# ---------------------------------------------------------------------- multimodal layouts
VISION = {
    "vision_tower.vision_model.embeddings.patch_embedding.weight": torch.randn(8, 3, 2, 2),
    "vision_tower.vision_model.post_layernorm.weight": torch.randn(8),
    "multi_modal_projector.mm_input_projection_weight": torch.randn(8, 32),
    "multi_modal_projector.mm_soft_emb_norm.weight": torch.randn(8),
}


def _multimodal_dir(source, folder: Path, layout: str) -> Path:
    text = hf_state_dict(source)  # "model.xxx" names
    if layout == "language_model.model.":  # transformers 4.50-4.5x Gemma3ForConditionalGeneration
        state = {"language_model." + k: v for k, v in text.items()}
        vision = dict(VISION)
        head = "language_model.lm_head.weight"
    else:  # "model.language_model.": newer transformers
        state = {"model.language_model." + k[len("model."):]: v for k, v in text.items()}
        vision = {"model." + k: v for k, v in VISION.items()}
        head = "lm_head.weight"
    state[head] = text["model.embed_tokens.weight"].clone()  # a tied head, if saved, is skipped
    # text and vision in separate shards, with an index, as released checkpoints are
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model-00001-of-00002.safetensors"))
    save_file(vision, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in state}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in vision})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_config(folder, {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
        "mm_tokens_per_image": 256, "eos_token_id": [1, 106],
        "text_config": text_hf_config(),
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8, "patch_size": 2},
    })
    return folder


@pytest.mark.parametrize("layout", ["language_model.model.", "model.language_model."])
def test_multimodal_checkpoint_loads_its_text_part(source, expected, tmp_path, layout):
    folder = _multimodal_dir(source, tmp_path, layout)
    m = Gemma3.from_pretrained(folder)
    assert m.cfg == CFG
    assert_same_logits(m, expected)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in source.parameters())


def test_multimodal_single_file(source, expected, tmp_path):
    state = {"language_model." + k: v for k, v in hf_state_dict(source).items()}
    state.update(VISION)
    save_file(state, str(tmp_path / "model.safetensors"))
    write_config(tmp_path, {"model_type": "gemma3", "text_config": text_hf_config()})
    assert_same_logits(Gemma3.from_pretrained(tmp_path), expected)


# ---------------------------------------------------------------------- gemma_pytorch
def gemma_pytorch_state(source: Gemma3, embed_name: str = "embedder.weight") -> dict[str, torch.Tensor]:
    """The state dict layout of google/gemma_pytorch: fused qkv (rows q, k, v), query/key_norm."""
    p = {n: t.detach().clone() for n, t in source.named_parameters()}
    state = {embed_name: p["embed.weight"], "model.norm.weight": p["final_norm.weight"]}
    for i in range(source.cfg.n_layers):
        b, g = f"blocks.{i}.", f"model.layers.{i}."
        state[g + "self_attn.qkv_proj.weight"] = torch.cat(
            [p[b + "attn.q_proj.weight"], p[b + "attn.k_proj.weight"], p[b + "attn.v_proj.weight"]], dim=0)
        state[g + "self_attn.o_proj.weight"] = p[b + "attn.o_proj.weight"]
        state[g + "self_attn.query_norm.weight"] = p[b + "attn.q_norm.weight"]
        state[g + "self_attn.key_norm.weight"] = p[b + "attn.k_norm.weight"]
        for ours, theirs in (("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
                             ("pre_mlp_norm", "pre_feedforward_layernorm"),
                             ("post_mlp_norm", "post_feedforward_layernorm")):
            state[g + theirs + ".weight"] = p[b + ours + ".weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            state[g + f"mlp.{proj}.weight"] = p[b + f"mlp.{proj}.weight"]
    return state


@pytest.mark.parametrize("embed_name", ["embedder.weight", "text_token_embedder.weight"])
def test_gemma_pytorch_checkpoint(source, expected, tmp_path, embed_name):
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": gemma_pytorch_state(source, embed_name)}, path)
    m = Gemma3.from_pretrained(path, config=CFG)  # a tiny config matches no preset
    assert m.cfg == CFG
    assert_same_logits(m, expected)


def test_gemma_pytorch_without_config_names_the_fix(source, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": gemma_pytorch_state(source)}, path)
    with pytest.raises(ConfigError, match="config"):
        Gemma3.from_pretrained(path)


def test_gemma_pytorch_fused_qkv_of_wrong_size_is_an_error(source, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": gemma_pytorch_state(source)}, path)
    with pytest.raises(CheckpointError, match="qkv_proj"):
        Gemma3.from_pretrained(path, config=CFG.replace(n_kv_heads=1))


_EXECUTED: list[str] = []


def _record(what):
    _EXECUTED.append(what)
    return what


class Payload:
    """Unpickling this would run ``_record``: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (_record, ("code ran during unpickling",))


def test_pickle_with_arbitrary_object_is_refused(source, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": gemma_pytorch_state(source), "extra": Payload()}, path)
    _EXECUTED.clear()
    with pytest.raises(CheckpointError, match="weights_only"):
        Gemma3.from_pretrained(path, config=CFG)
    assert _EXECUTED == []


# ---------------------------------------------------------------------- the hub
def test_hub_id_goes_through_snapshot_download(hf_dir, expected, monkeypatch, tmp_path):
    import huggingface_hub
    folder, _ = hf_dir
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.chdir(tmp_path)  # so "google/..." is not a local path
    m = Gemma3.from_pretrained("google/gemma-3-1b-pt")
    assert_same_logits(m, expected)
    assert len(calls) == 1
    repo_id, kwargs = calls[0]
    assert repo_id == "google/gemma-3-1b-pt"
    assert kwargs.get("token") == "hf_test_token"
    patterns = kwargs.get("allow_patterns")
    if patterns is not None:  # if it filters, it must keep what loading needs
        import fnmatch

        for needed in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                       "model.safetensors.index.json", "tokenizer.model"):
            assert any(fnmatch.fnmatch(needed, p) for p in patterns), needed


def test_hub_without_token_passes_none(hf_dir, monkeypatch, tmp_path):
    import huggingface_hub
    folder, _ = hf_dir
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append(kw) or str(folder))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    Gemma3.from_pretrained("google/gemma-3-1b-pt")
    assert calls[0].get("token") is None  # huggingface_hub then uses the cached login


def test_hub_failure_gives_advice(monkeypatch, tmp_path):
    import huggingface_hub

    def failing(repo_id, **kwargs):
        raise OSError("401 Client Error: gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="HF_TOKEN") as info:
        Gemma3.from_pretrained("google/gemma-3-1b-pt")
    assert "google/gemma-3-1b-pt" in str(info.value)


def test_missing_huggingface_hub_says_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImportError, match="pip install"):
        Gemma3.from_pretrained("google/gemma-3-1b-pt")


# ---------------------------------------------------------------------- errors
def test_missing_unexpected_and_misshaped_tensors_are_all_listed(source, tmp_path):
    state = hf_state_dict(source)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(4, 4)
    state["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(3, CFG.d_model)
    save_file(state, str(tmp_path / "model.safetensors"))
    write_config(tmp_path, text_hf_config())
    with pytest.raises(CheckpointError) as info:
        Gemma3.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "missing" in msg and "blocks.1.mlp.up_proj.weight" in msg
    assert "unexpected" in msg and "extra_proj" in msg
    assert "misshaped" in msg and "blocks.2.attn.k_proj.weight" in msg
    assert "(3, 32)" in msg and f"({CFG.n_kv_heads * CFG.d_head}, 32)" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("change", ["missing", "unexpected", "misshaped"])
def test_each_kind_of_mismatch_alone(source, tmp_path, change):
    state = hf_state_dict(source)
    if change == "missing":
        del state["model.norm.weight"]
        needle = "final_norm.weight"
    elif change == "unexpected":
        state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(CFG.d_model)
        needle = "model.layers.0.mlp.extra_proj.weight"
    else:
        state["model.embed_tokens.weight"] = torch.zeros(CFG.vocab_size + 1, CFG.d_model)
        needle = "embed.weight"
    save_file(state, str(tmp_path / "model.safetensors"))
    write_config(tmp_path, text_hf_config())
    with pytest.raises(CheckpointError, match=change) as info:
        Gemma3.from_pretrained(tmp_path)
    assert needle in str(info.value)


def test_config_that_does_not_fit_the_weights(hf_dir):
    folder, _ = hf_dir
    with pytest.raises(CheckpointError, match="says 4 layers but model.safetensors holds tensors for 3"):
        Gemma3.from_pretrained(folder, config=CFG.replace(n_layers=4))
    with pytest.raises(CheckpointError, match=r"misshaped \(35\): blocks.0.attn.k_proj.weight"):
        Gemma3.from_pretrained(folder, config=CFG.replace(d_model=64))


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        Gemma3.from_pretrained(tmp_path / "no_such_checkpoint")
    with pytest.raises(FileNotFoundError):
        Gemma3.from_pretrained(str(tmp_path / "no_such_dir" / "model.safetensors"))


def test_directory_without_weights(tmp_path):
    write_config(tmp_path, text_hf_config())
    with pytest.raises(CheckpointError, match="safetensors"):
        Gemma3.from_pretrained(tmp_path)

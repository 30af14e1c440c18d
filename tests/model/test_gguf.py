"""Reading llama.cpp GGUF files: the real demo model against transformers, and small synthetic files."""

from __future__ import annotations

import json
import sys

import gguf  # noqa: E402,F401  (the demo extra; a dev dependency, never skipped)
import hostile_builders as hb
import numpy as np
import pytest
import torch

from interp.model.config import Gemma3Config
from interp.model.gguf import (
    INSTALL_HINT,
    GGUFCheckpoint,
    GGUFDependencyError,
    GGUFError,
    hf_name,
    read_gguf,
    write_hf_dir,
)
from interp.model.tokenizer import Tokenizer

TINY = Gemma3Config(n_layers=2, d_model=32, d_mlp=64, n_heads=2, n_kv_heads=1, d_head=8,
                    vocab_size=300, window=4, max_positions=64, query_pre_attn_scalar=8.0)


# ---------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def demo_ckpt(demo_gguf) -> GGUFCheckpoint:
    return read_gguf(demo_gguf)


def test_demo_config_is_the_270m_preset(demo_ckpt):
    cfg, preset = demo_ckpt.config, Gemma3Config.preset("270m")
    for field in ("n_layers", "d_model", "d_mlp", "n_heads", "n_kv_heads", "d_head", "vocab_size", "window",
                  "rope_local_base", "rope_global_base", "rope_global_factor", "query_pre_attn_scalar", "eps",
                  "max_positions", "layer_types", "pad_token_id", "eos_token_id", "bos_token_id"):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg == preset


def test_demo_tensors_match_transformers_gguf_loading(demo_ckpt, hf_gguf_model):
    theirs = hf_gguf_model.state_dict()
    # transformers also stores norm weights as offsets from 1 (it subtracts llama.cpp's +1),
    # and ties lm_head to the embedding, which we store once
    assert theirs.pop("lm_head.weight").data_ptr() == theirs["model.embed_tokens.weight"].data_ptr()
    assert set(theirs) == set(demo_ckpt.tensors)
    for name, ours in demo_ckpt.tensors.items():
        assert ours.dtype == torch.float32 and ours.shape == theirs[name].shape, name
        torch.testing.assert_close(ours, theirs[name], rtol=0, atol=1e-6, msg=name)


def test_demo_dir_holds_the_same_weights(demo_ckpt, demo_path):
    from safetensors.torch import load_file

    stored = load_file(demo_path / "model.safetensors")
    assert set(stored) == set(demo_ckpt.tensors) and "lm_head.weight" not in stored
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.17.mlp.down_proj.weight"):
        assert torch.equal(stored[name], demo_ckpt.tensors[name])
    assert Gemma3Config.from_hf(demo_path) == demo_ckpt.config
    assert (demo_path / "tokenizer.model").read_bytes() == demo_ckpt.tokenizer_model


# ---------------------------------------------------------------------- synthetic files
def write_tiny_gguf(path, arch: str = "gemma3", cfg: Gemma3Config = TINY, seed: int = 0) -> dict[str, np.ndarray]:
    """A small GGUF laid out like llama.cpp's Gemma 3 output, one tensor Q8_0; returns the HF-named arrays."""
    expected: dict[str, np.ndarray] = {}
    hb.write_gguf(path, cfg, arch=arch, scale=1.0, q8_0=("blk.0.ffn_up.weight",), seed=seed, expected=expected)
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_tiny_gguf_round_trip(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    ckpt = read_gguf(path)
    assert ckpt.config == TINY
    assert set(ckpt.tensors) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ckpt.tensors[name], torch.from_numpy(value), rtol=0, atol=1e-6, msg=name)
    tok = Tokenizer.from_bytes(ckpt.tokenizer_model)
    assert tok.vocab_size == TINY.vocab_size and (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.sp.id_to_piece(7) == "\u2581\u2581" and tok.sp.is_control(2) and tok.sp.is_unknown(3)
    assert tok.decode(tok.encode("ab a")) == "ab a"

    out = write_hf_dir(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert Gemma3Config.from_hf(out) == TINY
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_dtype_cast_comes_after_subtracting_one(tiny_gguf):
    path, expected = tiny_gguf
    ckpt = read_gguf(path, dtype=torch.bfloat16)
    name = "model.layers.1.post_feedforward_layernorm.weight"
    assert ckpt.tensors[name].dtype == torch.bfloat16
    # (w + 1) - 1 in float32, then bf16: not bf16(w + 1) - 1, which would lose the small offsets
    assert torch.equal(ckpt.tensors[name], torch.from_numpy(expected[name]).to(torch.bfloat16))


def test_27b_query_scale_follows_llama_cpp(tmp_path):
    cfg = TINY.replace(n_layers=62, d_model=64, n_heads=2, d_head=8)
    path = tmp_path / "deep.gguf"
    write_tiny_gguf(path, cfg=cfg)
    assert read_gguf(path).config.query_pre_attn_scalar == 32.0  # d_model / n_heads, not d_head


def test_other_architecture_is_named(tmp_path):
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="'llama' model, not Gemma 3"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.97, 40])
def test_truncated_file(tiny_gguf, tmp_path, keep):
    data = tiny_gguf[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(cut)


def test_not_a_gguf_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(junk)
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "absent.gguf")


def test_missing_gguf_package(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(GGUFDependencyError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")) as info:
        read_gguf(tiny_gguf[0])
    assert isinstance(info.value, ImportError)


def test_unexpected_tensor_name():
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    with pytest.raises(GGUFError, match="blk.0.ssm_a"):
        hf_name("blk.0.ssm_a.weight")

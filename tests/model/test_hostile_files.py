"""Hostile and damaged configurations and checkpoints are refused before anything is allocated.

Every file is generated here (``hostile_builders``): a Hugging Face directory written from a
tiny random model, a llama.cpp-style GGUF, and copies of them with one thing broken. Each case
checks the exact error type and that its message names the field, tensor or file to fix.

Sizes that would exhaust memory if they were believed (10**9 layers, an enormous but in-bounds
shape) are loaded in a child process with an address-space cap and a timeout: the child must
end quickly with the clear error, never a MemoryError or a hang. In-process failures are followed
by a valid load, which must give bit-identical logits (nothing leaked from the failed load), and
the damaged file must no longer be mapped or open.
"""

from __future__ import annotations

import gc
import json
import pickle
import re
import struct
import time
from pathlib import Path

import hostile_builders as hb
import pytest
import support
import torch
from hf_reference import hf_state_dict
from safetensors.torch import save_file

from interp.model import CheckpointError, ConfigError, Gemma3, Gemma3Config
from interp.model.checkpoint import our_name
from interp.model.gguf import GGUFError

IDS = torch.tensor([[2, 17, 50, 3, 99, 42, 7, 8, 12, 5]])
CHECKPOINT_ERROR = "interp.model.checkpoint.CheckpointError"
GGUF_ERROR = "interp.model.gguf.GGUFError"
FAST_S = 30  # a refused hostile file must be refused well within this (the child is killed at 60 s)


# ---------------------------------------------------------------------- fixtures and checks
@pytest.fixture(scope="module")
def source() -> Gemma3:
    """The tiny 6-layer model every checkpoint here is written from."""
    return support.make_model(support.TINY, seed=3, sensitive=True)


@pytest.fixture(scope="module")
def expected(source) -> torch.Tensor:
    with torch.no_grad():
        return source(IDS)


@pytest.fixture(scope="module")
def state(source) -> dict[str, torch.Tensor]:
    """The source model's weights under Hugging Face names (copies: safe to damage)."""
    return hf_state_dict(source)


@pytest.fixture(scope="module")
def good_dir(source, tmp_path_factory) -> Path:
    return hb.write_hf_dir(tmp_path_factory.mktemp("good"), source)


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory) -> Path:
    return hb.write_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf")


@pytest.fixture
def still_works(source, expected, good_dir):
    """Call after a refused load: a valid checkpoint still loads to bit-identical logits, and
    the source model is untouched (no hooks, same logits)."""
    def check() -> None:
        m = Gemma3.from_pretrained(good_dir)
        with torch.no_grad():
            got = m(IDS)
            again = source(IDS)
        assert torch.equal(got, expected)
        assert torch.equal(again, expected)
        assert not m.registry.active and not source.registry.active
    return check


def assert_released(path: Path) -> None:
    """Nothing of a refused file stays mapped or open in this process (once reference cycles,
    if any, are collected: a full collection is slow, so only when needed)."""
    if hb.mapped_or_open(path):
        gc.collect()
    assert hb.mapped_or_open(path) == []


def damaged_dir(tmp_path: Path, source: Gemma3, overrides=None, state=None, name: str = "ckpt") -> Path:
    return hb.write_hf_dir(tmp_path / name, source, overrides, state)


# ---------------------------------------------------------------------- the memory-capped child
@pytest.mark.subprocess
def test_capped_child_loads_a_valid_checkpoint(good_dir):
    """The cap the hostile cases run under leaves room for a normal tiny load (so their
    failures below are the loader's refusals, not the cap)."""
    r = hb.load_capped(good_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "LOADED 6"


@pytest.mark.subprocess
@pytest.mark.parametrize("n_layers", [10**9, 10**5])
def test_config_claiming_a_huge_layer_count_fails_fast(source, tmp_path, n_layers):
    folder = damaged_dir(tmp_path, source, {"num_hidden_layers": n_layers, "layer_types": hb.DELETE})
    r = hb.load_capped(folder)
    kind, message = r.exception
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert kind == CHECKPOINT_ERROR, r.stderr[-2000:]
    assert str(folder / "config.json") in message and "num_hidden_layers" in message
    assert f"says {n_layers:,} layers" in message and "holds tensors for 6" in message
    assert "MemoryError" not in r.stderr
    assert r.seconds < FAST_S


@pytest.mark.subprocess
def test_enormous_in_bounds_shapes_fail_fast(source, tmp_path):
    """Every size within LIMITS (so the config itself is valid) but petabytes of weights: the
    tensors' shapes are compared with the config before anything is built."""
    folder = damaged_dir(tmp_path, source, {"hidden_size": 1 << 17, "intermediate_size": 1 << 20,
                                            "vocab_size": 1 << 24})
    r = hb.load_capped(folder)
    kind, message = r.exception
    assert kind == CHECKPOINT_ERROR, r.stderr[-2000:]
    assert "model.safetensors does not match the model configuration" in message
    assert "misshaped (68)" in message
    assert "blocks.0.attn.k_proj.weight: checkpoint (16, 32) vs model (16, 131072)" in message
    assert "MemoryError" not in r.stderr
    assert r.seconds < FAST_S


@pytest.mark.subprocess
def test_gguf_claiming_a_billion_blocks_fails_fast(tmp_path):
    path = hb.write_gguf(tmp_path / "deep.gguf", block_count=10**9)
    r = hb.load_capped(path)
    kind, message = r.exception
    assert kind == GGUF_ERROR, r.stderr[-2000:]
    assert str(path) in message
    assert "gemma3.block_count says 1,000,000,000 layers but the file holds tensors for 2" in message
    assert "MemoryError" not in r.stderr
    assert r.seconds < FAST_S


# ---------------------------------------------------------------------- configurations, in process
@pytest.mark.parametrize("n_layers", [10**9, 10**5, 1025])
def test_config_with_a_huge_layer_count_is_refused_at_once(n_layers):
    start = time.perf_counter()
    with hb.address_space_headroom():
        with pytest.raises(ConfigError, match=rf"^n_layers={n_layers:,} is beyond any Gemma 3 model"):
            Gemma3Config(n_layers=n_layers, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, d_head=8,
                         vocab_size=100)
        with pytest.raises(ConfigError, match=rf"^n_layers={n_layers:,} is beyond"):
            support.TINY.replace(n_layers=n_layers)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("field", ["d_model", "d_mlp", "vocab_size", "max_positions", "window", "d_head"])
def test_config_with_a_huge_size_is_refused_at_once(field):
    with hb.address_space_headroom():
        with pytest.raises(ConfigError, match=rf"^{field}=1,000,000,000,000 is beyond any Gemma 3 model"):
            support.TINY.replace(**{field: 10**12})


def test_from_config_refuses_a_huge_config_before_allocating(source, expected):
    with hb.address_space_headroom():
        with pytest.raises(ConfigError, match="n_layers=1,000,000,000"):
            Gemma3.from_config(Gemma3Config.preset("27b").replace(n_layers=10**9))
        # every size at its bound: a valid config whose weights cannot fit anywhere
        huge = Gemma3Config(n_layers=1024, d_model=1 << 17, d_mlp=1 << 20, n_heads=1024, n_kv_heads=1024,
                            d_head=4096, vocab_size=1 << 24)
        start = time.perf_counter()
        with pytest.raises(MemoryError, match=r"random weights of this configuration \([\d,]+ parameters"):
            Gemma3.from_config(huge)
        assert time.perf_counter() - start < 2
    with torch.no_grad():
        assert torch.equal(source(IDS), expected)


def test_hf_dict_and_file_with_a_huge_layer_count(tmp_path):
    hf = hb.hf_config_json(support.TINY, {"num_hidden_layers": 10**9, "layer_types": hb.DELETE})
    with hb.address_space_headroom():
        with pytest.raises(ConfigError, match=r"num_hidden_layers=1,000,000,000 is outside 1\.\.1,024"):
            Gemma3Config.from_hf(hf)
        file = tmp_path / "config.json"
        file.write_text(json.dumps(hf))
        with pytest.raises(ConfigError, match=re.escape(f"{file}: num_hidden_layers=1,000,000,000")):
            Gemma3Config.from_hf(file)


@pytest.mark.parametrize("n_layers", [7, 5, 1024])
def test_in_bounds_layer_count_that_is_not_the_checkpoints(source, tmp_path, still_works, n_layers):
    folder = damaged_dir(tmp_path, source, {"num_hidden_layers": n_layers, "layer_types": hb.DELETE})
    with pytest.raises(CheckpointError, match=re.escape(
            f"{folder / 'config.json'} (num_hidden_layers) says {n_layers:,} layers but model.safetensors "
            "holds tensors for 6")):
        Gemma3.from_pretrained(folder)
    still_works()


@pytest.mark.parametrize("key, value, needle", [
    ("rms_norm_eps", -1, "rms_norm_eps (our eps) must be a positive finite number, got -1.0"),
    ("rms_norm_eps", 0, "rms_norm_eps (our eps) must be a positive finite number, got 0.0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps (our eps) must be a positive finite number, got nan"),
    ("rope_theta", 0, "rope_theta (our rope_global_base) must be a positive finite number, got 0.0"),
    ("rope_theta", float("inf"), "rope_theta (our rope_global_base) must be a positive finite number, got inf"),
    ("rope_local_base_freq", -10, "rope_local_base_freq (our rope_local_base) must be a positive finite number"),
    ("max_position_embeddings", 0, "max_position_embeddings=0 is outside 1..16,777,216 (max_positions)"),
    ("max_position_embeddings", -5, "max_position_embeddings=-5 is outside 1..16,777,216 (max_positions)"),
    ("max_position_embeddings", 10**12, "max_position_embeddings=1,000,000,000,000 is outside"),
    ("vocab_size", 10**12, "vocab_size=1,000,000,000,000 is outside 1..16,777,216 (vocab_size)"),
])
def test_bad_value_in_config_json_names_the_key_and_file(source, tmp_path, still_works, key, value, needle):
    folder = damaged_dir(tmp_path, source, {key: value})
    with pytest.raises(ConfigError) as info:
        Gemma3.from_pretrained(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / 'config.json'}: "), message
    assert needle in message
    with pytest.raises(ConfigError, match=re.escape(needle)):  # the same from the config alone
        Gemma3Config.from_hf(folder)
    still_works()


@pytest.mark.parametrize("content, needle", [
    (b"{\"num_hidden_layers\": 6,", "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
    (b"[1, 2, 3]", "holds an array, not a JSON object of settings"),
    (b"\"gemma3\"", "holds a string, not a JSON object of settings"),
    (b"null", "holds null, not a JSON object of settings"),
    (b"6", "holds a number, not a JSON object of settings"),
], ids=["cut", "empty", "binary", "list", "string", "null", "number"])
def test_config_json_that_is_not_an_object(source, tmp_path, still_works, content, needle):
    folder = damaged_dir(tmp_path, source)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(str(folder / "config.json")) + ".*" + re.escape(needle)):
        Gemma3.from_pretrained(folder)
    still_works()


def test_gguf_context_length_zero_names_the_key(tmp_path, good_gguf, still_works):
    path = hb.write_gguf(tmp_path / "ctx.gguf", context_length=0)
    with pytest.raises(GGUFError, match=re.escape(f"{path}: metadata gemma3.context_length: max_positions "
                                                  "must be a positive integer, got 0")):
        Gemma3.from_pretrained(path)
    assert Gemma3.from_pretrained(good_gguf).cfg == hb.GGUF_CFG
    still_works()


def test_gguf_huge_embedding_length_names_the_key(tmp_path):
    path = hb.write_gguf(tmp_path / "wide.gguf", embedding_length=10**9)
    with hb.address_space_headroom():
        with pytest.raises(GGUFError, match=re.escape("metadata gemma3.embedding_length: d_model=1,000,000,000 "
                                                      "is beyond any Gemma 3 model")):
            Gemma3.from_pretrained(path)


# ---------------------------------------------------------------------- tensors
@pytest.mark.parametrize("bad", [
    {"model.layers.0.mlp.up_proj.weight": torch.int8},
    {"model.layers.4.input_layernorm.weight": torch.bool},
    {"model.layers.0.mlp.up_proj.weight": torch.int8, "model.layers.4.input_layernorm.weight": torch.bool},
    {"model.embed_tokens.weight": torch.int64},
], ids=["int8", "bool", "both", "int64-embedding"])
def test_non_float_tensor_is_named(source, state, tmp_path, still_works, bad):
    damaged = dict(state)
    for name, dtype in bad.items():
        damaged[name] = (state[name] * 10).to(dtype) if dtype is not torch.bool else state[name] > 0
    folder = damaged_dir(tmp_path, source, state=damaged)
    with pytest.raises(CheckpointError) as info:
        Gemma3.from_pretrained(folder)
    message = str(info.value)
    assert f"not floating point (weights must be F16, BF16, F32 or F64) ({len(bad)}):" in message
    short = {torch.int8: "I8", torch.bool: "BOOL", torch.int64: "I64"}
    for name, dtype in bad.items():
        assert f"{our_name(name)} ({short[dtype]})" in message
    del info
    assert_released(folder / "model.safetensors")
    still_works()


def _raw_safetensors(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data


@pytest.mark.parametrize("damage", ["half", "last-3-bytes", "last-byte", "header-only", "4-bytes",
                                    "empty", "header-length-2**60", "shape-beyond-data", "offsets-beyond-file"])
def test_truncated_or_forged_safetensors_names_the_file(source, tmp_path, still_works, damage):
    folder = damaged_dir(tmp_path, source)
    file = folder / "model.safetensors"
    size = file.stat().st_size
    header_len = struct.unpack("<Q", file.read_bytes()[:8])[0]
    if damage == "half":
        hb.cut(file, size // 2)
    elif damage == "last-3-bytes":
        hb.cut(file, -3)
    elif damage == "last-byte":
        hb.cut(file, -1)
    elif damage == "header-only":
        hb.cut(file, 8 + header_len)
    elif damage == "4-bytes":
        hb.cut(file, 4)
    elif damage == "empty":
        hb.cut(file, 0)
    elif damage == "header-length-2**60":
        file.write_bytes(_raw_safetensors({}, b"", header_len=1 << 60))
    elif damage == "shape-beyond-data":  # 10**18 elements claimed for 16 bytes of data
        file.write_bytes(_raw_safetensors(
            {"model.embed_tokens.weight": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]}},
            bytes(16)))
    elif damage == "offsets-beyond-file":
        file.write_bytes(_raw_safetensors(
            {"model.embed_tokens.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1 << 40]}},
            bytes(16)))
    with hb.address_space_headroom():
        with pytest.raises(CheckpointError, match=re.escape(f"{file} is not a readable safetensors file")
                           + r".*truncated or corrupt"):
            Gemma3.from_pretrained(folder)
    assert_released(file)
    still_works()


# ---------------------------------------------------------------------- shard indexes
@pytest.mark.parametrize("shard", ["../../../../etc/hostname", "/etc/hostname", "sub/../../outside.safetensors",
                                   "link.safetensors"])
def test_shard_index_outside_the_folder_is_refused(source, tmp_path, still_works, shard):
    folder = damaged_dir(tmp_path, source)
    outside = tmp_path / "outside.safetensors"
    save_file({"model.norm.weight": torch.zeros(32)}, str(outside))
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors",
                                        "model.norm.weight": shard}}))
    with pytest.raises(CheckpointError, match=re.escape(f"the shard index names {shard!r}, which is outside "
                                                        f"the model folder {folder}")):
        Gemma3.from_pretrained(folder)
    still_works()


@pytest.mark.parametrize("content, needle", [
    (b"{\"weight_map\": {", "JSONDecodeError"),
    (b"\xff\xfe", "UnicodeDecodeError"),
    (b"[\"model.safetensors\"]", "TypeError"),
    (b"{\"metadata\": {}}", "KeyError"),
    (b"{\"weight_map\": [\"model.safetensors\"]}", "AttributeError"),
], ids=["cut", "binary", "list", "no-weight-map", "weight-map-list"])
def test_shard_index_that_is_not_an_index(source, tmp_path, still_works, content, needle):
    folder = damaged_dir(tmp_path, source)
    index = folder / "model.safetensors.index.json"
    index.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(f"{index} is not a shard index") + ".*" + needle):
        Gemma3.from_pretrained(folder)
    still_works()


def test_shard_index_with_a_non_string_file_name(source, tmp_path, still_works):
    folder = damaged_dir(tmp_path, source)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": 7}}))
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: every weight_map entry must be a file name")):
        Gemma3.from_pretrained(folder)
    still_works()


# ---------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("name, ours, value", [
    ("model.layers.2.mlp.down_proj.weight", "blocks.2.mlp.down_proj.weight", float("nan")),
    ("model.embed_tokens.weight", "embed.weight", float("inf")),
    ("model.norm.weight", "final_norm.weight", float("-inf")),
])
def test_non_finite_weight_is_named(source, state, tmp_path, still_works, name, ours, value):
    damaged = dict(state)
    damaged[name] = state[name].clone()
    damaged[name].view(-1)[5] = value
    folder = damaged_dir(tmp_path, source, state=damaged)
    for check in (None, True):  # the default (a tiny checkpoint) checks
        kwargs = {} if check is None else {"check_finite": check}
        with pytest.raises(CheckpointError, match=re.escape(f"model.safetensors holds NaN or inf in 1 tensor(s): "
                                                            f"[{ours!r}]")):
            Gemma3.from_pretrained(folder, **kwargs)
    assert_released(folder / "model.safetensors")  # the half-filled model went with the error
    still_works()
    m = Gemma3.from_pretrained(folder, check_finite=False)
    loaded = m.get_parameter(ours)
    assert int((~torch.isfinite(loaded)).sum()) == 1
    assert torch.equal(loaded.view(-1)[5], torch.tensor(value)) or bool(torch.isnan(loaded.view(-1)[5]))


def test_non_finite_weights_are_all_listed(source, state, tmp_path):
    damaged = dict(state)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.5.mlp.gate_proj.weight"]
    for name in names:
        damaged[name] = state[name].clone()
        damaged[name][0, 0] = float("nan")
    folder = damaged_dir(tmp_path, source, state=damaged)
    with pytest.raises(CheckpointError, match=re.escape(
            "holds NaN or inf in 2 tensor(s): ['blocks.0.attn.q_proj.weight', 'blocks.5.mlp.gate_proj.weight']")):
        Gemma3.from_pretrained(folder)


def test_gguf_with_a_nan_tensor_is_named(tmp_path, still_works):
    path = hb.write_gguf(tmp_path / "nan.gguf", poison={"blk.1.ffn_down.weight": float("nan")})
    with pytest.raises(CheckpointError, match=re.escape(
            "nan.gguf holds NaN or inf in 1 tensor(s): ['blocks.1.mlp.down_proj.weight']")):
        Gemma3.from_pretrained(path)
    m = Gemma3.from_pretrained(path, check_finite=False)
    assert bool(torch.isnan(m.blocks[1].mlp.down_proj.weight).any())
    still_works()


# ---------------------------------------------------------------------- pickles
class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _gemma_pytorch_state(source: Gemma3) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in hf_state_dict(source).items()}


def test_payload_would_run_code(tmp_path):
    """The payload is live: plain unpickling does create the marker."""
    marker = tmp_path / "ran"
    handle = pickle.loads(pickle.dumps(Payload(marker)))
    handle.close()
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the plain pickle
@pytest.mark.parametrize("layout", ["zip", "legacy", "plain-pickle"])
@pytest.mark.parametrize("with_config", [False, True])
def test_malicious_pickle_is_refused_without_running_it(source, tmp_path, still_works, layout, with_config):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    payload = {"model_state_dict": _gemma_pytorch_state(source), "extra": Payload(marker)}
    if layout == "zip":
        torch.save(payload, path)
    elif layout == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    kwargs = {"config": support.TINY} if with_config else {}
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {path} as a gemma_pytorch checkpoint "
                                                        "(loaded with weights_only=True")):
        Gemma3.from_pretrained(path, **kwargs)
    assert not marker.exists()
    still_works()


def test_clean_gemma_pytorch_checkpoint_loads(source, expected, tmp_path):
    """The same file without the payload loads: the refusal above is the payload's doing."""
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": _gemma_pytorch_state(source)}, path)
    m = Gemma3.from_pretrained(path, config=support.TINY)
    with torch.no_grad():
        assert torch.equal(m(IDS), expected)

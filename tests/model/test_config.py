"""``Gemma3Config``: presets against the spec table, ``config.json`` parsing in all its spellings,
and refusal of configurations that cannot be Gemma 3.

Real-world ``config.json`` contents below are those of the released checkpoints (the
multimodal ones with their vision config left out): they are what users will point us at.
"""

from __future__ import annotations

import json

import pytest

from interp.model import ConfigError, Gemma3Config
from interp.model.config import GLOBAL, SLIDING

# ---------------------------------------------------------------------- presets: the spec table
#        layers  D     F      H   K   hd   W     factor scalar max_pos  vocab
SPEC_TABLE = {
    "270m": (18, 640, 2048, 4, 1, 256, 512, 1.0, 256.0, 32_768, 262_144),
    "1b": (26, 1152, 6912, 4, 1, 256, 512, 1.0, 256.0, 32_768, 262_144),
    "4b": (34, 2560, 10240, 8, 4, 256, 1024, 8.0, 256.0, 131_072, 262_208),
    "12b": (48, 3840, 15360, 16, 8, 256, 1024, 8.0, 256.0, 131_072, 262_208),
    "27b": (62, 5376, 21504, 32, 16, 128, 1024, 8.0, 168.0, 131_072, 262_208),
}


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_preset_matches_spec_table(name):
    cfg = Gemma3Config.preset(name)
    got = (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.window,
           cfg.rope_global_factor, cfg.query_pre_attn_scalar, cfg.max_positions, cfg.vocab_size)
    assert got == SPEC_TABLE[name]
    assert (cfg.rope_local_base, cfg.rope_global_base, cfg.eps) == (10_000.0, 1_000_000.0, 1e-6)
    assert [i for i in range(cfg.n_layers) if cfg.is_global(i)] == list(range(5, cfg.n_layers, 6))
    assert cfg.attn_scale == pytest.approx(cfg.query_pre_attn_scalar**-0.5)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, 1, 2)


def test_preset_names():
    assert Gemma3Config.preset("gemma-3-1b") == Gemma3Config.preset("1B") == Gemma3Config.preset("1b")
    with pytest.raises(ConfigError, match="270m"):
        Gemma3Config.preset("2b")


def test_to_dict_round_trips():
    cfg = Gemma3Config.preset("27b").replace(layer_types=(GLOBAL,) * 62)
    assert Gemma3Config(**cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


# ---------------------------------------------------------------------- released config.json files
GEMMA_3_1B_PT = {  # google/gemma-3-1b-pt: old RoPE spelling, no layer_types
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True,
    "vocab_size": 262144,
}
GEMMA_3_270M = {  # google/gemma-3-270m: has layer_types
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
    "layer_types": [GLOBAL if (i + 1) % 6 == 0 else SLIDING for i in range(18)],
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512, "torch_dtype": "bfloat16",
    "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 262144,
}
_MULTIMODAL = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}
# The multimodal releases give a *minimal* text_config: everything else (heads, head_dim,
# vocab_size, ...) is transformers' Gemma3TextConfig default (8 heads, 4 kv heads, head_dim 256,
# vocab 262,208).
GEMMA_3_4B_IT = dict(_MULTIMODAL, text_config={
    "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
})
GEMMA_3_12B_IT = dict(_MULTIMODAL, text_config={
    "hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text",
    "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
})
GEMMA_3_27B_IT = dict(_MULTIMODAL, text_config={
    "head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
    "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
    "query_pre_attn_scalar": 168, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
})


@pytest.mark.parametrize("preset,hf", [("1b", GEMMA_3_1B_PT), ("270m", GEMMA_3_270M)])
def test_released_text_configs(preset, hf):
    assert Gemma3Config.from_hf(hf) == Gemma3Config.preset(preset)


@pytest.mark.parametrize("preset,hf", [("4b", GEMMA_3_4B_IT), ("12b", GEMMA_3_12B_IT), ("27b", GEMMA_3_27B_IT)])
def test_released_multimodal_configs_use_transformers_defaults(preset, hf):
    """Fields absent from text_config take Gemma3TextConfig's defaults, as transformers reads them."""
    assert Gemma3Config.from_hf(hf) == Gemma3Config.preset(preset)


def _hf_normalised(hf: dict) -> dict:
    """What transformers makes of a config dict: Gemma3TextConfig(**hf).to_dict() (new spelling)."""
    import transformers
    text = hf.get("text_config", hf)
    kwargs = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "torch_dtype")}
    return transformers.Gemma3TextConfig(**kwargs).to_dict()


@pytest.mark.parametrize("hf", [GEMMA_3_1B_PT, GEMMA_3_270M, GEMMA_3_4B_IT, GEMMA_3_27B_IT],
                         ids=["1b", "270m", "4b", "27b"])
def test_we_read_a_config_as_transformers_does(hf):
    normalised = _hf_normalised(hf)
    assert "rope_parameters" in normalised  # transformers >= 5 writes the new spelling
    assert Gemma3Config.from_hf(hf) == Gemma3Config.from_hf(normalised)


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_to_hf_round_trips_through_both_rope_spellings(name):
    cfg = Gemma3Config.preset(name)
    old = cfg.to_hf()
    assert "rope_theta" in old and "rope_local_base_freq" in old  # the old spelling
    assert Gemma3Config.from_hf(old) == cfg
    new = _hf_normalised(old)
    assert Gemma3Config.from_hf(new) == cfg


# ---------------------------------------------------------------------- RoPE spellings
TINY = {"model_type": "gemma3_text", "num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
        "sliding_window": 8}


def test_old_rope_spelling():
    cfg = Gemma3Config.from_hf(dict(TINY, rope_theta=500_000.0, rope_local_base_freq=20_000.0,
                                    rope_scaling={"rope_type": "linear", "factor": 4.0}))
    assert (cfg.rope_global_base, cfg.rope_local_base, cfg.rope_global_factor) == (500_000.0, 20_000.0, 4.0)
    legacy = Gemma3Config.from_hf(dict(TINY, rope_scaling={"type": "linear", "factor": 8.0}))  # "type" key
    assert legacy.rope_global_factor == 8.0
    unscaled = Gemma3Config.from_hf(dict(TINY, rope_scaling=None))
    assert (unscaled.rope_global_base, unscaled.rope_local_base, unscaled.rope_global_factor) == (1e6, 1e4, 1.0)


def test_new_rope_spelling():
    cfg = Gemma3Config.from_hf(dict(TINY, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 750_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 12_345.0},
    }))
    assert (cfg.rope_global_base, cfg.rope_local_base, cfg.rope_global_factor) == (750_000.0, 12_345.0, 8.0)
    default_local = Gemma3Config.from_hf(dict(TINY, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default"}}))
    assert (default_local.rope_local_base, default_local.rope_global_factor) == (10_000.0, 1.0)


def test_both_spellings_give_the_same_config():
    old = Gemma3Config.from_hf(dict(TINY, rope_theta=1e6, rope_local_base_freq=1e4,
                                    rope_scaling={"rope_type": "linear", "factor": 8.0}))
    new = Gemma3Config.from_hf(dict(TINY, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    assert old == new


def test_layer_types_and_pattern():
    explicit = [GLOBAL, SLIDING, SLIDING, GLOBAL, SLIDING, SLIDING]
    assert Gemma3Config.from_hf(dict(TINY, layer_types=explicit)).layer_types == tuple(explicit)
    assert Gemma3Config.from_hf(TINY).layer_types == (SLIDING,) * 5 + (GLOBAL,)
    every_3rd = Gemma3Config.from_hf(dict(TINY, sliding_window_pattern=3))
    assert [i for i in range(6) if every_3rd.is_global(i)] == [2, 5]


def test_text_config_nesting_and_paths(tmp_path):
    nested = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "text_config": TINY, "vision_config": {"model_type": "siglip_vision_model"}}
    assert Gemma3Config.from_hf(nested) == Gemma3Config.from_hf(TINY)
    (tmp_path / "config.json").write_text(json.dumps(nested))
    assert Gemma3Config.from_hf(tmp_path) == Gemma3Config.from_hf(TINY)
    assert Gemma3Config.from_hf(tmp_path / "config.json") == Gemma3Config.from_hf(TINY)
    assert Gemma3Config.from_hf(str(tmp_path)) == Gemma3Config.from_hf(TINY)


# ---------------------------------------------------------------------- what is refused
@pytest.mark.parametrize("change,needle", [
    ({"num_key_value_heads": 3}, "divisible"),
    ({"layer_types": [SLIDING, "chunked_attention", SLIDING, SLIDING, SLIDING, GLOBAL]}, "chunked_attention"),
    ({"layer_types": [SLIDING, GLOBAL]}, "layer_types"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "yarn"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}}, "sliding"),
    ({"final_logit_softcapping": 30.0}, "softcapping"),
    ({"attn_logit_softcapping": 50.0}, "softcapping"),
    ({"model_type": "gemma2"}, "gemma2"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_hidden_layers": 0}, "n_layers"),
])
def test_inconsistent_configs_raise_config_error(change, needle):
    hf = dict(TINY)
    for k, v in change.items():
        if v is None:
            del hf[k]
        else:
            hf[k] = v
    with pytest.raises(ConfigError, match=needle):
        Gemma3Config.from_hf(hf)


def test_direct_construction_is_checked():
    good = dict(n_layers=2, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=50)
    Gemma3Config(**good)
    for bad in ({"n_kv_heads": 3}, {"d_model": 0}, {"layer_types": ("local", "global")},
                {"layer_types": (GLOBAL,)}, {"rope_global_factor": 0.0}, {"query_pre_attn_scalar": -1.0}):
        with pytest.raises(ConfigError):
            Gemma3Config(**dict(good, **bad))
    assert issubclass(ConfigError, ValueError)

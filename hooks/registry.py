"""The hook registry: scoped hooks on named sites, and the one cheap check on the hot path.

A model declares its site names once (:class:`~interp.hooks.names.SiteNames`). Each forward
pass opens a :class:`HookRun` (``registry.run(...)``) and calls ``run.fire(name, x, layer)`` at
every site; when nothing is hooked, ``fire`` is one dictionary miss and returns ``x``. Hooks are
``fn(x, site) -> Tensor | None``: a returned tensor replaces the activation (same shape, dtype
and device), ``None`` keeps it.

Scopes and threads. Hooks live only inside a scope (``with registry.scope({...}):``) and are
removed when it ends, also on an exception. A scope belongs to the thread or asyncio task that
opened it: the active hooks are a :mod:`contextvars` value, so another thread running the same
model sees none of them, and an asyncio task sees the scopes that were open where it was
created plus its own. A forward takes its snapshot of the active hooks when it starts. What is
shared between threads: the weights, the site names, and the ``check_finite`` debug switch.

>>> import torch
>>> from interp.hooks.names import SiteNames
>>> reg = HookRegistry(SiteNames(["a", "blocks.0.b", "blocks.1.b"], layer_format="blocks.{layer}."))
>>> seen = []
>>> with reg.scope({"blocks.*.b": lambda x, site: seen.append(site.name)}):
...     _ = reg.run().fire("blocks.0.b", torch.zeros(1), 0)
>>> seen, dict(reg.active)
(['blocks.0.b'], {})
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from .names import NameSpec, SiteNames, is_exact

Hook = Callable[[torch.Tensor, "Site"], torch.Tensor | None]
HookSpec = Mapping[Any, Hook] | Sequence[tuple[Any, Hook]] | None

# Modes of the current thread/task (not of a model): a second, checking pass after a
# non-finite result, and internal partial runs whose callers know they stop early.
_CHECKING: contextvars.ContextVar[bool] = contextvars.ContextVar("interp_check_finite", default=False)
_PARTIAL: contextvars.ContextVar[bool] = contextvars.ContextVar("interp_partial_run", default=False)


_NO_HOOKS: Mapping[str, tuple[Registration, ...]] = MappingProxyType({})


class HookError(RuntimeError):
    """A hook broke a rule of the registry (wrong shape, dtype or device, bad return value)."""


class NonFiniteError(FloatingPointError):
    """An activation or result holds NaN or inf; the message names the first site where it appeared."""


@dataclass(frozen=True)
class Site:
    """What a hook is told about the activation it receives.

    ``name`` is the canonical site name, ``layer`` the layer index (None outside layers) and
    ``kind`` the name without its layer prefix (``attn.pattern``). ``positions`` are the
    position ids of the tokens the tensor covers, a LongTensor ``[batch, seq]`` (they differ from
    sequence indices with left padding). ``offset`` is the sequence index of the tensor's first
    token in the whole sequence (non-zero when a run reuses a cached prefix or generates), and
    ``seq_axis`` the tensor axis of (query) tokens. ``head_axis`` is the axis that indexes
    attention heads (None if none) and ``kv_group`` how many query heads share each head on
    that axis (>1 for keys and values under grouped-query attention). ``indices``, when set,
    lists the whole-sequence indices the sequence axis holds (a run that computes only some
    positions, e.g. ``logits_at``), and ``length`` is then the whole sequence's length. On a site
    with a key axis (attention scores and patterns), ``key_offset`` is the whole-sequence
    position of its first key (non-zero when earlier keys come from a cache and some fall
    outside a sliding window).
    """

    name: str
    layer: int | None
    positions: torch.Tensor | None = None
    offset: int = 0
    seq_axis: int = 1
    head_axis: int | None = None
    kv_group: int = 1
    indices: torch.Tensor | None = None
    length: int | None = None
    kind: str = ""
    key_offset: int = 0

    def whole_sequence(self, local: int) -> tuple[int, torch.Tensor]:
        """``(length of the whole sequence, the whole-sequence index of each of the tensor's
        ``local`` tokens)``."""
        if self.indices is not None:
            if self.indices.dim() != 1:
                raise ValueError(f"{self.name!r} holds different positions in each row (per-row logits_at); "
                                 "a positions= selection cannot apply there")
            return int(self.length if self.length is not None else local), self.indices.cpu()
        return self.offset + local, torch.arange(self.offset, self.offset + local)


class Registration(NamedTuple):
    """One hook on one site: the function, and whether it was named exactly (not by a glob)."""

    fn: Hook
    exact: bool
    spec: str


def hook_pairs(hooks: HookSpec) -> list[tuple[Any, Hook]]:
    """Hook specs as ``[(name spec, hook), ...]``: from a dict, a list of pairs, or None.

    >>> [spec for spec, _ in hook_pairs({"embed": print})], hook_pairs(None)
    (['embed'], [])
    """
    if hooks is None:
        return []
    pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"hooks must be a dict {{name: fn}} or a list of (name, fn) pairs, got {item!r}")
        if not callable(item[1]):
            raise TypeError(f"the hook for {item[0]!r} is not callable: {item[1]!r}")
        _check_arity(item[0], item[1])
    return pairs


def _check_arity(name: Any, fn: Callable[..., Any]) -> None:
    """A hook is called ``fn(x, site)``: refuse one that cannot take two positional arguments."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: they are called as they are
        return
    try:
        sig.bind(None, None)
    except TypeError:
        raise TypeError(f"the hook for {name!r} has the signature {fn.__name__ if hasattr(fn, '__name__') else fn}"
                        f"{sig}, but hooks are called fn(x, site): x the tensor at the site, site a Site (its "
                        "name, layer, ...); write e.g. `lambda x, site: x * 0`") from None


class ResolvedNames(list[str]):
    """Canonical site names already resolved by the caller, in model order: :meth:`HookRegistry.resolve`
    (and so a scope) takes them as they are instead of matching them again. A caller that
    resolves once and then hooks and sizes the same names (``run_with_cache``) passes these.

    >>> from interp.hooks.names import SiteNames
    >>> reg = HookRegistry(SiteNames(["a", "b"]))
    >>> reg.resolve(ResolvedNames(reg.resolve("*")))
    ['a', 'b']
    """


class HookRegistry:
    """The site names of one model and the hooks each thread or task has active on them.

    ``info`` gives per-name extra :class:`Site` fields (``seq_axis``, ``head_axis``,
    ``kv_group``). ``check_finite = True`` (a debug switch, shared by all threads) makes every
    site check its tensor as it fires and raise :class:`NonFiniteError` at the first NaN or inf.
    """

    def __init__(self, names: SiteNames, info: Mapping[str, dict[str, Any]] | None = None):
        self.names = names
        self.info: dict[str, dict[str, Any]] = {}
        for name in names.names:
            layer, kind = names.split(name)
            self.info[name] = {"kind": kind, **(info or {}).get(name, {})}
        self._active: contextvars.ContextVar[Mapping[str, tuple[Registration, ...]]] = contextvars.ContextVar(
            f"interp_hooks_{id(self)}", default=_NO_HOOKS)
        self.check_finite = False

    def resolve(self, spec: NameSpec) -> list[str]:
        """Canonical names matched by ``spec`` (see :meth:`SiteNames.resolve`); a
        :class:`ResolvedNames` is taken as it is."""
        if isinstance(spec, ResolvedNames):
            return list(spec)
        return self.names.resolve(spec)

    @property
    def active(self) -> Mapping[str, tuple[Registration, ...]]:
        """The hooks this thread or task sees: ``{site name: registrations}`` (do not modify)."""
        return self._active.get()

    def is_hooked(self, name: str) -> bool:
        """True when a hook is active on ``name`` in this thread or task."""
        return name in self._active.get()

    @contextmanager
    def scope(self, hooks: HookSpec) -> Iterator[HookRegistry]:
        """Activate hooks for the duration of a ``with`` block, in this thread or task only.

        ``hooks`` maps a name spec (see :meth:`resolve`) to a hook, or is a list of
        ``(spec, hook)`` pairs (to put several hooks on one site; they run in list order,
        after the hooks of enclosing scopes). One function reaching one site through two
        different specs of the same scope (``{"blocks.0.x": f, "blocks.*.x": f}``) would run twice
        there, which is never what such a dict means: it is a ``ValueError``. Listing the same
        ``(spec, f)`` pair twice runs ``f`` twice, in order, as written.
        """
        pairs = hook_pairs(hooks)
        current = self._active.get()
        new = dict(current)
        via: dict[tuple[str, int], str] = {}
        for spec, fn in pairs:
            exact = is_exact(spec)
            label = str(spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec)))
            for name in self.resolve(spec):
                first = via.setdefault((name, id(fn)), label)
                if first != label:
                    raise ValueError(f"the same hook {getattr(fn, '__name__', fn)!r} reaches {name!r} through both "
                                     f"{first!r} and {label!r}, so it would run twice there; give each function "
                                     "once per site (e.g. only the glob)")
                new[name] = new.get(name, ()) + (Registration(fn, exact, label),)
        token = self._active.set(new)
        try:
            yield self
        finally:
            try:
                self._active.reset(token)
            except ValueError:  # exited in another context than it was entered: restore by value
                self._active.set(current)

    def clear(self) -> None:
        """Remove every hook this thread or task sees (a last resort; scopes clean up after themselves)."""
        self._active.set({})

    def run(self, positions: torch.Tensor | None = None, offset: int = 0) -> HookRun:
        """A :class:`HookRun` for one forward pass, with a snapshot of this context's hooks."""
        return HookRun(self, positions, offset)


class HookRun:
    """One forward pass's view of the registry: the hooks active where it started, and what
    hooks are told about positions. ``fire`` is the only method on the hot path."""

    __slots__ = ("registry", "hooks", "positions", "offset", "indices", "length", "checking", "fire", "key_offsets")

    def __init__(self, registry: HookRegistry, positions: torch.Tensor | None = None, offset: int = 0):
        self.registry = registry
        self.hooks = registry.active
        self.positions, self.offset = positions, offset
        self.indices: torch.Tensor | None = None
        self.length: int | None = None
        self.key_offsets: dict[int | None, int] = {}
        self.checking = registry.check_finite or _CHECKING.get()
        self.fire: Callable[..., torch.Tensor] = self._fire_checked if self.checking else self._fire

    def site(self, name: str, layer: int | None) -> Site:
        """The :class:`Site` a hook on ``name`` is given now."""
        return Site(name, layer, self.positions, self.offset, indices=self.indices, length=self.length,
                    key_offset=self.key_offsets.get(layer, 0), **self.registry.info.get(name, {}))

    def _fire(self, name: str, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        regs = self.hooks.get(name)
        if regs is None:
            return x
        return self._call(name, x, layer, regs)

    def _fire_checked(self, name: str, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"{name} is the first non-finite site: the model computed NaN or inf there "
                                 "from finite inputs (before any hook on it)")
        regs = self.hooks.get(name)
        if regs is None:
            return x
        out = self._call(name, x, layer, regs)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(f"{name} is the first non-finite site: a hook on it returned NaN or inf "
                                 "(the model's own value there was finite)")
        return out

    def _call(self, name: str, x: torch.Tensor, layer: int | None, regs: tuple[Registration, ...]) -> torch.Tensor:
        site = self.site(name, layer)
        for reg in regs:
            out = reg.fn(x, site)
            if out is None:
                continue
            if not isinstance(out, torch.Tensor):
                raise HookError(f"hook on {name!r} returned {type(out).__name__}; return a Tensor or None")
            if out.shape != x.shape or out.dtype != x.dtype:
                raise HookError(
                    f"hook on {name!r} returned shape {tuple(out.shape)} {out.dtype}, but the site has "
                    f"shape {tuple(x.shape)} {x.dtype}; return a tensor of the same shape and dtype "
                    "(use .to(x.dtype) / expand_as(x))")
            if out.device != x.device:
                raise HookError(f"hook on {name!r} returned a tensor on {out.device}, but the site is on "
                                f"{x.device}; return it on the site's device (.to(x.device))")
            x = out
        return x


def backward_hook(fn: Callable[[torch.Tensor, Site], torch.Tensor | None]) -> Hook:
    """Turn ``fn(grad, site) -> Tensor | None`` into a forward hook that runs it on the
    gradient flowing back into the site (replacing it when ``fn`` returns a tensor).

    >>> x = torch.ones(2, requires_grad=True)
    >>> y = x * 1
    >>> _ = backward_hook(lambda g, site: g * 3)(y, Site("embed", None))
    >>> y.sum().backward(); x.grad
    tensor([3., 3.])
    """

    def hook(x: torch.Tensor, site: Site) -> None:
        if x.requires_grad:
            x.register_hook(lambda grad: fn(grad, site))  # type: ignore[no-untyped-call]
        return None

    return hook


@contextmanager
def checking_pass() -> Iterator[None]:
    """Within the block, every site of every forward in this thread checks for NaN and inf
    (how analyses find the first non-finite site after a cheap check of their result failed)."""
    token = _CHECKING.set(True)
    try:
        yield
    finally:
        _CHECKING.reset(token)


@contextmanager
def partial_run() -> Iterator[None]:
    """Marks forwards in the block as deliberately partial (an analysis that stops early or
    steps layer by layer): hooks of enclosing scopes that such a run cannot reach are expected,
    not an error."""
    token = _PARTIAL.set(True)
    try:
        yield
    finally:
        _PARTIAL.reset(token)


def in_partial_run() -> bool:
    """True inside :func:`partial_run`."""
    return _PARTIAL.get()


__all__ = ["Hook", "HookSpec", "HookError", "NonFiniteError", "Site", "Registration", "ResolvedNames",
           "HookRegistry", "HookRun",
           "hook_pairs", "backward_hook", "checking_pass", "partial_run", "in_partial_run"]

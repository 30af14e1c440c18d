"""The hook registry: named sites, scoped hooks, and the one cheap check on the hot path.

A model declares its site names once and calls ``registry.fire(name, x, layer)`` at each of
them. When nothing is hooked, ``fire`` is a dictionary miss and returns ``x`` untouched. Hooks
are ``fn(x, site) -> Tensor | None``: returning a tensor replaces the activation (same shape
and dtype), ``None`` keeps it. Hooks live only inside a scope and are removed when it ends,
also on an exception.

>>> import torch
>>> reg = HookRegistry(["a", "blocks.0.b", "blocks.1.b"])
>>> seen = []
>>> with reg.scope({"blocks.*.b": lambda x, site: seen.append(site.name)}):
...     _ = reg.fire("blocks.0.b", torch.zeros(1), 0)
>>> seen, reg.active
(['blocks.0.b'], {})
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch

Hook = Callable[[torch.Tensor, "Site"], Union[torch.Tensor, None]]
NameSpec = Union[str, Sequence[str], Callable[[str], bool], None]


class HookError(RuntimeError):
    """A hook broke a rule of the registry (wrong shape or dtype, bad return value)."""


class UnknownSiteError(KeyError):
    """A site name, glob or alias that matches nothing; the message lists the nearest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Site:
    """What a hook is told about the activation it receives.

    ``name`` is the canonical site name, ``layer`` the block index (None outside blocks) and
    ``positions`` the token positions the tensor covers, a LongTensor ``[batch, seq]`` (it
    matters with padding and partial runs). ``offset`` is the sequence index of the tensor's
    first token within the whole sequence (non-zero when a run reuses a cached prefix), and
    ``seq_axis`` the tensor axis of (query) tokens. ``head_axis`` is the axis that indexes
    attention heads (None if none) and ``kv_group`` how many query heads share each head on
    that axis (>1 for keys and values under grouped-query attention). ``indices``, when set,
    lists the whole-sequence indices the sequence axis holds (a run that computes only some
    positions, e.g. ``logits_at``), and ``length`` is then the whole sequence's length.
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

    def whole_sequence(self, local: int) -> tuple[int, torch.Tensor]:
        """``(length of the whole sequence, the whole-sequence index of each of the tensor's
        ``local`` tokens)``."""
        if self.indices is not None:
            if self.indices.dim() != 1:
                raise ValueError(f"{self.name!r} holds different positions in each row (per-row logits_at); "
                                 "a positions= selection cannot apply there")
            return int(self.length), self.indices.cpu()
        return self.offset + local, torch.arange(self.offset, self.offset + local)

    @property
    def kind(self) -> str:
        """The name without its ``blocks.{i}.`` prefix, e.g. ``attn.pattern``."""
        return _LAYER_PREFIX.sub("", self.name)


_LAYER_PREFIX = re.compile(r"^blocks\.\d+\.")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``blocks.{3,5}.mlp.*`` -> two patterns.

    >>> expand_braces("blocks.{3,5}.mlp.{up,gate}")
    ['blocks.3.mlp.up', 'blocks.3.mlp.gate', 'blocks.5.mlp.up', 'blocks.5.mlp.gate']
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out: list[str] = []
    for option in match.group(1).split(","):
        out.extend(expand_braces(head + option + tail))
    return out


class HookRegistry:
    """The set of valid site names of one model and the hooks active on them.

    ``aliases`` maps other spellings (e.g. Hugging Face module paths) to canonical names;
    ``info`` gives per-name extra :class:`Site` fields (``seq_axis``, ``head_axis``, ``kv_group``).
    ``fire`` is the only method on the hot path.
    """

    def __init__(self, names: Iterable[str], aliases: Mapping[str, str] | None = None,
                 info: Mapping[str, dict[str, Any]] | None = None):
        self.names: tuple[str, ...] = tuple(names)
        self.info: dict[str, dict[str, Any]] = dict(info or {})  # extra Site fields per name
        self._name_set = frozenset(self.names)
        self.aliases: dict[str, str] = dict(aliases or {})
        unknown = [a for a, n in self.aliases.items() if n not in self._name_set]
        if unknown:
            raise ValueError(f"aliases point to unknown names: {unknown}")
        self.active: dict[str, list[Hook]] = {}
        # Set by the model during each forward: what hooks are told about positions.
        self.positions: torch.Tensor | None = None
        self.offset: int = 0
        self.indices: torch.Tensor | None = None
        self.length: int | None = None

    # ------------------------------------------------------------------ names
    def resolve(self, spec: NameSpec) -> list[str]:
        """Canonical names matched by ``spec``, in model order.

        ``spec`` is an exact name, an alias, a glob (``*``, ``?``, ``[..]``, ``{a,b}``), a list
        of those, a predicate ``fn(name) -> bool``, or None for every name. A string or list
        item that matches nothing raises :class:`UnknownSiteError` with the closest names.

        >>> reg = HookRegistry(["embed", "blocks.0.attn.q", "blocks.0.attn.k"])
        >>> reg.resolve("blocks.0.attn.*")
        ['blocks.0.attn.q', 'blocks.0.attn.k']
        """
        if spec is None:
            return list(self.names)
        if callable(spec):
            return [n for n in self.names if spec(n)]
        if isinstance(spec, str):
            spec = [spec]
        wanted: set[str] = set()
        for item in spec:
            if not isinstance(item, str):
                raise TypeError(f"site names must be strings, got {type(item).__name__}: {item!r}")
            wanted.update(self._match(item))
        return [n for n in self.names if n in wanted]

    def _match(self, item: str) -> list[str]:
        if item in self._name_set:
            return [item]
        if item in self.aliases:
            return [self.aliases[item]]
        hits: list[str] = []
        for pattern in expand_braces(item):
            if pattern in self._name_set:
                found = [pattern]
            elif pattern in self.aliases:
                found = [self.aliases[pattern]]
            else:
                found = fnmatch.filter(self.names, pattern) if any(c in pattern for c in "*?[") else []
            if not found:  # every alternative must match: blocks.{3,99}.x on 6 layers is a typo
                raise UnknownSiteError(self._unknown_message(pattern if pattern != item else item))
            hits.extend(found)
        return hits

    def _unknown_message(self, item: str) -> str:
        candidates = self.names + tuple(self.aliases) if item.startswith("model.") else self.names
        close = difflib.get_close_matches(item, candidates, n=5, cutoff=0.5)
        if not close:  # compare the part after blocks.{i}. so a typo in a kind is still found
            kinds = sorted({_LAYER_PREFIX.sub("blocks.*.", n) for n in self.names})
            close = difflib.get_close_matches(_LAYER_PREFIX.sub("blocks.*.", item), kinds, n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return (
            f"unknown site {item!r}.{hint} Valid names look like 'embed', 'blocks.3.attn.pattern', "
            f"'blocks.*.resid_post'; see model.site_names() for all {len(self.names)}."
        )

    # ------------------------------------------------------------------ scopes
    @contextmanager
    def scope(self, hooks: Mapping[Any, Hook] | Iterable[tuple[Any, Hook]]) -> Iterator["HookRegistry"]:
        """Activate hooks for the duration of a ``with`` block.

        ``hooks`` maps a name spec (see :meth:`resolve`) to a hook, or is a list of
        ``(spec, hook)`` pairs (to put several hooks on one site; they run in list order,
        after hooks of enclosing scopes). Everything added is removed on exit, also after an
        exception, so scopes nest and restore exactly.
        """
        pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
        resolved: list[tuple[str, Hook]] = []
        for spec, fn in pairs:
            if not callable(fn):
                raise TypeError(f"hook for {spec!r} is not callable: {fn!r}")
            resolved.extend((name, fn) for name in self.resolve(spec))
        added: list[tuple[str, Hook]] = []
        try:
            for name, fn in resolved:
                self.active.setdefault(name, []).append(fn)
                added.append((name, fn))
            yield self
        finally:
            for name, fn in reversed(added):
                fns = self.active[name]
                # remove this exact registration (the last identical one: scopes nest LIFO)
                for i in range(len(fns) - 1, -1, -1):
                    if fns[i] is fn:
                        del fns[i]
                        break
                if not fns:
                    del self.active[name]

    def clear(self) -> None:
        """Remove every hook (a last resort; scopes clean up after themselves)."""
        self.active.clear()

    # ------------------------------------------------------------------ hot path
    def fire(self, name: str, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Run the hooks on ``name`` (if any) and return the possibly replaced tensor."""
        fns = self.active.get(name)
        if fns is None:
            return x
        site = Site(name, layer, self.positions, self.offset, indices=self.indices, length=self.length,
                    **self.info.get(name, {}))
        for fn in tuple(fns):
            out = fn(x, site)
            if out is None:
                continue
            if not isinstance(out, torch.Tensor):
                raise HookError(f"hook on {name!r} returned {type(out).__name__}; return a Tensor or None")
            if out.shape != x.shape or out.dtype != x.dtype:
                raise HookError(
                    f"hook on {name!r} returned shape {tuple(out.shape)} {out.dtype}, but the site has "
                    f"shape {tuple(x.shape)} {x.dtype}; return a tensor of the same shape and dtype "
                    "(use .to(x.dtype) / expand_as(x))"
                )
            if out.device != x.device:
                out = out.to(x.device)
            x = out
        return x

    def is_hooked(self, name: str) -> bool:
        """True when some hook is active on ``name``."""
        return name in self.active


def backward_hook(fn: Callable[[torch.Tensor, Site], Union[torch.Tensor, None]]) -> Hook:
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
            x.register_hook(lambda grad: fn(grad, site))
        return None

    return hook

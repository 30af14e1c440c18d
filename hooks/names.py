"""Site names: exact names, aliases, globs with braces, predicates, and helpful errors.

A model declares its site names once (in its own order) and, optionally, the convention that
names per-layer sites (``layer_format``, e.g. ``"blocks.{layer}."``). Nothing here knows any
particular model's names.

>>> names = SiteNames(["embed", "blocks.0.attn.q", "blocks.0.attn.k", "blocks.1.attn.q"],
...                   layer_format="blocks.{layer}.")
>>> names.resolve("blocks.*.attn.q"), names.split("blocks.1.attn.q")
(['blocks.0.attn.q', 'blocks.1.attn.q'], (1, 'attn.q'))
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

NameSpec = str | Sequence[str] | Callable[[str], bool] | None


class UnknownSiteError(KeyError):
    """A site name, glob, alias or predicate that matches nothing; the message lists the nearest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``blocks.{3,5}.mlp.*`` -> two patterns.

    >>> expand_braces("blocks.{3,5}.mlp.{up,gate}")
    ['blocks.3.mlp.up', 'blocks.3.mlp.gate', 'blocks.5.mlp.up', 'blocks.5.mlp.gate']
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    out: list[str] = []
    for option in match.group(1).split(","):
        out.extend(expand_braces(head + option + tail))
    return out


def is_exact(spec: NameSpec) -> bool:
    """True when ``spec`` names sites one by one (a name or alias, or a list of them), False for
    globs, braces, predicates and None (every site).

    >>> is_exact("blocks.0.mlp.out"), is_exact(["embed", "logits"]), is_exact("blocks.*.mlp.out")
    (True, True, False)
    """
    if spec is None or callable(spec):
        return False
    items = [spec] if isinstance(spec, str) else list(spec)
    return all(isinstance(i, str) and not any(c in i for c in "*?[{") for i in items)


class SiteNames:
    """The valid site names of one model, their aliases and the per-layer naming convention.

    ``aliases`` maps other spellings (e.g. Hugging Face module paths) to canonical names.
    ``layer_format`` (a string with ``{layer}``, e.g. ``"blocks.{layer}."``) says how a
    per-layer name starts; :meth:`split` and :meth:`join` use it.
    """

    def __init__(self, names: Iterable[str], aliases: Mapping[str, str] | None = None,
                 layer_format: str | None = None):
        self.names: tuple[str, ...] = tuple(names)
        self._set = frozenset(self.names)
        if len(self._set) != len(self.names):
            raise ValueError("site names must be unique")
        self.aliases: dict[str, str] = dict(aliases or {})
        unknown = [a for a, n in self.aliases.items() if n not in self._set]
        if unknown:
            raise ValueError(f"aliases point to unknown names: {unknown[:5]}")
        self.layer_format = layer_format
        if layer_format is not None and "{layer}" not in layer_format:
            raise ValueError(f"layer_format must contain '{{layer}}', got {layer_format!r}")
        self._layer_re = (re.compile("^" + re.escape(layer_format).replace(r"\{layer\}", r"(\d+)"))
                          if layer_format else None)
        self.layer_of: dict[str, int | None] = {n: self.split(n)[0] for n in self.names}

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    # ------------------------------------------------------------------ the layer convention
    def split(self, name: str) -> tuple[int | None, str]:
        """``(layer, kind)`` of a name: ``blocks.3.attn.q`` -> ``(3, "attn.q")``; ``(None, name)``
        for a name outside the layers."""
        m = self._layer_re.match(name) if self._layer_re else None
        return (int(m.group(1)), name[m.end():]) if m else (None, name)

    def join(self, layer: int, kind: str) -> str:
        """The name of ``kind`` at ``layer`` (the inverse of :meth:`split`)."""
        if self.layer_format is None:
            raise ValueError("these site names have no per-layer convention (layer_format)")
        return self.layer_format.format(layer=layer) + kind

    def every_layer(self, kind: str) -> str:
        """The glob of ``kind`` at every layer, e.g. ``blocks.*.attn.q``."""
        if self.layer_format is None:
            return kind
        return self.layer_format.format(layer="*") + kind

    # ------------------------------------------------------------------ matching
    def resolve(self, spec: NameSpec) -> list[str]:
        """Canonical names matched by ``spec``, in model order.

        ``spec`` is an exact name, an alias, a glob (``*``, ``?``, ``[..]``, ``{a,b}``; it matches
        aliases too, e.g. ``blocks.*.hook_resid_post``), a list of those, a predicate
        ``fn(name) -> bool``, or None for every name. Anything that matches nothing (a string, a
        list item, a brace alternative, or a predicate true for no name) raises
        :class:`UnknownSiteError` with the closest names.
        """
        if spec is None:
            return list(self.names)
        if callable(spec):
            hits = [n for n in self.names if spec(n)]
            if not hits:
                raise UnknownSiteError(f"the predicate {getattr(spec, '__name__', spec)!r} matches no site; "
                                       f"see model.site_names() for all {len(self.names)}")
            return hits
        items = [spec] if isinstance(spec, str) else list(spec)
        if not items:
            raise UnknownSiteError("an empty list of site names matches nothing; pass names, a glob or None (all)")
        wanted: set[str] = set()
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"site names must be strings, got {type(item).__name__}: {item!r}")
            wanted.update(self._match(item))
        return [n for n in self.names if n in wanted]

    def _match(self, item: str) -> list[str]:
        if item in self._set:
            return [item]
        if item in self.aliases:
            return [self.aliases[item]]
        hits: list[str] = []
        for pattern in expand_braces(item):
            if pattern in self._set:
                found = [pattern]
            elif pattern in self.aliases:
                found = [self.aliases[pattern]]
            else:
                found = self._glob(pattern) if any(c in pattern for c in "*?[") else []
            if not found:  # every alternative must match: blocks.{3,99}.x on 6 layers is a typo
                raise UnknownSiteError(self.unknown_message(pattern))
            hits.extend(found)
        return hits

    def _glob(self, pattern: str) -> list[str]:
        """Names matched by a glob, directly or through an alias (``blocks.*.hook_resid_post``)."""
        found = fnmatch.filter(self.names, pattern)
        return found + [self.aliases[a] for a in fnmatch.filter(self.aliases, pattern)]

    def unknown_message(self, item: str) -> str:
        """An "unknown site" message with the nearest valid names (by kind first, for globs)."""
        layer, kind = self.split(item.replace("*", "0"))
        kinds = sorted({self.split(n)[1] for n in self.names if self.split(n)[0] is not None})
        close: list[str] = []
        layers = sorted({n for n in self.layer_of.values() if n is not None})
        missing_layer = layer is not None and "*" not in item and layers and layer not in layers
        if self._layer_re is not None and (layer is not None or item.startswith(self.every_layer("")[:3])):
            near = difflib.get_close_matches(kind, kinds, n=3, cutoff=0.5)
            prefix = item[: len(item) - len(kind)] if item.endswith(kind) and not missing_layer else None
            last = (self.layer_format or "").format(layer=layers[-1]) if layers else ""
            close = [prefix + k if prefix is not None else last + k for k in near]
        if not close:
            pool = self.names + tuple(self.aliases) if "model." in item else self.names
            close = difflib.get_close_matches(item, pool, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        if missing_layer:
            hint = f" The model has layers {layers[0]}..{layers[-1]}." + hint
        example = self.every_layer(kinds[0]) if kinds else self.names[0]
        return (f"unknown site {item!r}.{hint} Valid names look like {self.names[0]!r} or {example!r}; "
                f"see model.site_names() for all {len(self.names)}.")


__all__ = ["NameSpec", "SiteNames", "UnknownSiteError", "expand_braces", "is_exact"]

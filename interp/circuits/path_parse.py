"""Senders and receivers of :func:`~interp.circuits.path_patching.path_patch`: parsing and checks.

Order along the residual stream: layer ``L``'s attention reads it at ``2L`` and writes at ``2L``
(after reading), its MLP reads and writes at ``2L + 1``, the final residual is read at ``2 n_layers``.
A sender reaches a receiver when it writes before the receiver reads.

>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=3, d_model=8, d_mlp=8, n_heads=2, n_kv_heads=1,
...     d_head=4, vocab_size=9))
>>> [r.label for r in parse_receivers(m, [("blocks.2.attn.k", 0), "blocks.1.mlp", "logits"])]
['blocks.2.attn.k kv head 0', 'blocks.1.mlp (input)', 'logits (final residual)']
>>> [s.label for s in parse_senders(m, "heads", 4)[0]]
['blocks.0.attn.z head 0', 'blocks.0.attn.z head 1', 'blocks.1.attn.z head 0', 'blocks.1.attn.z head 1']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..hooks import UnknownSiteError
from ..hooks.checks import is_int
from ..model import Gemma3
from ..model.sites import LAYER_FORMAT, block_site, kind_of
from ..tokens import Top

RECEIVER_FORMS = ('"logits" / "resid_final" (the final residual), ("blocks.L.attn.q", head), '
                  '("blocks.L.attn.k", kv_head), ("blocks.L.attn.v", kv_head), "blocks.L.attn.q" (every head), '
                  '"blocks.L.mlp" (the MLP input)')
SENDER_FORMS = '"heads", or a list of (layer, head) pairs, "blocks.L.attn.out" and "blocks.L.mlp.out"'


@dataclass(frozen=True)
class Sender:
    """One sender: a head (``kind`` "head"), a layer's attention output ("attn") or MLP output ("mlp")."""

    kind: str
    layer: int
    head: int | None
    label: str

    @property
    def order(self) -> int:
        """Where it writes into the residual stream (module docs)."""
        return 2 * self.layer + (self.kind == "mlp")


@dataclass(frozen=True)
class Receiver:
    """One receiver: a query/key/value input ("q", "k", "v"; ``heads`` None = all), an MLP input
    ("mlp") or the final residual ("final", ``layer`` None)."""

    kind: str
    layer: int | None
    heads: tuple[int, ...] | None
    label: str
    order: int


def _receiver(model: Gemma3, spec: Any) -> Receiver:
    cfg = model.cfg
    if isinstance(spec, str) and spec in ("logits", "resid_final"):
        return Receiver("final", None, None, "logits (final residual)", 2 * cfg.n_layers)
    head: Any = None
    name = spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        name, head = spec
    if not isinstance(name, str):
        raise TypeError(f"a receiver is one of {RECEIVER_FORMS}; got {spec!r}")
    match = re.fullmatch(r"blocks\.(\d+)\.mlp(?:\.in(?:put)?)?", name)
    if match:
        layer, kind = int(match.group(1)), "mlp"
        if layer >= cfg.n_layers:
            raise UnknownSiteError(f"unknown receiver {name!r}: the model has layers 0..{cfg.n_layers - 1}")
    else:
        resolved = model.registry.resolve(name)  # UnknownSiteError, with the nearest names, if nothing
        site = kind_of(resolved[0]).kind if len(resolved) == 1 else None
        kinds = {"attn.q": "q", "attn.k": "k", "attn.v": "v", "pre_mlp_norm": "mlp"}
        if site not in kinds:
            raise ValueError(f"{name!r} is not a receiver; receivers are {RECEIVER_FORMS}. (A head's output is a "
                             "sender: pass it in senders=)")
        kind, layer = kinds[site], int(resolved[0].split(".")[1])
    if kind == "mlp":
        if head is not None:
            raise ValueError(f"an MLP receiver takes no head: use 'blocks.{layer}.mlp', not {spec!r}")
        return Receiver("mlp", layer, None, f"{LAYER_FORMAT.format(layer=layer)}mlp (input)", 2 * layer + 1)
    site_name = block_site(layer, f"attn.{kind}")
    if head is None:
        return Receiver(kind, layer, None, f"{site_name} (all heads)", 2 * layer)
    count = cfg.n_heads if kind == "q" else cfg.n_kv_heads
    if not is_int(head) or not 0 <= head < count:
        if kind == "q":
            raise IndexError(f"{site_name}: head {head!r} is outside the layer's {count} query heads")
        raise IndexError(f"{site_name}: head {head!r} is outside the layer's {count} key/value heads; keys and "
                         f"values are indexed by key/value head (grouped-query attention: query head h reads "
                         f"key/value head h // {cfg.group_size})")
    tag = "head" if kind == "q" else "kv head"
    return Receiver(kind, layer, (head,), f"{site_name} {tag} {head}", 2 * layer)


def parse_receivers(model: Gemma3, receivers: Sequence[Any]) -> list[Receiver]:
    """The receivers, checked (a single receiver may be given bare: ``"logits"``)."""
    if isinstance(receivers, str) or (isinstance(receivers, tuple) and len(receivers) == 2
                                      and isinstance(receivers[0], str) and isinstance(receivers[1], int)):
        receivers = [receivers]
    out = [_receiver(model, r) for r in receivers]
    if not out:
        raise ValueError(f"no receivers; give a list of {RECEIVER_FORMS}")
    return list(dict.fromkeys(out))


def _sender(model: Gemma3, item: Any) -> Sender:
    cfg = model.cfg
    pair = item.index if isinstance(item, Top) else item
    if isinstance(pair, str):
        resolved = model.registry.resolve(pair)  # UnknownSiteError with the nearest names
        kind = kind_of(resolved[0]).kind if len(resolved) == 1 else None
        if kind not in ("attn.out", "mlp.out"):
            raise ValueError(f"{pair!r} is not a sender; senders are {SENDER_FORMS}")
        layer = int(resolved[0].split(".")[1])
        return Sender("attn" if kind == "attn.out" else "mlp", layer, None, resolved[0])
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
        raise TypeError(f"a sender is one of {SENDER_FORMS}; got {item!r}")
    layer, head = int(pair[0]), int(pair[1])
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
        raise IndexError(f"head ({layer}, {head}) is outside {cfg.n_layers} layers x {cfg.n_heads} heads")
    return Sender("head", layer, head, f"{block_site(layer, 'attn.z')} head {head}")


def parse_senders(model: Gemma3, senders: Any, first_read: int) -> tuple[list[Sender], bool]:
    """``(senders, grid)``: ``grid`` when ``senders == "heads"`` (every head writing before
    ``first_read``, layer by layer)."""
    cfg = model.cfg
    if isinstance(senders, str) and senders == "heads":
        layers = [layer for layer in range(cfg.n_layers) if 2 * layer < first_read]
        if not layers:
            raise ValueError("senders='heads' takes the heads of the layers before the earliest receiver, and "
                             "there are none (a receiver reads layer 0's input); choose later receivers")
        return [_sender(model, (layer, h)) for layer in layers for h in range(cfg.n_heads)], True
    if isinstance(senders, (str, Top)) or (isinstance(senders, tuple) and len(senders) == 2
                                           and all(isinstance(v, int) for v in senders)):
        senders = [senders]
    out = [_sender(model, s) for s in senders]
    if not out:
        raise ValueError(f"no senders; give {SENDER_FORMS}")
    return out, False


def check_order(senders: Sequence[Sender], receivers: Sequence[Receiver]) -> None:
    """Every sender must write before every receiver reads (else it cannot reach it)."""
    for s in senders:
        for r in receivers:
            if s.order >= r.order:
                raise ValueError(f"sender {s.label} comes after receiver {r.label}: it cannot reach it (a receiver "
                                 "reads the residual stream before its layer's attention, an MLP after it). Use "
                                 "earlier senders or later receivers")


__all__ = ["Sender", "Receiver", "parse_senders", "parse_receivers", "check_order", "RECEIVER_FORMS",
           "SENDER_FORMS"]

"""Every site of the Gemma 3 model, written once: name, shape, axes, aliases, description.

Everything else is derived from :data:`SITES`: the registry's names and per-site facts, the
Hugging Face and TransformerLens aliases, shape and memory estimates, which sites force the
explicit attention path, ``python -m interp info``, and the README's tables (a test checks the
site table matches).

Shape symbols: ``b`` batch, ``s`` sequence (queries), ``k`` keys, ``d`` d_model, ``h`` query
heads, ``kv`` key/value heads, ``hd`` d_head, ``f`` d_mlp, ``v`` vocabulary.

>>> from interp.model.config import Gemma3Config
>>> cfg = Gemma3Config(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=1, d_head=4, vocab_size=9)
>>> site_names(cfg)[:3], site_shape(cfg, "blocks.0.attn.k", batch=1, seq=5)
(['embed', 'blocks.0.resid_pre', 'blocks.0.input_norm'], (1, 5, 1, 4))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..hooks.checks import is_int

if TYPE_CHECKING:
    from .config import Gemma3Config

LAYER_FORMAT = "blocks.{layer}."
HF_LAYER = "model.layers.{layer}"


@dataclass(frozen=True)
class SiteKind:
    """The facts of one kind of site (per layer, or once per model)."""

    kind: str
    per_layer: bool
    shape: tuple[str, ...]
    doc: str
    seq_axis: int = 1
    head_axis: int | None = None
    kv_grouped: bool = False  # the head axis holds kv heads: query head h reads kv head h // group
    explicit: bool = False  # hooking it makes the layer run the explicit (not fused) attention path
    heavy: bool = False  # large per token (quadratic or vocabulary-wide): first to leave a cache
    hf: tuple[str, ...] = ()  # Hugging Face module paths meaning this tensor ({p} = model.layers.{i})
    tl: str | None = None  # TransformerLens 4's hook name for this tensor (after blocks.{i}. for per-layer sites)

    def name(self, layer: int | None = None) -> str:
        """The site's name at ``layer`` (``blocks.{i}.`` + kind for per-layer sites)."""
        if not self.per_layer:
            return self.kind
        return LAYER_FORMAT.format(layer="{i}" if layer is None else layer) + self.kind

    @property
    def shape_text(self) -> str:
        """The shape as written in the docs, e.g. ``[b, s, h, hd]``."""
        return "[" + ", ".join(self.shape) + "]"


def _block(kind: str, shape: str, doc: str, **kw: object) -> SiteKind:
    return SiteKind(kind, True, tuple(shape.split()), doc, **kw)  # type: ignore[arg-type]


_HEADS = {"head_axis": 2}
_KV = {"head_axis": 2, "kv_grouped": True}

SITES: tuple[SiteKind, ...] = (
    SiteKind("embed", False, ("b", "s", "d"), "token embeddings after the sqrt(d) scale", hf=("model.embed_tokens",),
             tl="hook_embed"),
    _block("resid_pre", "b s d", "residual stream entering layer i", hf=("{p}.input",), tl="hook_resid_pre"),
    _block("input_norm", "b s d", "norm 1 output, the attention input", hf=("{p}.input_layernorm",)),
    _block("attn.q", "b s h hd", "query projection, before q_norm", hf=("{p}.self_attn.q_proj",), tl="attn.hook_q",
           **_HEADS),
    _block("attn.k", "b s kv hd", "key projection, before k_norm", hf=("{p}.self_attn.k_proj",), tl="attn.hook_k",
           **_KV),
    _block("attn.v", "b s kv hd", "value projection (values are not normed)", hf=("{p}.self_attn.v_proj",),
           tl="attn.hook_v", **_KV),
    _block("attn.q_normed", "b s h hd", "queries after q_norm", hf=("{p}.self_attn.q_norm",), **_HEADS),
    _block("attn.k_normed", "b s kv hd", "keys after k_norm", hf=("{p}.self_attn.k_norm",), **_KV),
    _block("attn.q_rot", "b s h hd", "queries after RoPE", tl="attn.hook_rot_q", **_HEADS),
    _block("attn.k_rot", "b s kv hd", "keys after RoPE (what a KV cache holds)", tl="attn.hook_rot_k", **_KV),
    _block("attn.scores", "b h s k", "scaled and masked, before softmax", seq_axis=2, head_axis=1, explicit=True,
           heavy=True),
    _block("attn.pattern", "b h s k", "after softmax", seq_axis=2, head_axis=1, explicit=True, heavy=True,
           tl="attn.hook_pattern"),
    _block("attn.z", "b s h hd", "weighted values, the o_proj input", hf=("{p}.self_attn.o_proj.input",),
           tl="attn.hook_z", **_HEADS),
    _block("attn.head_out", "b s h d", "each head's share of the o_proj output", explicit=True, heavy=True,
           **_HEADS),
    _block("attn.out", "b s d", "o_proj output", hf=("{p}.self_attn.o_proj", "{p}.self_attn"),
           tl="attn.hook_out"),
    _block("post_attn_norm", "b s d", "norm 2 output, which is added to the residual",
           hf=("{p}.post_attention_layernorm",), tl="hook_attn_out"),
    _block("resid_mid", "b s d", "residual after attention", tl="hook_resid_mid"),
    _block("pre_mlp_norm", "b s d", "norm 3 output, the MLP input", hf=("{p}.pre_feedforward_layernorm",)),
    _block("mlp.gate", "b s f", "gate projection, before the activation", hf=("{p}.mlp.gate_proj",),
           tl="mlp.hook_pre"),
    _block("mlp.act", "b s f", "gelu_tanh(gate)", hf=("{p}.mlp.act_fn",)),
    _block("mlp.up", "b s f", "up projection", hf=("{p}.mlp.up_proj",), tl="mlp.hook_pre_linear"),
    _block("mlp.hidden", "b s f", 'act * up, the down_proj input (the "neurons")', hf=("{p}.mlp.down_proj.input",),
           tl="mlp.hook_post"),
    _block("mlp.out", "b s d", "down_proj output", hf=("{p}.mlp.down_proj", "{p}.mlp"), tl="mlp.hook_out"),
    _block("post_mlp_norm", "b s d", "norm 4 output, which is added to the residual",
           hf=("{p}.post_feedforward_layernorm",), tl="hook_mlp_out"),
    _block("resid_post", "b s d", "residual leaving layer i", hf=("{p}",), tl="hook_resid_post"),
    SiteKind("final_norm", False, ("b", "s", "d"), "final RMSNorm output", hf=("model.norm",)),
    SiteKind("logits", False, ("b", "s", "v"), "tied unembedding", heavy=True, hf=("lm_head",)),
)

# TransformerLens 4 names (Gemma 3, TransformerBridge; {i} = layer) that are NOT aliases, and why. Checked
# on the demo model by tests/model/test_tl_aliases.py; an alias must hold exactly TL's values.
TL_LEFT_OUT: dict[str, str] = {
    "blocks.{i}.ln1.hook_out": "input_norm: TransformerLens folds the norm weight into W_Q/W_K/W_V when it "
                               "processes weights (enable_compatibility_mode), so its value depends on that",
    "blocks.{i}.ln2.hook_out": "pre_mlp_norm: the norm weight is folded into the MLP's input weights when "
                               "TransformerLens processes weights, so its value depends on that",
    "ln_final.hook_out": "final_norm: the norm weight is folded into W_U when TransformerLens processes weights",
    "ln_final.hook_normalized": "x / rms(x) before the norm's weight: not a site of this model",
    "hook_unembed": "logits: TransformerLens centres W_U (center_unembed) when it processes weights",
    "blocks.{i}.attn.hook_q_normed": "attn.q_normed in TransformerLens's layout [b, h, s, hd] (a transpose of "
                                     "ours, [b, s, h, hd]), not the same tensor",
    "blocks.{i}.attn.hook_k_normed": "attn.k_normed in TransformerLens's layout [b, kv, s, hd], a transpose of ours",
    "blocks.{i}.attn.hook_attn_scores": "attn.scores except at masked keys: TransformerLens fills them with the "
                                        "dtype's lowest finite value, this model with -inf",
}

BY_KIND: dict[str, SiteKind] = {s.kind: s for s in SITES}
BLOCK_KINDS: tuple[str, ...] = tuple(s.kind for s in SITES if s.per_layer)
EXPLICIT_KINDS: tuple[str, ...] = tuple(s.kind for s in SITES if s.explicit)
HEAVY_KINDS: tuple[str, ...] = tuple(s.kind for s in SITES if s.heavy)


def kind_of(name: str) -> SiteKind:
    """The :class:`SiteKind` of a site name (``blocks.3.attn.q`` -> the ``attn.q`` entry)."""
    kind = name.split(".", 2)[2] if name.startswith("blocks.") else name
    return BY_KIND[kind]


def block_site(layer: int | str, kind: str) -> str:
    """The name of the per-layer site ``kind`` at ``layer`` (``"*"``: the glob of every layer). The
    one way code outside this table builds a layer's site name; an unknown kind is an error here.

    >>> block_site(3, "attn.z"), block_site("*", "resid_post")
    ('blocks.3.attn.z', 'blocks.*.resid_post')
    """
    site = BY_KIND.get(kind)
    if site is None or not site.per_layer:
        raise KeyError(f"{kind!r} is not a per-layer site kind; the kinds are {', '.join(BLOCK_KINDS)}")
    return LAYER_FORMAT.format(layer=layer) + kind


def split_site(name: str) -> tuple[int | None, str]:
    """``(layer, kind)`` of a site name (``(None, name)`` outside the layers): the inverse of :func:`block_site`.

    >>> split_site("blocks.12.mlp.out"), split_site("logits")
    ((12, 'mlp.out'), (None, 'logits'))
    """
    prefix = LAYER_FORMAT.split("{", 1)[0]
    if name.startswith(prefix):
        layer, _, kind = name[len(prefix):].partition(".")
        if layer.isdigit():
            return int(layer), kind
    return None, name


def _tl_short_names() -> dict[str, str]:
    """TransformerLens's short activation names (``get_act_name``'s ``name``) -> our kind, derived from
    the table's TransformerLens names (``blocks.{i}.attn.hook_pattern`` -> ``pattern``); a short name
    two sites would share (``out``) is left out, as TransformerLens has no short name for either."""
    short: dict[str, list[str]] = {}
    for s in SITES:
        if s.per_layer and s.tl is not None:
            short.setdefault(s.tl.rsplit("hook_", 1)[1], []).append(s.kind)
    out = {name: kinds[0] for name, kinds in short.items() if len(kinds) == 1}
    # get_act_name's own aliases, where they name a short name above
    more = {"attn": "pattern", "key": "k", "query": "q", "value": "v", "mlp_pre": "pre", "mlp_post": "post"}
    out.update({alias: out[name] for alias, name in more.items() if name in out})
    return out


TL_SHORT: dict[str, str] = _tl_short_names()


def layer_site(kind: str, layer: int) -> str:
    """The site a ``(kind, layer)`` key names, as ``cache["resid_post", 3]`` takes it: ``kind`` is one
    of our per-layer kinds (``resid_post``, ``attn.pattern``) or TransformerLens's short name of the
    same tensor (``pattern``, ``z``, ``attn_out``, ``post``; what ``utils.get_act_name`` takes). An
    unknown kind or a layer that is not a non-negative int is a ``KeyError`` naming the choices.

    >>> layer_site("resid_post", 3), layer_site("pattern", 0), layer_site("attn_out", 2)
    ('blocks.3.resid_post', 'blocks.0.attn.pattern', 'blocks.2.post_attn_norm')
    """
    if not is_int(layer) or layer < 0:
        raise KeyError(f"({kind!r}, {layer!r}): the layer must be an int >= 0 (layers count from 0; "
                       "cache.layers(kind)[-1] is the last one cached)")
    if not isinstance(kind, str):
        raise KeyError(f"({kind!r}, {layer!r}): the kind must be a string such as 'resid_post'")
    site = BY_KIND.get(kind)
    if site is not None and site.per_layer:
        return block_site(layer, kind)
    if kind in TL_SHORT:
        return block_site(layer, TL_SHORT[kind])
    import difflib

    key = f"({kind!r}, {layer})"
    if kind in BY_KIND:
        raise KeyError(f"{key}: {kind!r} is not per layer; index it alone: cache[{kind!r}]")
    choices = list(dict.fromkeys(list(BLOCK_KINDS) + list(TL_SHORT)))
    near = difflib.get_close_matches(kind, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
    left_out = any(n.endswith("hook_" + kind) for n in TL_LEFT_OUT)
    what = ("is a TransformerLens name this model does not alias (TL_LEFT_OUT says why)" if left_out
            else "is not a per-layer kind")
    raise KeyError(f"{key}: {kind!r} {what}.{hint} The kinds are {', '.join(BLOCK_KINDS)}; TransformerLens's "
                   f"short names {', '.join(TL_SHORT)} work too")


def site_names(cfg: Gemma3Config) -> list[str]:
    """Every site name of a model with this configuration, in the order they fire.

    >>> from interp.model.config import Gemma3Config
    >>> site_names(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8, vocab_size=9))[-2:]
    ['final_norm', 'logits']
    """
    head = [s.kind for s in SITES if not s.per_layer and s.kind == "embed"]
    tail = [s.kind for s in SITES if not s.per_layer and s.kind != "embed"]
    return head + [s.name(i) for i in range(cfg.n_layers) for s in SITES if s.per_layer] + tail


def hf_aliases(cfg: Gemma3Config) -> dict[str, str]:
    """Hugging Face module paths (as Gemma Scope 2 names them) that mean one of our sites.

    A module's *output* unless the path ends in ``.input`` (that module's input): e.g.
    ``model.layers.7.self_attn.o_proj.input`` is ``blocks.7.attn.z``. An alias names the same
    values in this toolkit's layout: ``attn.z`` is ``[b, s, h, hd]`` where Hugging Face's o_proj
    input is ``[b, s, h * hd]``.

    >>> from interp.model.config import Gemma3Config
    >>> hf_aliases(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8,
    ...     vocab_size=9))["model.layers.0.post_feedforward_layernorm"]
    'blocks.0.post_mlp_norm'
    """
    out: dict[str, str] = {}
    for s in SITES:
        layers = range(cfg.n_layers) if s.per_layer else [None]
        for i in layers:
            p = HF_LAYER.format(layer=i)
            for alias in s.hf:
                out[alias.format(p=p)] = s.name(i)
    return out


def tl_aliases(cfg: Gemma3Config) -> dict[str, str]:
    """TransformerLens 4 hook names that mean one of our sites (``blocks.7.hook_resid_post`` ->
    ``blocks.7.resid_post``), for Gemma 3 as TransformerLens caches it.

    Each alias holds exactly what TransformerLens caches under that name, in the same layout
    (``attn.hook_z`` ``[b, s, h, hd]``, ``attn.hook_pattern`` ``[b, h, s, k]``); names whose
    value depends on TransformerLens's weight processing or layout are left out
    (:data:`TL_LEFT_OUT` says why).

    >>> from interp.model.config import Gemma3Config
    >>> tl = tl_aliases(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8, vocab_size=9))
    >>> tl["blocks.0.hook_mlp_out"], tl["hook_embed"]
    ('blocks.0.post_mlp_norm', 'embed')
    """
    out: dict[str, str] = {}
    for s in SITES:
        if s.tl is not None:
            for i in range(cfg.n_layers) if s.per_layer else [None]:
                out[_tl_full(s, i)] = s.name(i)
    return out


def tl_name(name: str) -> str | None:
    """The TransformerLens hook name of our site ``name`` (what SAELens writes as ``hook_name``),
    or None for a site TransformerLens has no exactly equal name for (see :data:`TL_LEFT_OUT`).
    A name that is not a site (a glob, an alias, a typo) is a KeyError.

    >>> tl_name("blocks.3.resid_post"), tl_name("blocks.3.attn.z"), tl_name("blocks.3.input_norm")
    ('blocks.3.hook_resid_post', 'blocks.3.attn.hook_z', None)
    """
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    layer, kind = (int(m.group(1)), m.group(2)) if m else (None, name)
    site = BY_KIND.get(kind)
    if site is None or site.per_layer != (layer is not None):
        raise KeyError(f"{name!r} is not a site name (e.g. 'blocks.3.resid_post'); tl_name takes one site, "
                       "not a glob or an alias")
    return None if site.tl is None else _tl_full(site, layer)


def _tl_full(s: SiteKind, layer: int | str | None) -> str:
    assert s.tl is not None
    return LAYER_FORMAT.format(layer=layer) + s.tl if s.per_layer else s.tl


def aliases(cfg: Gemma3Config) -> dict[str, str]:
    """Every alias of this model's sites: :func:`hf_aliases` and :func:`tl_aliases` together."""
    return {**hf_aliases(cfg), **tl_aliases(cfg)}


def aliases_of(name: str) -> list[str]:
    """The Hugging Face and TransformerLens aliases of one site name (no configuration needed).

    >>> aliases_of("blocks.2.mlp.out")
    ['model.layers.2.mlp.down_proj', 'model.layers.2.mlp', 'blocks.2.mlp.hook_out']
    """
    tl = tl_name(name)
    s = kind_of(name)
    p = HF_LAYER.format(layer=name.split(".")[1]) if s.per_layer else ""
    return [alias.format(p=p) for alias in s.hf] + ([tl] if tl is not None else [])


def site_info(cfg: Gemma3Config) -> dict[str, dict[str, int]]:
    """Per-site :class:`~interp.hooks.Site` fields: ``seq_axis``, ``head_axis``, ``kv_group``."""
    out: dict[str, dict[str, int]] = {}
    for s in SITES:
        info: dict[str, int] = {"seq_axis": s.seq_axis}
        if s.head_axis is not None:
            info["head_axis"] = s.head_axis
            info["kv_group"] = cfg.group_size if s.kv_grouped else 1
        for i in range(cfg.n_layers) if s.per_layer else [None]:
            out[s.name(i)] = info
    return out


def site_shape(cfg: Gemma3Config, name: str, batch: int, seq: int, keys: int | None = None) -> tuple[int, ...]:
    """The shape site ``name`` has for ``batch`` x ``seq`` tokens (``keys`` attended keys, default ``seq``)."""
    sizes = {"b": batch, "s": seq, "k": seq if keys is None else keys, "d": cfg.d_model, "h": cfg.n_heads,
             "kv": cfg.n_kv_heads, "hd": cfg.d_head, "f": cfg.d_mlp, "v": cfg.vocab_size}
    return tuple(sizes[sym] for sym in kind_of(name).shape)


def markdown_table() -> str:
    """The README's table of sites (a test checks the README holds exactly this).

    >>> markdown_table().splitlines()[2]
    '| `embed` | `[b, s, d]` | token embeddings after the sqrt(d) scale |'
    """
    rows = ["| site | shape | what it is |", "|---|---|---|"]
    rows += [f"| `{s.name()}` | `{s.shape_text}` | {s.doc} |" for s in SITES]
    return "\n".join(rows)


def tl_markdown_table() -> str:
    """The README's table of TransformerLens names: each alias with its site, then the names left out and why.

    >>> tl_markdown_table().splitlines()[2]
    '| `hook_embed` | `embed` |'
    """
    rows = ["| TransformerLens name | site |", "|---|---|"]
    rows += [f"| `{_tl_full(s, '{i}')}` | `{s.name()}` |" for s in SITES if s.tl is not None]
    rows += ["", "| left out | why |", "|---|---|"] + [f"| `{n}` | {why} |" for n, why in TL_LEFT_OUT.items()]
    return "\n".join(rows)


__all__ = ["SiteKind", "SITES", "BY_KIND", "BLOCK_KINDS", "EXPLICIT_KINDS", "HEAVY_KINDS", "LAYER_FORMAT",
           "kind_of", "block_site", "split_site", "layer_site", "TL_SHORT",
           "site_names", "hf_aliases", "tl_aliases", "tl_name", "aliases",
           "aliases_of", "TL_LEFT_OUT", "site_info", "site_shape", "markdown_table", "tl_markdown_table"]

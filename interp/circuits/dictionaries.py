"""The transcoders of an attribution graph behind one interface: per-layer transcoders (layer
``L``'s features read ``L``'s MLP input and write ``L``'s MLP output) and a cross-layer
transcoder (layer ``L``'s features read ``L``'s MLP input and write every MLP output from ``L`` on).

Everything the graph needs is asked per layer: a feature's encoder column and bias (its
pre-activation is the target of a row), its decoder vectors to the output layers it writes (the
columns of its edges), each output layer's decoder bias and skip term (frozen linear parts).

>>> import torch
>>> from interp.model import Gemma3, Gemma3Config
>>> from interp.features import CrossLayerTranscoder
>>> m = Gemma3.from_config(Gemma3Config(n_layers=3, d_model=8, d_mlp=16, n_heads=1, n_kv_heads=1, d_head=8,
...                                     vocab_size=20))
>>> d = GraphDictionaries(m, CrossLayerTranscoder.random(3, 8, 16))
>>> d.layers, d.writes(1), tuple(d.decoder_rows(1, torch.tensor([0, 5])).shape)
([0, 1, 2], [1, 2], (2, 2, 8))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..features.clt import CrossLayerTranscoder
from ..features.dictionary import Dictionary
from ..features.io import check_fits
from ..model import Gemma3
from ..model.sites import block_site, split_site

IN_KINDS = ("pre_mlp_norm", "resid_mid")
OUT_KINDS = ("post_mlp_norm", "mlp.out")
Transcoders = Sequence[Dictionary] | Mapping[int, Dictionary] | CrossLayerTranscoder


def resolve_transcoders(model: Gemma3, transcoders: Sequence[Dictionary] | Mapping[int, Dictionary]
                        ) -> dict[int, Dictionary]:
    """``{layer: transcoder}``, each checked: it reads an MLP's input (``pre_mlp_norm`` or
    ``resid_mid``) and writes that MLP's output (``post_mlp_norm`` or ``mlp.out``) of one layer,
    with matching widths and SAELens's plain settings; at most one per layer.

    >>> from interp.model import Gemma3Config
    >>> from interp.features import Transcoder
    >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=8, d_mlp=16, n_heads=1, n_kv_heads=1,
    ...                                     d_head=8, vocab_size=20))
    >>> sorted(resolve_transcoders(m, [Transcoder.random(m, layer=1, d_sae=16)]))
    [1]
    """
    items = list(transcoders.values()) if isinstance(transcoders, Mapping) else list(transcoders)
    if not items:
        raise ValueError("attribution graphs need at least one transcoder (e.g. Transcoder.random(model, layer=0, "
                         "d_sae=...) or interp.features.load_dictionary(...)) or a CrossLayerTranscoder")
    out: dict[int, Dictionary] = {}
    for tc in items:
        if isinstance(tc, CrossLayerTranscoder):
            raise TypeError("give a CrossLayerTranscoder on its own (attribution_graph(model, prompt, clt)), not in "
                            "a list: it covers every layer")
        if not isinstance(tc, Dictionary):
            raise TypeError(f"transcoders must be interp.features dictionaries, got {type(tc).__name__}")
        if tc.site_out is None:
            raise ValueError(f"{tc!r} is an SAE (it writes where it reads); an attribution graph needs transcoders, "
                             "which read an MLP's input and predict its output")
        if not tc.settings.plain:
            raise ValueError(f"{tc!r} has SAELens settings ({tc.settings.describe()}) that make its encoder or "
                             "decoder more than a matrix and a bias; an attribution graph needs the plain linear "
                             "maps (load it with its settings folded into the weights, or retrain)")
        check_fits(tc, model)
        layer_in, kind_in = layer_kind(model, tc.site)
        layer_out, kind_out = layer_kind(model, tc.site_out)
        if kind_in not in IN_KINDS or kind_out not in OUT_KINDS or layer_in != layer_out:
            raise ValueError(f"{tc!r}: a transcoder in a graph reads blocks.L.pre_mlp_norm (or resid_mid) and writes "
                             "blocks.L.post_mlp_norm (or mlp.out) of the same layer L")
        assert layer_in is not None
        if layer_in in out:
            raise ValueError(f"two transcoders for layer {layer_in}; give one per layer")
        out[layer_in] = tc
    return dict(sorted(out.items()))


def layer_kind(model: Gemma3, name: str | None) -> tuple[int | None, str]:
    """``(layer, kind)`` of a resolved site name (``(None, name)`` outside the blocks)."""
    layer = model.registry.names.layer_of.get(name or "")
    if layer is None:
        return None, name or ""
    return layer, split_site(name or "")[1]


class GraphDictionaries:
    """Per-layer transcoders (a list or ``{layer: transcoder}``) or one :class:`CrossLayerTranscoder`,
    checked against ``model``, behind the per-layer questions a graph asks (see the module docstring).
    Weights come back as float32 on the model's device."""

    def __init__(self, model: Gemma3, transcoders: Transcoders):
        self.n_layers = model.cfg.n_layers
        self.device = model.device
        self.clt: CrossLayerTranscoder | None = None
        self.per_layer: dict[int, Dictionary] = {}
        if isinstance(transcoders, CrossLayerTranscoder):
            check_fits(transcoders, model)
            self.clt = transcoders
            self.layers = list(range(self.n_layers))
            self.names = [f"{a}->{b}" for a, b in zip(transcoders.sites_in, transcoders.sites_out)]
            self._in = list(transcoders.sites_in)
            self._out = list(transcoders.sites_out)
        else:
            self.per_layer = resolve_transcoders(model, transcoders)
            self.layers = list(self.per_layer)
            self.names = [f"{tc.site}->{tc.site_out}" for tc in self.per_layer.values()]
            self._in = [tc.site or "" for tc in self.per_layer.values()]
            self._out = [tc.site_out or "" for tc in self.per_layer.values()]
        self.kinds_in = {layer: layer_kind(model, self.site_in(layer))[1] for layer in self.layers}

    @property
    def is_clt(self) -> bool:
        return self.clt is not None

    def widths(self) -> dict[int, int]:
        """Features per layer."""
        if self.clt is not None:
            return dict(enumerate(self.clt.widths))
        return {layer: tc.d_sae for layer, tc in self.per_layer.items()}

    def site_in(self, layer: int) -> str:
        """The site layer ``layer``'s features read."""
        return self._in[self.layers.index(layer)]

    def site_out(self, layer: int) -> str:
        """Where layer ``layer``'s MLP output is replaced (also for a layer without features:
        ``post_mlp_norm``, whose whole output is then an error)."""
        if layer in self.layers:
            return self._out[self.layers.index(layer)]
        return block_site(layer, "post_mlp_norm")

    def writes(self, layer: int) -> list[int]:
        """The output layers layer ``layer``'s features write to."""
        return list(range(layer, self.n_layers)) if self.clt is not None else [layer]

    def _f32(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------------ encoders
    def encode(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pre-activations, activations)`` float32 ``[..., w]`` of layer ``layer`` for its input ``x``."""
        if self.clt is not None:  # the CLT's own rule (JumpReLU, or TopK per layer)
            w, b, _ = self.clt.encoder(layer)
            return (x.to(w.dtype) @ w + b).float(), self.clt.encode(layer, x).float()
        tc = self.per_layer[layer]
        pre = tc.pre_acts(x)
        return pre.float(), tc.activation(pre).float()

    def encoder_columns(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """``[len(features), d_in]``: the encoder vectors of these features of layer ``layer``."""
        w = self.clt.encoder(layer)[0] if self.clt is not None else self.per_layer[layer].W_enc
        return self._f32(w[:, features.to(w.device)].T)

    def encoder_bias(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """``[len(features)]``: their encoder biases."""
        b = self.clt.encoder(layer)[1] if self.clt is not None else self.per_layer[layer].b_enc
        return self._f32(b[features.to(b.device)])

    # ------------------------------------------------------------------ decoders
    def decoder_rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """``[len(features), len(writes(layer)), d_out]``: their decoder vectors to each output layer."""
        if self.clt is not None:
            return self._f32(self.clt.decoder_rows(layer, features.cpu()))
        w = self.per_layer[layer].W_dec
        return self._f32(w[features.to(w.device)])[:, None]

    def decoder_bias(self, out_layer: int) -> torch.Tensor | None:
        """``b_dec`` of output layer ``out_layer`` (None where no transcoder writes it)."""
        if self.clt is not None:
            return self._f32(self.clt.bias(out_layer))
        tc = self.per_layer.get(out_layer)
        return None if tc is None else self._f32(tc.b_dec)

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The affine skip term of output layer ``layer`` for its input ``x`` (differentiable; None without)."""
        if self.clt is not None:
            return self.clt.skip(layer, x)
        tc = self.per_layer.get(layer)
        return None if tc is None else tc.skip(x)

    def reconstruction(self, acts: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{out_layer: [seq, d]}`` float32: what the features ``acts`` (``{layer: [seq, w]}``) and the
        decoder biases write to each MLP output with a transcoder (no skip term), reading only the
        decoder rows of features active somewhere (a lazy CLT reads no more)."""
        out: dict[int, torch.Tensor] = {}
        for o in range(self.n_layers):
            b = self.decoder_bias(o)
            if b is not None:
                seq = next(iter(acts.values())).shape[0]
                out[o] = b[None].expand(seq, -1).clone()
        for layer, a in acts.items():
            active = (a != 0).any(0).nonzero()[:, 0]
            if not len(active):
                continue
            rows = self.decoder_rows(layer, active)  # [u, n_out, d]
            for j, o in enumerate(self.writes(layer)):
                out[o] = out[o] + a[:, active].float() @ rows[:, j]
        return out


__all__ = ["GraphDictionaries", "resolve_transcoders", "layer_kind", "IN_KINDS", "OUT_KINDS", "Transcoders"]

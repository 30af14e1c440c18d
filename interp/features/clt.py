"""A cross-layer transcoder (CLT): layer ``i``'s features read that layer's MLP input and write
every MLP output from layer ``i`` on (Gemma Scope 2's ``clt/`` folders; Anthropic's "Circuit
Tracing" CLT).

For ``n_layers`` layers, with ``w_i`` features at layer ``i``:

- ``f_i = relu(x_i @ W_enc_i + b_enc_i) * (x_i @ W_enc_i + b_enc_i > threshold_i)``, where ``x_i``
  is layer ``i``'s MLP input (``blocks.i.pre_mlp_norm``) (a TopK CLT, ``k`` set, instead keeps the
  ``k`` largest pre-activations of each layer, after a ReLU; its thresholds are unused);
- layer ``o``'s MLP output (``blocks.o.post_mlp_norm``) is
  ``sum_{i <= o} f_i @ W_dec_i[:, o] + b_dec_o`` (``+ x_o @ W_skip_o`` with an affine skip term).

Shapes (Gemma Scope 2's, one file per layer): ``W_enc_i [d_model, w_i]``, ``b_enc_i`` and
``threshold_i [w_i]``, ``W_dec_i [w_i, n_layers, d_model]`` (the full output axis; entries for
outputs before ``i`` are never used and an eager CLT does not keep them), ``b_dec_o [d_model]``,
``W_skip_o [d_model, d_model]``.

The weights live either in memory (``lazy=False``) or in the memory-mapped files they came from
(``lazy=True``): then each use reads just the slices it needs (:meth:`encoder`, :meth:`decoder`,
:meth:`decoder_rows`), in the CLT's dtype, so a CLT larger than RAM still runs.

What fits where (float32 files; in memory an eager CLT drops the unused decoder half): the
Gemma 3 270M CLT is 12.7 GB of files, 7.0 GB eager in float32, 3.5 GB in bfloat16; the 1B CLT
about 31 GB of files, 17.5 GB eager in float32, 8.8 GB in bfloat16. Lazy holds none of it (the
page cache does), at the price of reading every decoder slice on each forward (``bench.clt_load``).

>>> import torch
>>> clt = CrossLayerTranscoder.random(n_layers=3, d_model=8, widths=16, seed=0)
>>> xs = [torch.randn(2, 8) for _ in range(3)]
>>> [tuple(y.shape) for y in clt(xs)], clt.feature_offset(2)
([(2, 8), (2, 8), (2, 8)], 32)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..hooks.checks import is_int
from ..model.sites import split_site
from .clt_files import SITE_IN, SITE_OUT, load_clt, mmap_tensors, save_clt
from .dictionary import frozen_param
from .files import DictionaryFileError, check_config, read_json

if TYPE_CHECKING:
    from ..model import Gemma3


class CrossLayerTranscoder(nn.Module):
    """See the module docstring. Build one with :meth:`random`, from tensors (lists indexed by
    layer), or load Gemma Scope 2's ``clt/`` folders with :func:`interp.features.load_dictionary`.

    ``site``/``site_out`` are name templates with ``{layer}`` (registry names, or Hugging Face
    paths that :func:`interp.features.check_fits` resolves); ``sites_in``/``sites_out`` the
    resolved per-layer names.
    """

    architecture: ClassVar[str] = "clt"

    def __init__(self, W_enc: Sequence[torch.Tensor], W_dec: Sequence[torch.Tensor], b_enc: Sequence[torch.Tensor],
                 b_dec: Sequence[torch.Tensor], threshold: Sequence[torch.Tensor],
                 W_skip: Sequence[torch.Tensor] | None = None, *, site: str = SITE_IN, site_out: str = SITE_OUT,
                 files: Sequence[Path] | None = None, k: int | None = None):
        super().__init__()
        n = len(W_enc)
        self.n_layers = n
        self.widths = [int(w.shape[-1]) for w in W_enc]
        self.d_model = int(W_enc[0].shape[0]) if n else 0
        for name, seq in (("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec), ("threshold", threshold),
                          ("W_skip", W_skip if W_skip is not None else W_enc)):
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} layers, W_enc {n}")
        for i in range(n):
            want = {"W_enc": (self.d_model, self.widths[i]), "b_enc": (self.widths[i],),
                    "threshold": (self.widths[i],), "b_dec": (self.d_model,),
                    "W_dec": (self.widths[i], n - i, self.d_model)}
            got = {"W_enc": W_enc[i], "b_enc": b_enc[i], "threshold": threshold[i], "b_dec": b_dec[i],
                   "W_dec": W_dec[i]}
            if W_skip is not None:
                want["W_skip"], got["W_skip"] = (self.d_model, self.d_model), W_skip[i]
            for key, t in got.items():
                if t is not None and tuple(t.shape) != want[key]:
                    raise ValueError(f"layer {i}: {key} has shape {tuple(t.shape)}, expected {want[key]} "
                                     "(W_dec_i is [w_i, n_layers - i, d_model]: outputs from layer i on)")
        if k is not None and (not is_int(k) or not 1 <= k <= min(self.widths)):
            raise ValueError(f"k (features kept per layer and token) must be an int in 1..{min(self.widths)} (the "
                             f"narrowest layer), got {k!r}")
        self.k = k
        self.files = list(files) if files is not None else None
        self._maps: list[Any] | None = None
        self.lazy = files is not None
        self._dtype = torch.float32
        self._device = torch.device("cpu")
        if self.lazy:
            self.W_enc = self.W_dec = self.b_enc = self.b_dec = self.threshold = None
            self.W_skip = None
            self.has_skip = W_skip is not None
        else:
            self.W_enc = nn.ParameterList([frozen_param(t) for t in W_enc])
            self.W_dec = nn.ParameterList([frozen_param(t) for t in W_dec])
            self.b_enc = nn.ParameterList([frozen_param(t) for t in b_enc])
            self.b_dec = nn.ParameterList([frozen_param(t) for t in b_dec])
            self.threshold = nn.ParameterList([frozen_param(t) for t in threshold])
            self.W_skip = None if W_skip is None else nn.ParameterList([frozen_param(t) for t in W_skip])
            self.has_skip = W_skip is not None
            if n:
                self._dtype, self._device = W_enc[0].dtype, W_enc[0].device
        self.site, self.site_out = site, site_out
        self.sites_in = [site.format(layer=i) for i in range(n)]
        self.sites_out = [site_out.format(layer=i) for i in range(n)]

    @classmethod
    def lazy_from(cls, files: Sequence[Path], shapes: dict[str, Any], **sites: Any) -> CrossLayerTranscoder:
        """A CLT that reads its weights from ``files`` (one safetensors file per layer, Gemma Scope 2's
        keys) on each use; ``shapes`` holds ``widths``, ``d_model`` and ``skip`` (checked by the loader)."""
        n, d = len(files), shapes["d_model"]
        meta = [torch.empty(d, w, device="meta") for w in shapes["widths"]]
        dec = [torch.empty(w, n - i, d, device="meta") for i, w in enumerate(shapes["widths"])]
        vec = [torch.empty(w, device="meta") for w in shapes["widths"]]
        bias = [torch.empty(d, device="meta")] * n
        skip = [torch.empty(d, d, device="meta")] * n if shapes["skip"] else None
        return cls(meta, dec, vec, bias, vec, skip, files=list(files), k=shapes.get("k"), **sites)

    # ------------------------------------------------------------------ sizes
    @property
    def d_sae(self) -> int:
        """Features over all layers."""
        return sum(self.widths)

    @property
    def d_in(self) -> int:
        return self.d_model

    @property
    def d_out(self) -> int:
        return self.d_model

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def feature_offset(self, layer: int) -> int:
        """Index of layer ``layer``'s first feature when all layers' features are counted in a row."""
        return sum(self.widths[:layer])

    def __repr__(self) -> str:
        mode = "lazy, memory-mapped" if self.lazy else "in memory"
        topk = f"TopK k={self.k} per layer, " if self.k is not None else ""
        return (f"CrossLayerTranscoder({self.n_layers} layers, d_model {self.d_model}, {self.d_sae} features, "
                f"{topk}skip={self.has_skip}, {self.dtype}, {mode}, {self.site} -> {self.site_out})")

    def _check_layer(self, layer: int) -> int:
        if not is_int(layer) or not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer!r} is outside the CLT's layers 0..{self.n_layers - 1}")
        return layer

    # ------------------------------------------------------------------ weights, per layer
    def _read(self, layer: int, key: str, index: Any = None) -> torch.Tensor:
        """``key[index]`` of layer ``layer``'s file, read from its memory map (only the pages the
        index touches), in the CLT's dtype and on its device."""
        assert self.files is not None

        if self._maps is None:
            self._maps = [None] * self.n_layers
        if self._maps[layer] is None:
            self._maps[layer] = mmap_tensors(self.files[layer])
        t = self._maps[layer][key]
        t = t if index is None else t[index]
        return t.to(device=self._device, dtype=self._dtype, copy=True)

    def encoder(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_enc [d_model, w], b_enc [w], threshold [w])`` of layer ``layer``."""
        i = self._check_layer(layer)
        if self.lazy:
            return self._read(i, "w_enc"), self._read(i, "b_enc"), self._read(i, "threshold")
        assert self.W_enc is not None and self.b_enc is not None and self.threshold is not None
        return self.W_enc[i], self.b_enc[i], self.threshold[i]

    def decoder(self, layer: int, out_layer: int) -> torch.Tensor:
        """``W_dec [w_layer, d_model]``: what layer ``layer``'s features write to ``out_layer``'s MLP
        output (``out_layer >= layer``)."""
        i, o = self._check_layer(layer), self._check_layer(out_layer)
        if o < i:
            raise ValueError(f"layer {i}'s features write to MLP outputs {i}..{self.n_layers - 1}, not {o}")
        if self.lazy:
            return self._read(i, "w_dec", (slice(None), o))
        assert self.W_dec is not None
        return self.W_dec[i][:, o - i]

    def decoder_rows(self, layer: int, features: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``[len(features), n_layers - layer, d_model]``: the chosen features' decoder vectors to
        every output layer from ``layer`` on (what an attribution graph needs per active feature).

        >>> CrossLayerTranscoder.random(4, 8, 16).decoder_rows(1, [3, 5]).shape
        torch.Size([2, 3, 8])
        """
        i = self._check_layer(layer)
        idx = torch.as_tensor(features, dtype=torch.long).flatten()
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < self.widths[i]):
            raise IndexError(f"layer {i} has {self.widths[i]} features; got indices {idx.tolist()[:8]}")
        if self.lazy:
            return self._read(i, "w_dec", (idx, slice(i, None)))
        assert self.W_dec is not None
        return self.W_dec[i][idx.to(self._device)]

    def bias(self, out_layer: int) -> torch.Tensor:
        """``b_dec [d_model]`` of output layer ``out_layer``."""
        o = self._check_layer(out_layer)
        if self.lazy:
            return self._read(o, "b_dec")
        assert self.b_dec is not None
        return self.b_dec[o]

    def skip_weight(self, layer: int) -> torch.Tensor | None:
        """``W_skip [d_model, d_model]`` (layer ``layer``'s MLP input to its own output), or None."""
        i = self._check_layer(layer)
        if not self.has_skip:
            return None
        if self.lazy:
            return self._read(i, "affine_skip_connection")
        assert self.W_skip is not None
        return self.W_skip[i]

    # ------------------------------------------------------------------ the maps
    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s feature activations ``[..., w_layer]`` from its MLP input ``x [..., d_model]``."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"the CLT reads width {self.d_model}, got {x.shape[-1]}")
        w, b, thr = self.encoder(layer)
        pre = x.to(self._dtype) @ w + b
        if self.k is not None:
            values, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
        return torch.relu(pre) * (pre > thr)

    def decode(self, acts: Sequence[torch.Tensor | None], out_layer: int) -> torch.Tensor:
        """MLP output ``out_layer`` from the features of layers ``0..out_layer`` (``acts[i]`` is
        layer ``i``'s ``[..., w_i]``; None counts as zero): ``sum_i acts[i] @ W_dec_i[:, out] + b_dec``
        (no skip term: :meth:`skip` adds it)."""
        out = self.bias(out_layer)
        for i in range(out_layer + 1):
            a = acts[i] if i < len(acts) else None
            if a is not None:
                out = out + a.to(self._dtype) @ self.decoder(i, out_layer)
        return out

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """``x @ W_skip_layer`` (None without a skip term)."""
        w = self.skip_weight(layer)
        return None if w is None else x.to(self._dtype) @ w

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every layer's MLP output from every layer's MLP input (``xs[i]`` is ``[..., d_model]``)."""
        if len(xs) != self.n_layers:
            raise ValueError(f"the CLT reads {self.n_layers} layers' MLP inputs, got {len(xs)}")
        acts = [self.encode(i, x) for i, x in enumerate(xs)]
        outs = []
        for o in range(self.n_layers):
            y = self.decode(acts, o)
            s = self.skip(o, xs[o])
            outs.append(y if s is None else y + s)
        return outs

    # ------------------------------------------------------------------ dtype / device
    def to(self, *args: Any, **kwargs: Any) -> CrossLayerTranscoder:
        """As ``nn.Module.to``; a lazy CLT only records the dtype and device its reads convert to."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"a CLT's weights are floating point; cannot convert to {dtype}")
        self._device = torch.device(device) if device is not None else self._device
        self._dtype = dtype or self._dtype
        return super().to(*args, **kwargs) if not self.lazy else self

    def load_into_memory(self) -> CrossLayerTranscoder:
        """An eager copy of a lazy CLT (every weight read once, in the CLT's dtype)."""
        n = self.n_layers
        enc = [self.encoder(i) for i in range(n)]
        dec = [self._read(i, "w_dec", (slice(None), slice(i, None))) if self.lazy else self.W_dec[i]  # type: ignore
               for i in range(n)]
        skip = [self.skip_weight(i) for i in range(n)] if self.has_skip else None
        out = CrossLayerTranscoder([e[0] for e in enc], dec, [e[1] for e in enc], [self.bias(o) for o in range(n)],
                                   [e[2] for e in enc], skip, site=self.site, site_out=self.site_out,  # type: ignore
                                   k=self.k)
        out.sites_in, out.sites_out = list(self.sites_in), list(self.sites_out)
        return out

    @classmethod
    def random(cls, n_layers: int, d_model: int, widths: int | Sequence[int], seed: int = 0, skip: bool = False,
               threshold: float = 0.05, k: int | None = None) -> CrossLayerTranscoder:
        """Random weights (reads ``blocks.i.pre_mlp_norm``, writes ``blocks.o.post_mlp_norm``), for
        tests and shapes; ``k`` makes it a TopK CLT."""
        ws = [widths] * n_layers if isinstance(widths, int) else list(widths)
        gen = torch.Generator().manual_seed(seed)
        enc = [torch.randn(d_model, w, generator=gen) / d_model ** 0.5 for w in ws]
        dec = [torch.randn(w, n_layers - i, d_model, generator=gen) / w ** 0.5 for i, w in enumerate(ws)]
        b_enc = [torch.randn(w, generator=gen) * 0.1 for w in ws]
        b_dec = [torch.randn(d_model, generator=gen) * 0.1 for _ in ws]
        thr = [torch.rand(w, generator=gen) * 2 * threshold for w in ws]
        w_skip = [torch.randn(d_model, d_model, generator=gen) * 0.05 for _ in ws] if skip else None
        return cls(enc, dec, b_enc, b_dec, thr, w_skip, k=k)

    def save(self, folder: Any) -> Path:
        """Write Gemma Scope 2's ``clt/`` layout: ``config.json`` and ``params_layer_{i}.safetensors``
        (``w_dec`` with the full output axis, zeros before layer ``i``)."""

        return save_clt(self, folder)

    @classmethod
    def load(cls, folder: Any, *, lazy: bool = True, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", model: Gemma3 | None = None) -> CrossLayerTranscoder:
        """Load a Gemma Scope 2 ``clt/`` folder: ``lazy`` keeps the weights in the memory-mapped files
        (each use reads its slices in ``dtype``); ``lazy=False`` reads them all now, straight into
        ``dtype``. With ``model``, the sites are resolved and the widths checked."""

        path = Path(folder)
        if not path.is_dir():
            raise DictionaryFileError(f"{path} is not a folder; a CLT is a folder of params_layer_{{i}}.safetensors")
        config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        kind = check_config(config, path / "config.json")
        if kind not in (None, "clt"):
            raise DictionaryFileError(f"{path / 'config.json'} says type={kind!r}, not 'clt': use load_dictionary")
        out = load_clt(cls, path, config, lazy=lazy, dtype=dtype).to(device=device)
        if model is not None:
            out.check_fits(model)
        return out

    def check_fits(self, model: Gemma3) -> None:
        """Resolve every layer's sites through ``model``'s registry and check the layer count and width."""

        if model.cfg.n_layers != self.n_layers or model.cfg.d_model != self.d_model:
            raise DictionaryFileError(f"this CLT has {self.n_layers} layers of width {self.d_model}; the model has "
                                      f"{model.cfg.n_layers} of width {model.cfg.d_model}: load the CLT released "
                                      "for this model size")
        resolved: dict[str, list[str]] = {}
        for attr, template in (("sites_in", self.site), ("sites_out", self.site_out)):
            names = []
            for i in range(self.n_layers):
                found = model.registry.resolve(template.format(layer=i))
                if len(found) != 1:
                    raise DictionaryFileError(f"a CLT reads one site per layer; {template.format(layer=i)!r} "
                                              f"matches {len(found)}")
                names.append(found[0])
            resolved[attr] = names
        for i, (a, b) in enumerate(zip(resolved["sites_in"], resolved["sites_out"])):
            if not (split_site(a)[0] == i and split_site(b)[0] == i):
                raise DictionaryFileError(f"layer {i} of the CLT resolves to {a} -> {b}, not layer {i}'s sites: "
                                          "spell site/site_out with {layer} (e.g. 'blocks.{layer}.pre_mlp_norm')")
        self.sites_in, self.sites_out = resolved["sites_in"], resolved["sites_out"]


__all__ = ["CrossLayerTranscoder", "SITE_IN", "SITE_OUT"]

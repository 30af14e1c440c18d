"""Sparse dictionaries as one small family: JumpReLU and TopK SAEs, and transcoders.

Every dictionary encodes what it reads into feature activations and decodes them:
``pre = x @ W_enc + b_enc``, ``acts = activation(pre)``, ``out = acts @ W_dec + b_dec``. An SAE
reconstructs the site it reads; a :class:`Transcoder` reads one site (the MLP's input, its
``pre_mlp_norm``) and predicts another (what the MLP adds to the residual, ``post_mlp_norm``),
optionally with an affine skip term ``x @ W_skip`` (Gemma Scope 2's "affine skip connection",
stored ``[d_in, d_out]``). Shapes: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``.

- :class:`JumpReLUSAE`: a feature fires only above its own threshold, ``relu(pre) * (pre > threshold)``.
- :class:`TopKSAE`: the ``k`` largest pre-activations of each token fire (after a ReLU).
- :mod:`.architectures`: SAELens's standard (ReLU), gated and AbsTopK SAEs, and the
  ``ARCHITECTURES`` table.

Every dictionary carries :class:`~interp.features.settings.Settings` (``d.settings``): SAELens's
inference settings (b_dec subtracted from the input, input normalisation, decoder-norm rescaling,
hook_z reshaping), applied by ``encode``/``decode``/``forward`` wherever the dictionary runs.

>>> import torch
>>> sae = JumpReLUSAE.random(d_in=4, d_sae=8, seed=0)
>>> x = torch.randn(2, 4)
>>> sae.decode(sae.encode(x)).shape, sae.W_dec.norm(dim=1).allclose(torch.ones(8))
(torch.Size([2, 4]), True)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..hooks.checks import is_int
from ..model import Gemma3
from ..model.sites import block_site
from .settings import Normalizer, Settings


def frozen_param(t: torch.Tensor) -> nn.Parameter:
    """A frozen, contiguous copy of ``t`` (training unfreezes what it trains)."""
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)


class Dictionary(nn.Module):
    """What every dictionary shares (see the module docstring). ``site`` is the registry name it
    reads (set by a loader, a trainer, or by hand); ``site_out`` the one it writes (an SAE
    writes back where it reads)."""

    architecture: ClassVar[str] = ""
    #: SAELens undoes the input normalisation on the output of an SAE, not of a transcoder.
    denormalizes_output: ClassVar[bool] = True

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor | None = None,
                 b_dec: torch.Tensor | None = None, *, site: str | None = None, site_out: str | None = None,
                 settings: Settings | None = None):
        super().__init__()
        if W_enc.dim() != 2 or W_dec.dim() != 2 or W_dec.shape[0] != W_enc.shape[1]:
            raise ValueError(f"W_enc must be [d_in, d_sae] and W_dec [d_sae, d_out]; got {tuple(W_enc.shape)} and "
                             f"{tuple(W_dec.shape)}")
        d_sae, d_out = W_dec.shape
        b_enc = torch.zeros(d_sae, dtype=W_enc.dtype) if b_enc is None else b_enc
        b_dec = torch.zeros(d_out, dtype=W_dec.dtype) if b_dec is None else b_dec
        for name, tensor, want in (("b_enc", b_enc, (d_sae,)), ("b_dec", b_dec, (d_out,))):
            if tuple(tensor.shape) != want:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; with W_enc {tuple(W_enc.shape)} and W_dec "
                                 f"{tuple(W_dec.shape)} it must be {want}")
        self.W_enc = frozen_param(W_enc)
        self.W_dec = frozen_param(W_dec)
        self.b_enc = frozen_param(b_enc)
        self.b_dec = frozen_param(b_dec)
        self.site, self.site_out = site, site_out
        self.settings = Settings() if settings is None else settings
        if not isinstance(self.settings, Settings):
            raise TypeError(f"settings must be an interp.features.settings.Settings, got {type(settings).__name__}")
        if self.settings.apply_b_dec_to_input and d_out != self.d_in:
            raise ValueError(f"apply_b_dec_to_input subtracts b_dec (width {d_out}) from the input (width "
                             f"{self.d_in}); it needs d_out == d_in")
        self._norm = Normalizer()

    # ------------------------------------------------------------------ sizes
    @property
    def d_in(self) -> int:
        """Width of the site the dictionary reads."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        """Width of what it writes (``d_in`` for an SAE)."""
        return int(self.W_dec.shape[1])

    @property
    def writes(self) -> str | None:
        """The site the output is meant for (``site_out``, else ``site``)."""
        return self.site_out or self.site

    def __repr__(self) -> str:
        where = f"{self.site} -> {self.site_out}" if self.site_out else f"{self.site}"
        extra = self.settings.describe()
        return (f"{type(self).__name__}({self.d_in} -> {self.d_sae} features -> {self.d_out}, site={where}"
                f"{', ' + extra if extra else ''})")

    # ------------------------------------------------------------------ the maps
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_enc + b_enc`` in the dictionary's dtype: ``[..., d_sae]``."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"{type(self).__name__} reads width {self.d_in}, got {x.shape[-1]}")
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations -> feature activations (each architecture's own rule)."""
        raise NotImplementedError

    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the weights see it: cast, reshaped, normalised, ``b_dec`` subtracted, as
        :attr:`settings` say (remembering the statistics :meth:`decode` undoes)."""
        s = self.settings
        b_dec = self.b_dec if s.apply_b_dec_to_input else None
        return self._norm.input(s, x, self.d_in, self.W_enc.dtype, b_dec, type(self).__name__)

    def _features(self, sae_in: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(sae_in)
        if self.settings.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return self.activation(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` (zero where a feature does not fire)."""
        return self._features(self.sae_in(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """``acts @ W_dec + b_dec``: ``[..., d_out]``, with :attr:`settings`' output steps (a
        transcoder's skip term is not included; :meth:`forward` adds it)."""
        acts = acts.to(self.W_dec.dtype)
        if self.settings.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        out = acts @ self.W_dec + self.b_dec
        if self.settings.plain or not self.denormalizes_output:
            return out
        return self._norm.output(self.settings, out, type(self).__name__)

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """The affine skip term of ``x`` (None without one)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dictionary's output for ``x``: ``decode(encode(x))`` plus the skip term, if any."""
        out = self.decode(self.encode(x))
        skip = self.skip(x)
        return out if skip is None else out + skip

    # ------------------------------------------------------------------ construction
    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors beyond W_enc, W_dec, b_enc, b_dec (threshold, W_skip)."""
        return {}

    def extra_config(self) -> dict[str, Any]:
        """Settings beyond the tensors (k of a TopK)."""
        return {}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale each feature's decoder row to unit norm, moving the scale into the encoder so the
        output does not change (threshold scaled with it)."""
        if self.settings.rescale_acts_by_decoder_norm:
            raise ValueError("rescale_acts_by_decoder_norm reads the decoder norms; normalising them changes the "
                             "features (SAELens refuses the same fold)")
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        threshold = getattr(self, "threshold", None)
        if isinstance(threshold, torch.Tensor):
            threshold.mul_(norms)

    @classmethod
    def _random_weights(cls, d_in: int, d_sae: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_out, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        w_enc = w_dec.T.clone() if d_in == d_out else torch.randn(d_in, d_sae, generator=gen) / d_in ** 0.5
        return w_enc, w_dec

class JumpReLUSAE(Dictionary):
    """``acts = relu(pre) * (pre > threshold)``: each feature fires only above its own threshold
    (the Gemma Scope architecture)."""

    architecture = "jumprelu"

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor | None = None,
                 b_dec: torch.Tensor | None = None, threshold: torch.Tensor | None = None, **sites: Any):
        super().__init__(W_enc, W_dec, b_enc, b_dec, **sites)
        threshold = torch.zeros(self.d_sae, dtype=W_enc.dtype) if threshold is None else threshold
        if tuple(threshold.shape) != (self.d_sae,):
            raise ValueError(f"threshold has shape {tuple(threshold.shape)}; it must be ({self.d_sae},)")
        self.threshold = frozen_param(threshold)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold}

    @classmethod
    def random(cls, d_in: int, d_sae: int, site: str | None = None, seed: int = 0,
               threshold: float = 0.05) -> JumpReLUSAE:
        """Random weights (unit decoder rows, encoder their transpose), for tests and shapes."""
        w_enc, w_dec = cls._random_weights(d_in, d_sae, d_in, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        return cls(w_enc, w_dec, threshold=torch.rand(d_sae, generator=gen) * 2 * threshold, site=site)


class TopKSAE(Dictionary):
    """``acts``: the ``k`` largest pre-activations of each token (after a ReLU); the rest zero."""

    architecture = "topk"

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor | None = None,
                 b_dec: torch.Tensor | None = None, k: int = 32, **sites: Any):
        super().__init__(W_enc, W_dec, b_enc, b_dec, **sites)
        if not is_int(k) or not 1 <= k <= self.d_sae:
            raise ValueError(f"k must be an int in 1..{self.d_sae}, got {k!r}")
        self.k = k

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))

    def extra_config(self) -> dict[str, Any]:
        return {"k": self.k}

    @classmethod
    def random(cls, d_in: int, d_sae: int, k: int = 8, site: str | None = None, seed: int = 0) -> TopKSAE:
        """Random weights, for tests and shapes."""
        w_enc, w_dec = cls._random_weights(d_in, d_sae, d_in, seed)
        return cls(w_enc, w_dec, k=k, site=site)


class Transcoder(Dictionary):
    """Reads ``site`` and predicts ``site_out``: ``acts @ W_dec + b_dec`` (+ ``x @ W_skip`` for a
    skip transcoder, on the raw input). Features fire by JumpReLU (``threshold``, as Gemma Scope 2's
    transcoders), when ``k`` is given by TopK, and with neither by ReLU (SAELens's ``transcoder``).
    As in SAELens, an input normalisation is not undone on the output and ``apply_b_dec_to_input``
    and ``hook_z`` do not apply."""

    architecture = "transcoder"
    denormalizes_output = False

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor | None = None,
                 b_dec: torch.Tensor | None = None, threshold: torch.Tensor | None = None,
                 W_skip: torch.Tensor | None = None, k: int | None = None, **sites: Any):
        super().__init__(W_enc, W_dec, b_enc, b_dec, **sites)
        if k is not None and threshold is not None:
            raise ValueError("a transcoder fires by threshold (JumpReLU) or by k (TopK), not both")
        self.k = k
        if k is not None and (not is_int(k) or not 1 <= k <= self.d_sae):
            raise ValueError(f"k must be an int in 1..{self.d_sae}, got {k!r}")
        for bad in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
            if getattr(self.settings, bad):
                raise ValueError(f"a transcoder does not take {bad} (SAELens's transcoders refuse it too)")
        if self.settings.reshape_activations != "none":
            raise ValueError("a transcoder does not take reshape_activations='hook_z' (SAELens's transcoders do not "
                             "reshape)")
        if threshold is not None and tuple(threshold.shape) != (self.d_sae,):
            raise ValueError(f"threshold has shape {tuple(threshold.shape)}; it must be ({self.d_sae},)")
        self.threshold = None if threshold is None else frozen_param(threshold)
        if W_skip is not None and tuple(W_skip.shape) != (self.d_in, self.d_out):
            raise ValueError(f"W_skip has shape {tuple(W_skip.shape)}; it maps x [.., d_in] to [.., d_out], so it is "
                             f"[d_in, d_out] = ({self.d_in}, {self.d_out}) (Gemma Scope 2's affine_skip_connection)")
        self.W_skip = None if W_skip is None else frozen_param(W_skip)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.k is not None:
            values, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
        if self.threshold is None:
            return torch.relu(pre)
        return torch.relu(pre) * (pre > self.threshold)

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.W_skip is None else x.to(self.W_skip.dtype) @ self.W_skip

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip
        return out

    def extra_config(self) -> dict[str, Any]:
        return {"k": self.k} if self.k is not None else {}

    @classmethod
    def random(cls, model: Gemma3, layer: int, d_sae: int, seed: int = 0, skip: bool = False,
               threshold: float = 0.05, k: int | None = None) -> Transcoder:
        """An untrained transcoder for layer ``layer``'s MLP (reads ``blocks.L.pre_mlp_norm``,
        writes ``blocks.L.post_mlp_norm``), for tests and shapes.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=2, d_model=8, d_mlp=16, n_heads=1, n_kv_heads=1,
        ...                                     d_head=8, vocab_size=20))
        >>> Transcoder.random(m, layer=1, d_sae=32).site_out
        'blocks.1.post_mlp_norm'
        """
        d = model.cfg.d_model
        w_enc, w_dec = cls._random_weights(d, d_sae, d, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        thr = None if k is not None else torch.rand(d_sae, generator=gen) * 2 * threshold
        w_skip = torch.randn(d, d, generator=gen) * 0.01 if skip else None
        return cls(w_enc * 0.5, w_dec, threshold=thr, W_skip=w_skip, k=k, site=block_site(layer, "pre_mlp_norm"),
                   site_out=block_site(layer, "post_mlp_norm"))


__all__ = ["Dictionary", "JumpReLUSAE", "TopKSAE", "Transcoder"]

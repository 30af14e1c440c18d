"""SAELens's other SAEs on the :class:`~interp.features.dictionary.Dictionary` family, and the table
of every architecture.

- :class:`StandardSAE`: ``acts = relu(pre)`` (SAELens's ``standard``).
- :class:`GatedSAE`: a gate ``x @ W_enc + b_gate > 0`` chooses the features, a magnitude path
  ``relu(x @ (W_enc * exp(r_mag)) + b_mag)`` sizes them (SAELens's ``gated``; ``b_enc`` is ``b_gate``).
- :class:`AbsTopKSAE`: the ``k`` pre-activations largest in magnitude, sign kept (``abstopk``).

>>> import torch
>>> sae = StandardSAE.random(d_in=4, d_sae=8)
>>> bool((sae.encode(torch.randn(3, 4)) >= 0).all())
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dictionary import Dictionary, JumpReLUSAE, TopKSAE, Transcoder, frozen_param


class StandardSAE(Dictionary):
    """``acts = relu(x @ W_enc + b_enc)``."""

    architecture = "standard"

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    @classmethod
    def random(cls, d_in: int, d_sae: int, site: str | None = None, seed: int = 0) -> StandardSAE:
        """Random weights, for tests and shapes."""
        w_enc, w_dec = cls._random_weights(d_in, d_sae, d_in, seed)
        return cls(w_enc, w_dec, site=site)


class GatedSAE(Dictionary):
    """``acts = (x W_enc + b_gate > 0) * relu(x (W_enc * exp(r_mag)) + b_mag)``; ``b_gate`` is kept
    as ``b_enc`` (so :meth:`pre_acts` are the gate's pre-activations)."""

    architecture = "gated"

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_gate: torch.Tensor | None = None,
                 b_dec: torch.Tensor | None = None, b_mag: torch.Tensor | None = None,
                 r_mag: torch.Tensor | None = None, **sites: Any):
        super().__init__(W_enc, W_dec, b_gate, b_dec, **sites)
        b_mag, r_mag = (torch.zeros(self.d_sae, dtype=W_enc.dtype) if t is None else t for t in (b_mag, r_mag))
        for name, t in (("b_mag", b_mag), ("r_mag", r_mag)):
            if tuple(t.shape) != (self.d_sae,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be ({self.d_sae},)")
        self.b_mag: nn.Parameter = frozen_param(b_mag)
        self.r_mag: nn.Parameter = frozen_param(r_mag)
        if self.settings.rescale_acts_by_decoder_norm:
            raise ValueError("a gated SAE does not take rescale_acts_by_decoder_norm (SAELens's TopK SAEs do)")

    def _features(self, sae_in: torch.Tensor) -> torch.Tensor:
        gate = (self.pre_acts(sae_in) > 0).to(self.W_enc.dtype)
        magnitude = sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return gate * torch.relu(magnitude)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise TypeError("a gated SAE's activations need the input, not one pre-activation: call encode(x)")

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"b_mag": self.b_mag, "r_mag": self.r_mag}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        super().normalize_decoder()  # W_dec, W_enc, b_enc (= b_gate)
        self.b_mag.mul_(norms)

    @classmethod
    def random(cls, d_in: int, d_sae: int, site: str | None = None, seed: int = 0) -> GatedSAE:
        """Random weights (a random gate bias, magnitude scale and bias), for tests and shapes."""
        w_enc, w_dec = cls._random_weights(d_in, d_sae, d_in, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        b_gate, b_mag, r_mag = (torch.randn(3, d_sae, generator=gen) * 0.1).unbind(0)
        return cls(w_enc, w_dec, b_gate, b_mag=b_mag, r_mag=r_mag, site=site)


class AbsTopKSAE(TopKSAE):
    """The ``k`` pre-activations largest in magnitude fire with their sign; the rest are zero."""

    architecture = "abstopk"

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        idx = pre.abs().topk(self.k, dim=-1).indices
        return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))


ARCHITECTURES: dict[str, type[Dictionary]] = {
    c.architecture: c for c in (StandardSAE, GatedSAE, JumpReLUSAE, TopKSAE, AbsTopKSAE, Transcoder)}

__all__ = ["StandardSAE", "GatedSAE", "AbsTopKSAE", "ARCHITECTURES"]

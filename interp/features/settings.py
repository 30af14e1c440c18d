"""How a dictionary treats its input and output around the weights: SAELens's inference settings.

A :class:`Settings` lives on every :class:`~interp.features.dictionary.Dictionary` (``d.settings``),
so ``encode``/``decode``/``forward`` apply it wherever the dictionary runs. In order, as SAELens:

- input: cast to the dictionary's dtype; ``reshape_activations="hook_z"`` flattens ``[..., heads,
  d_head]`` to ``[..., heads * d_head]`` (a flat input stays flat); ``normalize_activations``:
  ``"constant_norm_rescale"`` scales each token to norm ``sqrt(d_in)``, ``"layer_norm"`` subtracts
  the mean and divides by ``std + 1e-5`` (unbiased std), ``"expected_average_only_in"`` multiplies by
  ``scaling_factor``; ``apply_b_dec_to_input`` subtracts ``b_dec``.
- ``rescale_acts_by_decoder_norm`` (TopK): pre-activations are multiplied by the decoder row norms
  before the TopK and the activations divided by them before decoding.
- output: the normalisation undone with the statistics of the most recent ``encode`` (SAELens keeps
  them on the module the same way; ``forward`` encodes first, so it is always consistent), divided by
  ``scaling_factor``; ``hook_z`` output reshaped back to ``[..., heads, d_head]``.

>>> Settings(normalize_activations="layer_norm").describe()
'normalize_activations=layer_norm'
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
RESHAPES = ("none", "hook_z")
LN_EPS = 1e-5


@dataclass(frozen=True)
class Settings:
    """SAELens's inference settings (see the module docstring). The default computes the plain
    ``activation(x @ W_enc + b_enc) @ W_dec + b_dec``."""

    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    scaling_factor: float | None = None
    rescale_acts_by_decoder_norm: bool = False
    reshape_activations: str = "none"

    def __post_init__(self) -> None:
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations={self.normalize_activations!r} is not one of {NORMALIZATIONS}")
        if self.reshape_activations not in RESHAPES:
            raise ValueError(f"reshape_activations={self.reshape_activations!r} is not one of {RESHAPES}")
        expected = self.normalize_activations == "expected_average_only_in"
        if expected != (self.scaling_factor is not None):
            raise ValueError("scaling_factor goes with normalize_activations='expected_average_only_in' and only with "
                             f"it; got normalize_activations={self.normalize_activations!r}, "
                             f"scaling_factor={self.scaling_factor!r}")
        factor = self.scaling_factor
        if factor is not None and not (isinstance(factor, (int, float)) and 0 < factor < float("inf")):
            raise ValueError(f"scaling_factor must be a positive finite number, got {self.scaling_factor!r}")
        for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def plain(self) -> bool:
        """True when nothing is applied around the weights."""
        return self == Settings()

    def describe(self) -> str:
        """The settings that differ from the default, as ``name=value`` (empty when plain)."""
        default = Settings()
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                         if getattr(self, f.name) != getattr(default, f.name))


class Normalizer:
    """Applies a :class:`Settings` to a dictionary's input and output, remembering the statistics
    of the last input (as SAELens does) so that ``decode`` undoes what ``encode`` did."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def input(self, s: Settings, x: torch.Tensor, d_in: int, dtype: torch.dtype, b_dec: torch.Tensor | None,
              name: str) -> torch.Tensor:
        x = x.to(dtype)
        self.state = {}
        if s.reshape_activations == "hook_z" and x.shape[-1] != d_in:
            if x.dim() < 2 or x.shape[-2] * x.shape[-1] != d_in:
                raise ValueError(f"{name} (reshape_activations='hook_z') reads [..., heads, d_head] with heads * "
                                 f"d_head = {d_in}, or [..., {d_in}]; got shape {tuple(x.shape)}")
            self.state["d_head"] = int(x.shape[-1])
            x = x.flatten(-2)
        if x.shape[-1] != d_in:
            raise ValueError(f"{name} reads width {d_in}, got {x.shape[-1]}")
        if s.normalize_activations == "constant_norm_rescale":
            coeff = d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            self.state["coeff"] = coeff
            x = x * coeff
        elif s.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            self.state["ln"] = (mu, std)
            x = x / (std + LN_EPS)
        elif s.scaling_factor is not None:
            x = x * s.scaling_factor
        if s.apply_b_dec_to_input:
            assert b_dec is not None
            x = x - b_dec
        return x

    def output(self, s: Settings, out: torch.Tensor, name: str) -> torch.Tensor:
        if s.normalize_activations == "constant_norm_rescale":
            out = out / self._need("coeff", s, name)
        elif s.normalize_activations == "layer_norm":
            mu, std = self._need("ln", s, name)
            out = out * std + mu
        elif s.scaling_factor is not None:
            out = out / s.scaling_factor
        if "d_head" in self.state:
            out = out.unflatten(-1, (-1, self.state["d_head"]))
        return out

    def _need(self, key: str, s: Settings, name: str) -> Any:
        if key not in self.state:
            raise RuntimeError(f"{name} has normalize_activations={s.normalize_activations!r}: decode undoes the "
                               "statistics of the input last encoded, and none was; call forward(x), or encode(x) "
                               "before decode")
        return self.state[key]


__all__ = ["Settings", "Normalizer", "NORMALIZATIONS", "RESHAPES"]

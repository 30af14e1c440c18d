"""Gemma 3's residual-stream algebra on top of the generic :class:`~interp.hooks.ActivationCache`.

The residual stream is exactly ``embed + sum_i post_attn_norm_i + sum_i post_mlp_norm_i`` (the
sandwich norms' outputs are what each layer adds). :class:`Gemma3Cache` splits it that way and
stacks it per stage; ``run_with_cache`` returns one.

>>> import torch
>>> c = Gemma3Cache({"embed": torch.ones(1, 1, 2),
...     "blocks.0.post_attn_norm": torch.ones(1, 1, 2), "blocks.0.post_mlp_norm": torch.ones(1, 1, 2)})
>>> parts, labels = c.decompose_resid()
>>> labels, parts.sum(0)
(['embed', 'blocks.0.post_attn_norm', 'blocks.0.post_mlp_norm'], tensor([[[3., 3.]]]))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..hooks import ActivationCache
from .sites import LAYER_FORMAT, aliases_of, block_site, layer_site


class Gemma3Cache(ActivationCache):
    """An :class:`~interp.hooks.ActivationCache` of a Gemma 3 run, with the residual algebra.

    Indexing takes a site's Hugging Face and TransformerLens aliases too (keys stay site names),
    and ``(kind, layer)`` as TransformerLens's cache does (``kind``: ours or TransformerLens's short
    name, see :func:`~interp.model.sites.layer_site`):

    >>> c = Gemma3Cache({"blocks.3.resid_post": torch.ones(1)})
    >>> c["blocks.3.hook_resid_post"], c["resid_post", 3], ("resid_post", 4) in c
    (tensor([1.]), tensor([1.]), False)
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, layer_format: str | None = LAYER_FORMAT):
        super().__init__(tensors, layer_format=layer_format or LAYER_FORMAT)

    def _default_aliases(self) -> dict[str, str]:
        known: dict[str, str] = {}
        for name in self:
            try:
                known.update(dict.fromkeys(aliases_of(name), name))
            except KeyError:  # not a site name of this model (a hand-built cache may hold others)
                continue
        return known

    def _layer_key(self, kind: str, layer: int) -> str:
        """``cache["resid_post", 3]``: our kinds and TransformerLens's short names
        (:func:`~interp.model.sites.layer_site`).

        >>> Gemma3Cache({"blocks.2.attn.pattern": torch.ones(1)})["pattern", 2]
        tensor([1.])
        """
        return layer_site(kind, layer)

    def decompose_resid(self, layer: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """The residual stream entering ``layer`` (default: after the last cached layer) as its parts.

        Returns ``(parts [n_parts, batch, seq, d], labels)``: ``embed``, then each earlier
        layer's ``post_attn_norm`` and ``post_mlp_norm`` (what Gemma adds to the residual).
        The parts sum to ``resid_pre`` of ``layer`` (exactly, summed in the model's order and
        dtype). Needs ``embed``, ``blocks.*.post_attn_norm`` and ``blocks.*.post_mlp_norm`` cached.
        """
        n = len(self.layers("post_attn_norm")) if layer is None else layer
        labels = ["embed"]
        for i in range(n):
            labels += [block_site(i, "post_attn_norm"), block_site(i, "post_mlp_norm")]
        return torch.stack([self[name] for name in labels]), labels

    def accumulated_resid(self) -> tuple[torch.Tensor, list[str]]:
        """The residual stream after each stage: ``resid_pre`` of layer 0, then ``resid_post`` of each
        cached layer, stacked ``[stages, batch, seq, d]`` with labels (the logit lens's input).

        >>> c = Gemma3Cache({"blocks.0.resid_pre": torch.zeros(1, 2, 4), "blocks.0.resid_post": torch.ones(1, 2, 4)})
        >>> c.accumulated_resid()[0].shape
        torch.Size([2, 1, 2, 4])
        """
        labels = [block_site(0, "resid_pre")] + [block_site(i, "resid_post") for i in self.layers("resid_post")]
        return torch.stack([self[name] for name in labels]), labels


__all__ = ["Gemma3Cache"]

"""What every part of :class:`~interp.model.Gemma3` stands on: its configuration, site registry,
tokenizer and embedding, the dtype and device they give, turning a prompt into tokens, and which
sites a run computes. The mixins (runs and caches, generation) build on it, so they need no
stand-ins for the model they are mixed into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..hooks import HookRegistry
from .config import Gemma3Config
from .inputs import Prompt, check_mask, to_ids

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


class ModelBase(nn.Module):
    """The state and the small queries shared by the model and its mixins; :class:`~interp.model.Gemma3`
    sets ``cfg``, ``tokenizer``, ``embed`` and ``registry`` in its ``__init__``."""

    cfg: Gemma3Config
    tokenizer: Tokenizer | None
    embed: nn.Embedding
    registry: HookRegistry

    @property
    def dtype(self) -> torch.dtype:
        """The weights' (and activations') dtype."""
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights live; inputs are moved here."""
        return self.embed.weight.device

    def to_tokens(self, prompt: Prompt, attention_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Turn text, a batch of texts or ids into ``(ids [b, s], attention_mask [b, s] | None)``
        on the model's device; a list of texts is left-padded for you.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> m.to_tokens([2, 5])[0]
        tensor([[2, 5]])
        """
        ids, mask = to_ids(self.cfg, self.tokenizer, prompt)
        if mask is not None and attention_mask is None:
            attention_mask = mask
        ids = ids.to(self.device)
        return ids, check_mask(attention_mask, tuple(ids.shape), 0, self.device)

    def reaches(self, name: str, start_at_layer: int = 0, stop: int | None = None, from_resid: bool = False,
                to_logits: bool = True) -> bool:
        """Whether a run with these bounds computes site ``name`` (``stop``: the layer it stops
        before; ``to_logits``: it runs on to the final norm and logits).

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=3, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> m.reaches("blocks.2.mlp.out", stop=1, to_logits=False), m.reaches("embed")
        (False, True)
        """
        stop = self.cfg.n_layers if stop is None else stop
        layer = self.registry.names.layer_of.get(name)
        if layer is not None:
            return start_at_layer <= layer < stop
        if name == "embed":
            return not from_resid and start_at_layer == 0
        return to_logits


__all__ = ["ModelBase"]

"""What every part of :class:`~interp.model.Gemma3` stands on: its configuration, site registry,
tokenizer and embedding, the dtype and device they give, turning a prompt into tokens, and which
sites a run computes. The mixins (runs and caches, generation) build on it, so they need no
stand-ins for the model they are mixed into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..hooks import HookRegistry
from .config import Gemma3Config
from .inputs import InputError, Prompt, check_mask, to_ids

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

    def to_tokens(self, prompt: Prompt) -> torch.Tensor:
        """Token ids ``[b, s]`` of text, a batch of texts or ids, on the model's device (as
        TransformerLens's ``to_tokens``); a list of texts is left-padded for you, and
        :meth:`to_tokens_and_mask` gives the attention mask that goes with it.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> m.to_tokens([2, 5])
        tensor([[2, 5]])
        """
        return self.to_tokens_and_mask(prompt)[0]

    def to_tokens_and_mask(self, prompt: Prompt, attention_mask: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(ids [b, s], attention_mask [b, s] | None)`` of ``prompt``, on the model's device: the
        mask of a left-padded batch of texts (None when nothing is padded), or ``attention_mask``
        when given, checked against the ids.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> m.to_tokens_and_mask([[2, 5]], attention_mask=torch.tensor([[0, 1]]))
        (tensor([[2, 5]]), tensor([[0, 1]]))
        """
        ids, mask = to_ids(self.cfg, self.tokenizer, prompt)
        if mask is not None and attention_mask is None:
            attention_mask = mask
        ids = ids.to(self.device)
        return ids, check_mask(attention_mask, tuple(ids.shape), 0, self.device)

    def to_str_tokens(self, prompt: str | Sequence[int] | torch.Tensor, bos: bool = True) -> list[str]:
        """Each token of ``prompt`` (a text, or one sequence of ids) as its text, BOS first for a
        text (as TransformerLens's ``to_str_tokens``; :meth:`Tokenizer.to_str_tokens` does the work).

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> m.to_str_tokens("hi")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        InputError: this model has no tokenizer (built from a configuration) ...
        """
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer (built from a configuration); load one with "
                             "Gemma3.from_pretrained, or pass token ids to the analyses")
        return self.tokenizer.to_str_tokens(prompt, bos=bos)

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

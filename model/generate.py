"""Generation: continue a prompt token by token, with hooks active at every step.

Mixed into :class:`~interp.model.Gemma3`. :meth:`GenerateMixin.generate` returns one type, a
:class:`Generation` (the new token ids, their text per row, and the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ..hooks import HookRegistry, HookSpec, NonFiniteError
from .config import Gemma3Config
from .context import KVPrefix
from .inputs import InputError, is_text

END_OF_TURN_ID = 106


@dataclass
class Generation:
    """What :meth:`GenerateMixin.generate` returns.

    ``ids`` are the new tokens ``[batch, n]`` (rows that stopped early are padded with the pad
    id after their stop token), ``texts`` their decoded text per row (empty when the model has
    no tokenizer), ``prompt_ids`` the (left-padded) prompt ``[batch, s]``. ``text`` is the one
    row's text of a single prompt.
    """

    ids: torch.Tensor
    texts: list[str]
    prompt_ids: torch.Tensor

    @property
    def text(self) -> str:
        """The generated text of a single prompt (a batch has ``texts``)."""
        if len(self.texts) != 1:
            raise ValueError(f"this generation has {len(self.texts)} rows; read .texts (one string per row)")
        return self.texts[0]

    def __str__(self) -> str:
        return self.texts[0] if len(self.texts) == 1 else repr(self.texts)


class GenerateMixin:
    """``generate``."""

    cfg: Gemma3Config
    registry: HookRegistry
    tokenizer: Any

    if TYPE_CHECKING:  # provided by Gemma3
        @property
        def device(self) -> torch.device: ...
        def __call__(self, prompt: Any, *args: Any, **kwargs: Any) -> torch.Tensor: ...
        def to_tokens(self, prompt: Any, attention_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    @torch.no_grad()
    def generate(self, prompt: Any, max_new_tokens: int = 20, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None, stop_at_eos: bool = True,
                 hooks: HookSpec = None, attention_mask: torch.Tensor | None = None) -> Generation:
        """Continue ``prompt`` (greedy when ``temperature`` is 0), reusing keys and values.

        ``hooks`` stay active for every step (e.g. a steering vector). A left-padded batch of
        ids takes its ``attention_mask`` (a list of texts is left-padded for you). Stops early
        when every row has produced EOS or ``<end_of_turn>``. A step whose logits hold NaN or
        inf stops with a :class:`~interp.hooks.NonFiniteError` naming the first non-finite site.

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> m.generate(torch.tensor([[2, 3]]), max_new_tokens=3, stop_at_eos=False).ids.shape
        torch.Size([1, 3])
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"top_k must be a positive int (or None for the whole vocabulary), got {top_k!r}")
        ids, mask = self.to_tokens(prompt, attention_mask)
        if mask is not None and not bool(mask[:, -1].all()):
            raise InputError("generate() needs left padding (every row's last token real): new tokens follow "
                             "the last position; pad on the left, as a list of texts is padded for you")
        if ids.shape[1] + max_new_tokens > self.cfg.max_positions:
            raise InputError(f"{ids.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the model's "
                             f"{self.cfg.max_positions} positions")
        batch = ids.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        stops = torch.tensor([self.cfg.eos_token_id, END_OF_TURN_ID], device=self.device)
        full_mask = mask if mask is not None else torch.ones_like(ids)
        new: list[torch.Tensor] = []
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        prefix: KVPrefix | None = None
        step_in = ids
        with self.registry.scope(hooks):
            for _ in range(max_new_tokens):
                kv: dict = {}
                logits = self(step_in, full_mask, prefix=prefix, kv_out=kv, logits_at=[-1])[:, -1].float()
                if not bool(torch.isfinite(logits).all()):
                    from .finite import raise_non_finite

                    context = torch.cat([ids] + [t[:, None] for t in new], dim=1)  # what this step has seen
                    raise_non_finite(f"generate(): the logits of step {len(new) + 1}",
                                     partial(self, context, full_mask))
                token = self._next_token(logits, temperature, top_k, gen)
                token = torch.where(done, torch.full_like(token, self.cfg.pad_token_id), token)
                new.append(token)
                done = done | torch.isin(token, stops)
                if stop_at_eos and bool(done.all()):
                    break
                prefix = KVPrefix.from_kv(kv)
                step_in = token[:, None]
                full_mask = torch.cat((full_mask, torch.ones_like(token)[:, None]), dim=1)
        out = torch.stack(new, dim=1)
        texts: list[str] = []
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode([t for t in row.tolist() if t != self.cfg.pad_token_id]) for row in out]
        elif is_text(prompt):
            raise InputError("this model has no tokenizer to decode the generated tokens")
        return Generation(out.cpu(), texts, ids.cpu())

    @staticmethod
    def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                    gen: torch.Generator | None) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


__all__ = ["Generation", "GenerateMixin", "NonFiniteError"]

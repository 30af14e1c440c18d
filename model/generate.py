"""Generation: continue prompts token by token with a real key/value cache, hooks active at every
step, sampling options, stop conditions, streaming, chat, and the whole run's activations.

Mixed into :class:`~interp.model.Gemma3`. The prompt is run once (the prefill); each step then
runs one new token per row against a growing :class:`~interp.model.kvcache.KVCache`, so the cost
of a step does not grow with the generated length beyond attention over the held keys (bounded
by the window on sliding layers). A step moves data to the host once: the tokens, the stop flags
and a finiteness flag together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..hooks import HookSpec, NameSpec, Site, hook_pairs
from ..hooks.checks import is_int
from .cache import Gemma3Cache
from .inputs import InputError, Prompt, is_text
from .kvcache import KVCache
from .runs import RunsMixin
from .sampling import Sampler

# <end_of_turn> in Gemma 3's vocabulary (every released size). Only a model without a tokenizer uses
# it: with one, the tokenizer's own ids decide (see _stop_ids).
END_OF_TURN_ID = 106


@dataclass
class Generation:
    """What :meth:`GenerateMixin.generate` returns.

    ``ids`` are the new tokens ``[batch, n]`` (a row that stopped early is padded with the pad
    id after its stop token), ``texts`` their text per row (stop tokens and stop strings left
    out; empty when the model has no tokenizer), ``prompt_ids`` the (left-padded) prompt and
    ``prompt_mask`` its padding mask (None: no padding). ``stop_reasons`` says per row why it
    stopped: ``"eos"``, ``"end_of_turn"``, ``"stop string"`` or ``"max_new_tokens"``. ``cache``
    holds the activations of every step when ``generate(cache=...)`` asked for them. ``text``
    is the text of a single prompt.
    """

    ids: torch.Tensor
    texts: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor | None = None
    stop_reasons: list[str] = field(default_factory=list)
    cache: Gemma3Cache | None = None

    @property
    def text(self) -> str:
        """The generated text of a single prompt (a batch has ``texts``)."""
        if len(self.texts) != 1:
            raise ValueError(f"this generation has {len(self.texts)} rows; read .texts (one string per row)")
        return self.texts[0]

    @property
    def sequences(self) -> torch.Tensor:
        """Prompt and new tokens ``[batch, s + n]``."""
        return torch.cat((self.prompt_ids, self.ids), 1)

    def __str__(self) -> str:
        return self.texts[0] if len(self.texts) == 1 else repr(self.texts)


class _StepRecorder:
    """Collects the activations of every step at some sites and puts them together as one run's."""

    def __init__(self, names: list[str]):
        self.names = names
        self.parts: dict[str, list[tuple[torch.Tensor, Site]]] = {n: [] for n in names}

    def hook(self, x: torch.Tensor, site: Site) -> None:
        self.parts[site.name].append((x.detach().clone(), site))

    def assemble(self, total: int) -> Gemma3Cache:
        out = {}
        for name, parts in self.parts.items():
            if not parts:
                continue
            first, site = parts[0]
            ax = site.seq_axis % first.dim()
            if ax == first.dim() - 2 and site.head_axis is not None and site.head_axis % first.dim() == 1:
                # scores/pattern [b, h, q, k]: each step's keys start at its own key_offset
                full = first.new_zeros(*first.shape[:2], total, total)
                for x, s in parts:
                    q0, k0 = s.offset, s.key_offset
                    full[:, :, q0:q0 + x.shape[2], k0:k0 + x.shape[3]] = x
                out[name] = full
            else:
                out[name] = torch.cat([x for x, _ in parts], dim=ax)
        return Gemma3Cache(out)


class _Run:
    """One generation's state between steps."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor | None, sampler: Sampler,
                 max_new_tokens: int, stops: list[int], stop_strings: Sequence[str], stop_at_eos: bool):
        self.model, self.ids, self.mask, self.sampler = model, ids, mask, sampler
        self.max_new_tokens, self.stop_ids, self.stop_strings = max_new_tokens, stops, list(stop_strings)
        self.end_of_turn = next((t for t in stops if t != model.cfg.eos_token_id), None)
        self.stop_at_eos = stop_at_eos
        batch = ids.shape[0]
        self.kv = KVCache.empty(model.cfg, batch, model.dtype, model.device,
                                capacity=ids.shape[1] + max_new_tokens)
        self.new: list[torch.Tensor] = []  # device tokens [batch] per step
        self.host: list[list[int]] = [[] for _ in range(batch)]
        self.done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        self.done_host = [False] * batch
        self.reasons = ["max_new_tokens"] * batch
        self.texts = [""] * batch
        self.every_logit = False  # the prefill computes logits at every prompt position
        self.live_text = False  # decode the text after every step (streaming), not only at the end

    def context(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt and generated tokens so far, with their mask (for a rerun without the cache)."""
        ids = torch.cat([self.ids] + [t[:, None] for t in self.new], 1)
        if self.mask is None:
            return ids, None
        return ids, torch.cat((self.mask, self.mask.new_ones(self.mask.shape[0], len(self.new))), 1)

    def step(self) -> list[int]:
        """One forward and one token per row; returns the rows' new tokens (on the host)."""
        model = self.model
        if not self.new:  # the prefill: logits of the last prompt position only, unless recorded
            at = None if self.every_logit else [-1]
            logits = model(self.ids, self.mask, kv_cache=self.kv, logits_at=at)[:, -1].float()
        else:
            logits = model(self.new[-1][:, None], kv_cache=self.kv)[:, -1].float()
        finite = torch.isfinite(logits).all(-1)
        token = self.sampler.next(logits)
        token = torch.where(self.done, torch.full_like(token, model.cfg.pad_token_id), token)
        stop_now = torch.isin(token, torch.tensor(self.stop_ids, device=token.device)) & ~self.done
        # the one host sync of the step: tokens, stop flags and finiteness together
        packed = torch.stack((token, stop_now.long(), finite.long())).tolist()
        if not all(packed[2]):
            from .finite import raise_non_finite

            ids, mask = self.context()
            raise_non_finite(f"generate(): the logits of step {len(self.new) + 1}", partial(model, ids, mask))
        self.sampler.update(token)
        self.new.append(token)
        tokens: list[int] = packed[0]
        for row, (tok, stopped) in enumerate(zip(tokens, packed[1])):
            if self.done_host[row]:
                continue
            self.host[row].append(tok)
            if stopped and self.stop_at_eos:
                self.done_host[row] = True
                self.reasons[row] = "end_of_turn" if tok == self.end_of_turn else "eos"
        if self.stop_strings or self.live_text:  # else decoded once at the end (each decode reads every token)
            self._update_texts()
        if self.stop_at_eos:
            self.done = self.done | stop_now
        if self.stop_strings:
            self.done = self.done | torch.tensor(self.done_host, device=self.done.device)
        return tokens

    def _update_texts(self) -> None:
        tok = self.model.tokenizer
        if tok is None:
            return
        for row, host in enumerate(self.host):
            if self.reasons[row] == "stop string":
                continue
            kept = [t for t in host if t not in self.stop_ids and t != self.model.cfg.pad_token_id]
            text = tok.decode(kept)
            hits = [text.index(s) for s in self.stop_strings if s in text]
            if hits:
                text = text[:min(hits)]
                self.done_host[row] = True
                self.reasons[row] = "stop string"
            self.texts[row] = text

    @property
    def finished(self) -> bool:
        return all(self.done_host) or len(self.new) >= self.max_new_tokens


class GenerateMixin(RunsMixin):
    """``generate``, ``stream`` and ``chat``."""

    def _start(self, prompt: Prompt, max_new_tokens: int, attention_mask: torch.Tensor | None,
               sampling: dict[str, Any], stop: str | Sequence[str] | None, stop_at_eos: bool) -> _Run:
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        ids, mask = self.to_tokens_and_mask(prompt, attention_mask)
        if mask is not None and not bool(mask[:, -1].all()):
            raise InputError("generate() needs left padding (every row's last token real): new tokens follow "
                             "the last position; pad on the left, as a list of texts is padded for you")
        if ids.shape[1] + max_new_tokens > self.cfg.max_positions:
            raise InputError(f"{ids.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the model's "
                             f"{self.cfg.max_positions} positions")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise InputError(f"stop= takes non-empty strings, got {stop!r}")
        if stops and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer to read the text; this model has none")
        sampler = Sampler(**sampling, batch=ids.shape[0], device=self.device)
        sampler.observe(ids, self.cfg.vocab_size, mask)
        return _Run(self, ids, mask, sampler, max_new_tokens, self._stop_ids(), stops, stop_at_eos)

    def _stop_ids(self) -> list[int]:
        """EOS (the config's) and ``<end_of_turn>`` (the tokenizer's; Gemma 3's id without one)."""
        tokenizer_ids = getattr(self.tokenizer, "stop_ids", None)
        others = sorted(set(tokenizer_ids) - {self.cfg.eos_token_id}) if tokenizer_ids else [END_OF_TURN_ID]
        return [self.cfg.eos_token_id, *others]

    def _finish(self, run: _Run, prompt: Prompt) -> Generation:
        out = torch.stack(run.new, dim=1).cpu()
        if self.tokenizer is None and is_text(prompt):
            raise InputError("this model has no tokenizer to decode the generated tokens")
        if self.tokenizer is not None:
            run._update_texts()
        texts = run.texts if self.tokenizer is not None else []
        mask = None if run.mask is None else run.mask.cpu()
        return Generation(out, texts, run.ids.cpu(), mask, list(run.reasons))

    @torch.no_grad()
    def generate(self, prompt: Prompt, max_new_tokens: int = 20, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int | Sequence[int] | None = None, stop: str | Sequence[str] | None = None,
                 stop_at_eos: bool = True, hooks: HookSpec = None, attention_mask: torch.Tensor | None = None,
                 cache: NameSpec = None, streamer: Callable[[str], Any] | None = None) -> Generation:
        """Continue ``prompt`` (text, a list of texts, or left-padded ids with ``attention_mask``).

        Sampling: greedy when ``temperature`` is 0, else ``top_k``, ``top_p``, ``min_p`` and
        ``repetition_penalty`` as in :class:`~interp.model.sampling.Sampler`; ``seed`` is one int
        or one per row. A row stops at EOS or ``<end_of_turn>`` (unless ``stop_at_eos=False``), or
        when its text contains one of the ``stop`` strings (the text is cut before it). ``hooks``
        stay active for every step; each hook is told the positions its tensor covers
        (``site.offset``), so interventions with ``positions=slice(p, None)`` act from position
        ``p`` on, generated tokens included. ``cache`` (site names) returns the activations of
        the whole run in ``Generation.cache``, as if prompt and generated tokens had been run
        at once. ``streamer`` is called with each new piece of text (a single prompt).

        >>> from interp.model import Gemma3, Gemma3Config
        >>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1,
        ...     n_kv_heads=1, d_head=8, vocab_size=9))
        >>> m.generate(torch.tensor([[2, 3]]), max_new_tokens=3, stop_at_eos=False).ids.shape
        torch.Size([1, 3])
        """
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, seed=seed)
        run = self._start(prompt, max_new_tokens, attention_mask, sampling, stop, stop_at_eos)
        recorder = None
        pairs = hook_pairs(hooks)
        if cache is not None:
            recorder = _StepRecorder(self._run_names(cache, run.ids, {}))
            pairs.append((recorder.names, recorder.hook))
            run.every_logit = any(n in ("final_norm", "logits") for n in recorder.names)
        if streamer is not None and run.ids.shape[0] != 1:
            raise InputError("streamer= streams the text of one prompt; this batch has "
                             f"{run.ids.shape[0]}")
        shown = ""
        run.live_text = streamer is not None
        with self.registry.scope(pairs):
            while not run.finished:
                run.step()
                if streamer is not None:
                    shown = _emit(run.texts[0], shown, streamer)
            if recorder is not None:  # the last tokens have not been read by a step yet
                self(run.new[-1][:, None], kv_cache=run.kv)
        result = self._finish(run, prompt)
        if streamer is not None:
            _emit(result.texts[0], shown, streamer, final=True)
        if recorder is not None:
            result.cache = recorder.assemble(result.sequences.shape[1])
        return result

    def stream(self, prompt: Prompt, max_new_tokens: int = 20, **kwargs: Any) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece, as it is generated
        (the options of :meth:`generate`).

        >>> for piece in m.stream("The capital of France is", max_new_tokens=8):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        if "cache" in kwargs or "streamer" in kwargs:
            raise InputError("stream() yields text only; use generate(cache=..., streamer=...) for more")
        sampling: dict[str, Any] = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p", "min_p",
                                                        "repetition_penalty", "seed")
                    if k in kwargs}
        stop, stop_at_eos = kwargs.pop("stop", None), kwargs.pop("stop_at_eos", True)
        hooks, mask = kwargs.pop("hooks", None), kwargs.pop("attention_mask", None)
        if kwargs:
            raise TypeError(f"stream() got unexpected options {sorted(kwargs)}")
        pieces: list[str] = []
        state = self._start(prompt, max_new_tokens, mask, sampling, stop, stop_at_eos)
        if state.ids.shape[0] != 1:
            raise InputError(f"stream() takes one prompt, got a batch of {state.ids.shape[0]}; use generate()")
        if self.tokenizer is None:
            raise InputError("stream() yields text and this model has no tokenizer")
        shown = ""
        state.live_text = True
        with torch.no_grad(), self.registry.scope(hooks):
            while not state.finished:
                state.step()
                shown = _emit(state.texts[0], shown, pieces.append)
                yield from pieces
                pieces.clear()
        _emit(state.texts[0], shown, pieces.append, final=True)
        yield from pieces

    def chat(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 128, **kwargs: Any) -> Generation:
        """The model's reply to a conversation in Gemma 3's turn format (``<start_of_turn>user``
        ... ``<end_of_turn>``; a system message is folded into the first user turn); stops at
        ``<end_of_turn>``. Options as :meth:`generate`.

        >>> reply = m.chat([{"role": "user", "content": "Name a colour."}])  # doctest: +SKIP
        >>> reply.text  # doctest: +SKIP
        """
        if self.tokenizer is None:
            raise InputError("chat() needs a tokenizer")
        ids = torch.tensor([self.tokenizer.encode_chat(messages, add_generation_prompt=True)])
        return self.generate(ids, max_new_tokens, **kwargs)


def _emit(text: str, shown: str, sink: Callable[[str], Any], final: bool = False) -> str:
    """Send the part of ``text`` not yet shown (holding back a trailing half-decoded character)."""
    if not final and text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
    if text.startswith(shown) and len(text) > len(shown):
        sink(text[len(shown):])
        return text
    return shown


__all__ = ["Generation", "GenerateMixin", "END_OF_TURN_ID"]

"""Tokens as analyses see them: targets given as text or ids, token strings for labels, one
prompt at a time, and the one shape every ``top()`` returns.

>>> from interp.model import Gemma3, Gemma3Config
>>> m = Gemma3.from_config(Gemma3Config(n_layers=1, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8,
...                                     vocab_size=9))
>>> token_id(m, 4), str_tokens(m, [2, 5])
(4, ['2', '5'])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .model import Gemma3
from .model.inputs import Prompt

Target = str | int
"""A token given as text (``" Paris"``: its first token without BOS) or as an id."""


class MultiTokenWarning(UserWarning):
    """A target string that encodes to several tokens; its first token is used."""


class Top(NamedTuple):
    """One entry of every ``top()``: the index into the result's values, the value, a readable label.

    >>> Top((5, 1), 0.88, "L5H1").label
    'L5H1'
    """

    index: tuple[int, ...]  # type: ignore[assignment]  # (shadows tuple.index, as namedtuples allow)
    value: float
    label: str


def token_id(model: Gemma3, target: Target) -> int:
    """One token id for ``target``: an int is checked against the vocabulary; a string is
    encoded without BOS, and must be one token. A string of several tokens (``" 東京"`` ->
    ``' 東'``, ``'京'``) uses its first token and warns with :class:`MultiTokenWarning`, naming
    the token used.
    """
    vocab = model.cfg.vocab_size
    if isinstance(target, torch.Tensor):
        target = int(target)
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise TypeError(f"a target is a token string or a token id, got {type(target).__name__}")
    if isinstance(target, int):
        if not 0 <= target < vocab:
            raise ValueError(f"target id {target} is outside the vocabulary [0, {vocab})")
        return target
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(f"target {target!r} is a string but the model has no tokenizer; pass a token id")
    if not target:
        raise ValueError("a target string must not be empty")
    ids = list(tok.encode(target))
    if ids and ids[0] == model.cfg.bos_token_id:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"target {target!r} encodes to no token")
    if len(ids) > 1:
        pieces = str_tokens(model, ids)
        warnings.warn(f"target {target!r} is {len(ids)} tokens {pieces}; using its first token {pieces[0]!r} "
                      "(pass a single token, or its id, to silence this)", MultiTokenWarning, stacklevel=3)
    return int(ids[0])


def token_ids(model: Gemma3, targets: Sequence[Target] | Target | None) -> list[int]:
    """:func:`token_id` of each target (one target may be given bare)."""
    if targets is None:
        return []
    if isinstance(targets, (str, int)):
        targets = [targets]
    return [token_id(model, t) for t in targets]


def str_tokens(model: Gemma3, ids: Any) -> list[str]:
    """The text of each token id (not yet escaped): the model's tokenizer ``to_str_tokens``,
    else ``decode`` per id, else the ids as strings (a model without a tokenizer).

    >>> str_tokens(None, [2, 5])
    ['2', '5']
    """
    ids = [int(i) for i in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
    tok = getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "to_str_tokens"):
        out = list(tok.to_str_tokens(ids))
        if len(out) == len(ids):
            return [str(t) for t in out]
    if tok is not None and hasattr(tok, "decode"):
        return [str(tok.decode([i])) for i in ids]
    return [str(i) for i in ids]


def single_prompt(model: Gemma3, prompt: Prompt) -> torch.Tensor:
    """Token ids ``[1, seq]`` of one unpadded prompt (text or ids); a batch is an error."""
    ids, mask = model.to_tokens_and_mask(prompt)
    if ids.shape[0] != 1 or mask is not None:
        raise ValueError(f"pass one prompt (got a batch of {ids.shape[0]}); run the analysis once per prompt")
    return ids


def layer_labels(cfg: Any) -> list[str]:
    """Row labels of a per-stage result: ``embed``, then ``L{i}`` per layer, global-attention
    layers marked ``L{i} (global)`` (the others use the sliding window).

    >>> from interp.model import Gemma3Config
    >>> layer_labels(Gemma3Config(n_layers=6, d_model=8, d_mlp=8, n_heads=1, n_kv_heads=1, d_head=8, vocab_size=9))
    ['embed', 'L0', 'L1', 'L2', 'L3', 'L4', 'L5 (global)']
    """
    return ["embed"] + [f"L{i}" + (" (global)" if cfg.is_global(i) else "") for i in range(cfg.n_layers)]


def top_entries(values: torch.Tensor, k: int, labels: Any, by_abs: bool = True) -> list[Top]:
    """The ``k`` entries of ``values`` with the largest ``|value|`` (or value), as :class:`Top`,
    largest first; ``labels(index) -> str`` names each.

    >>> [t.index for t in top_entries(torch.tensor([[1.0, -3.0], [2.0, 0.0]]), 2, str)]
    [(0, 1), (1, 0)]
    """
    flat = values.detach().float().flatten().nan_to_num(0.0).cpu()
    order = (flat.abs() if by_abs else flat).argsort(descending=True)[:max(0, int(k))]
    out = []
    for j in order.tolist():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(j), tuple(values.shape)))
        out.append(Top(index, float(flat[j]), labels(index)))
    return out


__all__ = ["Target", "Top", "MultiTokenWarning", "token_id", "token_ids", "str_tokens", "single_prompt",
           "layer_labels", "top_entries"]

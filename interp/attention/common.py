"""What the attention analyses share: random token batches, layer lists, and the one cached run of patterns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..hooks import HookSpec, partial_run
from ..model import Gemma3
from ..model.finite import check_finite
from ..model.inputs import Prompt
from ..model.sites import block_site

GEMMA3_LAST_NORMAL_ID = 255_967  # Gemma 3 tokenizer: later ids are tab runs, image and <unused> tokens
MAX_HOVER_TOKENS = 200  # per-cell hover text only up to this many tokens (s^2 strings per head)


def random_token_range(cfg: Any) -> tuple[int, int]:
    """``[low, high)`` ids to sample random tokens from, avoiding special ids.

    A large vocabulary skips its first 1000 ids (Gemma keeps pad/eos/bos/unk, ``<unused>``
    and chat-control tokens there); the Gemma 3 vocabulary (>= 256000 ids) also stops at
    255968, where tab runs, image markers and ~6000 more ``<unused>`` tokens begin. A tiny
    vocabulary skips only the pad/eos/bos ids.

    >>> from interp.model import Gemma3Config
    >>> random_token_range(Gemma3Config.preset("1b")), random_token_range(Gemma3Config(vocab_size=100))
    ((1000, 255968), (3, 100))
    """
    if cfg.vocab_size >= 256_000:
        return 1000, GEMMA3_LAST_NORMAL_ID + 1
    if cfg.vocab_size >= 2000:
        return 1000, cfg.vocab_size
    return max(cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) + 1, cfg.vocab_size


def repeated_random_tokens(model_or_cfg: Any, seq_len: int = 50, batch_size: int = 4, seed: int = 0, *,
                           repeats: int = 2, bos: bool = True, low: int | None = None,
                           high: int | None = None) -> torch.Tensor:
    """``BOS + r * repeats`` per row: ``[batch_size, bos + repeats * seq_len]`` token ids.

    ``r`` is ``seq_len`` distinct ids drawn (seeded) from ``[low, high)`` (default
    :func:`random_token_range`), so every repeat of a token is an exact copy of one earlier
    position. ``repeats=1`` gives plain random tokens.

    >>> from interp.model import Gemma3Config
    >>> t = repeated_random_tokens(Gemma3Config(vocab_size=100), seq_len=3, batch_size=1)
    >>> t.shape, bool((t[0, 1:4] == t[0, 4:7]).all()), int(t[0, 0])
    (torch.Size([1, 7]), True, 2)
    """
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    lo, hi = random_token_range(cfg)
    lo, hi = (lo if low is None else low), (hi if high is None else high)
    if seq_len < 1 or batch_size < 1 or repeats < 1:
        raise ValueError(f"seq_len, batch_size and repeats must be positive, got {seq_len}, {batch_size}, {repeats}")
    if seq_len > hi - lo:
        raise ValueError(f"cannot draw {seq_len} distinct tokens from ids [{lo}, {hi}); use a shorter seq_len")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(hi - lo, generator=gen)[:seq_len] + lo for _ in range(batch_size)])
    out = rows.repeat(1, repeats)
    if bos:
        out = torch.cat((torch.full((batch_size, 1), cfg.bos_token_id, dtype=torch.long), out), dim=1)
    return out


def as_tokens(model: Gemma3, prompt: Prompt) -> torch.Tensor:
    """Unpadded token ids ``[batch, seq]`` of a prompt (attention analyses need no padding)."""
    ids, mask = model.to_tokens_and_mask(prompt)
    if mask is not None:
        raise ValueError("attention analyses need unpadded input: pass one prompt, or token ids "
                         "of equal length [batch, seq]")
    return ids


def layer_list(model: Gemma3, layers: int | Sequence[int] | None) -> list[int]:
    """Sorted layer indices (all when None), checked against the model."""
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    layers = [layers] if isinstance(layers, int) else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} are outside 0..{n - 1}")
    return sorted(set(layers))


@torch.no_grad()
def patterns_of(model: Gemma3, tokens: torch.Tensor, layers: list[int],
                hooks: HookSpec = None) -> dict[int, torch.Tensor]:
    """``{layer: pattern [b, h, s, s]}``; runs only up to the last requested layer (hooks of
    enclosing scopes on later layers are not needed for these patterns and do not fire)."""
    names = [block_site(i, "attn.pattern") for i in layers]

    def run() -> Any:
        with partial_run():
            return model.run_with_cache(tokens, names, hooks=hooks, stop_at_layer=max(layers) + 1)[1]

    cache = run()
    for i in layers:
        check_finite(cache[block_site(i, "attn.pattern")], f"the attention pattern of layer {i}", run)
    return {i: cache[block_site(i, "attn.pattern")] for i in layers}


def layer_label(cfg: Any, layer: int) -> str:
    """``L5 global`` / ``L4 local``."""
    return f"L{layer} global" if cfg.is_global(layer) else f"L{layer} local"


def layer_title(cfg: Any, layer: int) -> str:
    """``layer 5 (global)`` / ``layer 4 (local, window 512)``."""
    return f"layer {layer} (global)" if cfg.is_global(layer) else f"layer {layer} (local, window {cfg.window})"



__all__ = ["GEMMA3_LAST_NORMAL_ID", "MAX_HOVER_TOKENS", "random_token_range", "repeated_random_tokens", "as_tokens",
           "layer_list", "patterns_of", "layer_label", "layer_title"]

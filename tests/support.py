"""Helpers shared by the test folders (fixtures built on them live in ``conftest.py``).

- ``TINY``: the 6-layer test configuration (GQA 4/2, window 4 < the test sequences, layer 5 global).
- ``make_model(cfg)``: random weights; ``sensitive=True`` rescales them so that logits, attention
  and patching effects are large (parity and patching tests need a model that is not near-uniform).
- ``FakeTokenizer``: token i is ``vocab[i]``; holds a ``<script>`` and a newline token for escaping tests.
"""

from __future__ import annotations

import torch

from interp.model import Gemma3, Gemma3Config

SCRIPT = "<script>alert(1)</script>"

TINY = Gemma3Config(n_layers=6, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, d_head=8, vocab_size=100, window=4)


def make_model(cfg: Gemma3Config = TINY, seed: int = 0, dtype: torch.dtype = torch.float32, *,
               sensitive: bool = False, tokenizer: object = None) -> Gemma3:
    """``Gemma3.from_config``; ``sensitive`` scales the embedding by 50 (logits ~ sqrt(d_model)) and
    adds 1 to the q/k norm weights (attention scores ~4x larger)."""
    m = Gemma3.from_config(cfg, seed=seed, tokenizer=tokenizer)
    if sensitive:
        with torch.no_grad():
            m.embed.weight.mul_(50.0)
            for block in m.blocks:
                block.attn.q_norm.weight.add_(1.0)
                block.attn.k_norm.weight.add_(1.0)
    return m.to(dtype)


class FakeTokenizer:
    """Token i is ``vocab[i]``; ``encode`` splits on '|' and prepends BOS, like a real tokenizer."""

    def __init__(self, n: int):
        self.vocab = [f" w{i}" for i in range(n)]
        self.vocab[:3] = ["<pad>", "<eos>", "<bos>"]
        self.vocab[7] = SCRIPT
        self.vocab[8] = "a\nb"

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([2] if bos else []) + [self.vocab.index(piece) for piece in text.split("|")]

    def batch_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask, like the real tokenizer."""
        rows = [self.encode(t) for t in texts]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
        return ids, mask

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)

    def to_str_tokens(self, ids, bos: bool = True) -> list[str]:
        ids = self.encode(ids, bos) if isinstance(ids, str) else ids
        return [self.vocab[int(i)] for i in ids]

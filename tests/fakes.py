"""Test doubles shared by several test modules."""

from __future__ import annotations

SCRIPT = "<script>alert(1)</script>"


class FakeTokenizer:
    """Token i is ``vocab[i]``; ``encode`` splits on '|' and prepends BOS, like a real tokenizer."""

    def __init__(self, n: int):
        self.vocab = [f" w{i}" for i in range(n)]
        self.vocab[:3] = ["<pad>", "<eos>", "<bos>"]
        self.vocab[7] = SCRIPT
        self.vocab[8] = "a\nb"

    def encode(self, text: str) -> list[int]:
        return [2] + [self.vocab.index(piece) for piece in text.split("|")]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)

    def to_str_tokens(self, ids) -> list[str]:
        return [self.vocab[i] for i in ids]

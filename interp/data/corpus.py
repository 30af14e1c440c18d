"""A corpus: documents from a list, a file or an iterator, tokenized into fixed-length rows.

Sources:

- a list (or any iterable) of strings, one document each;
- a ``.txt`` file: one document per blank-line-separated block (``split="blank"``, the default)
  or one per line (``split="line"``);
- a ``.jsonl`` file: one JSON object per line, the document in its ``text`` field (``field=``).

Rows (``context`` tokens each, BOS first). With ``pack=True`` (the default) documents are
tokenized without BOS, joined, and cut into rows of ``context - 1`` tokens, each row then starting
with BOS: every row is full, and a document may continue across rows (its tokens keep their
positions in the document, so any activation traces back to its text). With ``pack=False``,
each document is one row, cut after ``context`` tokens and padded to ``context`` (padding is
marked in the row index and never harvested as data).

The row index says, for every token of every row, which document it came from (``doc``, -1 for
the BOS that starts a row, -2 for padding) and its token index in that document (``pos``).
Everything is deterministic: the same documents and settings give the same rows.

>>> from interp.data.corpus import Corpus
>>> c = Corpus(["one two", "three"])
>>> c.identity()[:8] == Corpus(["one two", "three"]).identity()[:8]
True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..hooks.checks import is_int

BOS_DOC, PAD_DOC = -1, -2


class CorpusError(ValueError):
    """A corpus that cannot be read (a missing file, bad JSON, no text field, no documents)."""


@dataclass
class Rows:
    """A tokenized corpus: ``ids``, ``doc`` and ``pos`` are ``[rows, context]`` (see the module docs)."""

    ids: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    context: int
    packed: bool
    n_docs: int

    @property
    def n_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def mask(self) -> torch.Tensor:
        """1 where a row holds a token (BOS or text), 0 on padding."""
        return (self.doc != PAD_DOC).long()

    def n_tokens(self) -> int:
        """Tokens that are not padding."""
        return int(self.mask.sum())


class Corpus:
    """Documents to harvest, read lazily from ``source`` (see the module docstring)."""

    def __init__(self, source: str | os.PathLike | Iterable[str], *, split: str = "blank", field: str = "text",
                 name: str | None = None):
        if split not in ("blank", "line"):
            raise CorpusError(f"split must be 'blank' or 'line', got {split!r}")
        self.split, self.field = split, field
        self.path: Path | None = None
        self._texts: list[str] | None = None
        if isinstance(source, (str, os.PathLike)) and not (isinstance(source, str) and "\n" in source):
            self.path = Path(source)
            if not self.path.is_file():
                raise CorpusError(f"no corpus file at {self.path} (a .txt or .jsonl file, or pass a list of texts)")
            if self.path.suffix not in (".txt", ".jsonl"):
                raise CorpusError(f"{self.path.name}: a corpus file is .txt or .jsonl")
            self.name = name or self.path.name
        else:
            if isinstance(source, str):
                raise CorpusError("a corpus is a list of texts or a file path, not one string")
            self._texts = [str(t) for t in source]
            self.name = name or f"{len(self._texts)} texts"

    def __repr__(self) -> str:
        held = f"{len(self._texts)} documents in memory" if self._texts is not None else f"file {self.path}"
        return f"Corpus({self.name!r}, {held})"

    def documents(self) -> Iterator[str]:
        """The documents, in order (empty ones skipped)."""
        if self._texts is not None:
            yield from (t for t in self._texts if t.strip())
            return
        assert self.path is not None
        with open(self.path, encoding="utf-8") as f:
            if self.path.suffix == ".jsonl":
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CorpusError(f"{self.path}:{n} is not JSON ({e})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(self.field), str):
                        raise CorpusError(f"{self.path}:{n} has no string field {self.field!r}")
                    if obj[self.field].strip():
                        yield obj[self.field]
            elif self.split == "line":
                yield from (line.rstrip("\n") for line in f if line.strip())
            else:
                block: list[str] = []
                for line in f:
                    if line.strip():
                        block.append(line.rstrip("\n"))
                    elif block:
                        yield "\n".join(block)
                        block = []
                if block:
                    yield "\n".join(block)

    def identity(self) -> str:
        """A sha256 of the documents (what they say, not where they came from)."""
        h = hashlib.sha256()
        for doc in self.documents():
            h.update(doc.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """Name, reading options and identity (for a harvest's manifest)."""
        return {"name": self.name, "split": self.split, "field": self.field, "sha256": self.identity()}

    def rows(self, tokenizer: Any, context: int, *, pack: bool = True, bos_id: int = 2, pad_id: int = 0,
             max_tokens: int | None = None) -> Rows:
        """Tokenize into rows of ``context`` tokens (see the module docstring); stop once
        ``max_tokens`` tokens (padding excluded) are in the rows."""
        if not is_int(context) or context < 2:
            raise CorpusError(f"context must be an int of at least 2 (BOS and one token), got {context!r}")
        ids: list[list[int]] = []
        doc: list[list[int]] = []
        pos: list[list[int]] = []
        limit = max_tokens if max_tokens is not None else float("inf")
        total, n_docs = 0, 0
        if pack:
            buf_ids: list[int] = []
            buf_doc: list[int] = []
            buf_pos: list[int] = []
            for d, text in enumerate(self.documents()):
                n_docs = d + 1
                toks = tokenizer.encode(text, bos=False)
                buf_ids += toks
                buf_doc += [d] * len(toks)
                buf_pos += range(len(toks))
                while len(buf_ids) >= context - 1 and total + context <= limit:
                    ids.append([bos_id] + buf_ids[:context - 1])
                    doc.append([BOS_DOC] + buf_doc[:context - 1])
                    pos.append([0] + buf_pos[:context - 1])
                    del buf_ids[:context - 1], buf_doc[:context - 1], buf_pos[:context - 1]
                    total += context
                if total + context > limit:
                    break
        else:
            for d, text in enumerate(self.documents()):
                n_docs = d + 1
                toks = tokenizer.encode(text, bos=False)[:context - 1]
                n = len(toks) + 1
                if total + n > limit:
                    break
                ids.append([bos_id] + toks + [pad_id] * (context - n))
                doc.append([BOS_DOC] + [d] * len(toks) + [PAD_DOC] * (context - n))
                pos.append([0] + list(range(len(toks))) + [0] * (context - n))
                total += n
        if not ids:
            raise CorpusError(f"corpus {self.name!r} gives no row of {context} tokens"
                              + (" (pack=True needs at least context - 1 tokens in all)" if pack else ""))
        return Rows(torch.tensor(ids, dtype=torch.long), torch.tensor(doc, dtype=torch.int32),
                    torch.tensor(pos, dtype=torch.int32), context, pack, n_docs)


__all__ = ["Corpus", "CorpusError", "Rows", "BOS_DOC", "PAD_DOC"]

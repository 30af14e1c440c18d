"""Offline corpora that need no download and copy no text into the repository.

- :func:`stdlib_corpus`: the docstrings of the Python standard library installed with this
  interpreter, read by parsing its source files (nothing is imported). English prose about
  programming, with some code: small (a few MB) and not a pretraining distribution, but real
  text, the same on every machine with the same Python version, and enough to harvest, probe,
  fit a tuned lens or train a small dictionary.
- :func:`sentence_pairs`: labelled sentences built from word lists written for this project
  (questions and statements about the same facts), for probes and steering vectors.

>>> docs = list(stdlib_corpus(max_docs=3).documents())
>>> len(docs), all(len(d) >= 200 for d in docs)
(3, True)
>>> texts, labels = sentence_pairs(4, seed=0)
>>> labels
[1, 0, 1, 0]
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

from .corpus import Corpus

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo", "lib2to3"}


def stdlib_docstrings(min_chars: int = 200, max_docs: int | None = None) -> list[str]:
    """Docstrings (of modules, classes and functions) of at least ``min_chars`` characters from
    the standard library's ``.py`` files, in a fixed order (sorted paths, then source order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    out.append(doc)
                    if max_docs is not None and len(out) >= max_docs:
                        return out
    return list(dict.fromkeys(out))  # the same docstring in two places: once


def stdlib_corpus(min_chars: int = 200, max_docs: int | None = None) -> Corpus:
    """The standard library's docstrings as a :class:`~interp.data.corpus.Corpus`
    (see :func:`stdlib_docstrings`)."""
    return Corpus(stdlib_docstrings(min_chars, max_docs), name=f"python-stdlib-docstrings (min {min_chars} chars)")


_THINGS = ["the river", "the old bridge", "the red kite", "the library", "the kettle", "the market", "the winter",
           "the violin", "the garden wall", "the train", "the lighthouse", "the recipe", "the tower clock",
           "the harbour", "the mountain path", "the small dog", "the museum", "the storm", "the letter", "the orchard"]
_STATES = ["very quiet", "too cold", "still open", "made of stone", "older than the town", "painted blue",
           "hard to find", "full of people", "out of order", "close to the sea", "broken again", "worth a visit",
           "on the left", "bigger than it looks", "ready by noon", "safe at night"]
_WHEN = ["today", "this morning", "in the evening", "every year", "after the rain", "right now", "at the moment", ""]


def sentence_pairs(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` short sentences, alternately a question (label 1) and a statement (label 0) about the
    same made-up fact, e.g. ``"Is the river very quiet today?"`` / ``"The river is very quiet
    today."``; deterministic with ``seed``."""
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[int] = []
    while len(texts) < n:
        thing, state, when = rng.choice(_THINGS), rng.choice(_STATES), rng.choice(_WHEN)
        tail = f" {when}" if when else ""
        texts.append(f"Is {thing} {state}{tail}?")
        labels.append(1)
        if len(texts) < n:
            texts.append(f"{thing[0].upper()}{thing[1:]} is {state}{tail}.")
            labels.append(0)
    return texts, labels


__all__ = ["stdlib_docstrings", "stdlib_corpus", "sentence_pairs"]

"""Data at scale: corpora, harvesting activations to disk (kill-safe, on one process or many),
and reading them back memory-mapped.

>>> from interp.data import Corpus, harvest, ActivationStore, stdlib_corpus, sentence_pairs
"""

from .corpus import Corpus, CorpusError, Rows
from .default import sentence_pairs, stdlib_corpus, stdlib_docstrings
from .distributed import Group
from .harvest import HarvestError, harvest, model_fingerprint
from .store import ActivationStore, SiteView, StoreError

__all__ = ["Corpus", "CorpusError", "Rows", "harvest", "HarvestError", "model_fingerprint", "ActivationStore",
           "SiteView", "StoreError", "Group", "stdlib_corpus", "stdlib_docstrings", "sentence_pairs"]

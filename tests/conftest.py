"""Shared fixtures. Tests mirror the packages: ``tests/model``, ``tests/hooks``, and ``tests/analysis`` for ``interp``
(a folder named ``interp`` on ``sys.path`` would shadow the package).

- ``tiny_model``: a model of ``support.TINY`` (6 layers, GQA, window 4), shared per module; tests
  that change weights build their own with ``support.make_model``.
- ``fake_tokenizer``: ``support.FakeTokenizer`` (token text with ``<script>`` and newlines).
- ``demo_model``: the real Gemma 3 270M in fp32, loaded once per session; ``hf_gguf_model`` and
  ``hf_gguf_tokenizer``: transformers' own loading of the same GGUF, the reference.

Nothing here skips: the demo model and transformers are dev dependencies, and a test that
silently skipped would hide exactly the checks that prove this is Gemma 3.

Tests that use the demo model, transformers' GGUF loading, a subprocess or a notebook are
marked ``slow`` automatically: ``pytest -m "not slow"`` runs the rest in about a minute (CI
runs everything).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # support and hf_reference, for every test folder

import support  # noqa: E402

# The suite is dominated by tiny models, where a second thread costs more than it gives on a
# 2-core machine (and much more when the machine is shared).
torch.set_num_threads(1)

SLOW_FIXTURES = {"demo_model", "demo_path", "demo_gguf", "hf_gguf_model", "hf_gguf_tokenizer"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SLOW_FIXTURES or item.get_closest_marker("subprocess"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def tiny_model():
    """A :data:`support.TINY` model with random weights (seed 0); treat it as read-only."""
    model = support.make_model(support.TINY)
    yield model
    assert not model.registry.active, "a test left hooks on the shared tiny model"


@pytest.fixture
def fake_tokenizer() -> support.FakeTokenizer:
    """Token i is ``' w{i}'``; id 7 is a ``<script>`` tag and id 8 holds a newline."""
    return support.FakeTokenizer(support.TINY.vocab_size)


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The converted demo directory (config.json, model.safetensors, tokenizer.model).

    Uses the real default cache (``demo_dir()``), so only the first run ever pays for the
    conversion.
    """
    from interp.model.demo import demo_dir

    return demo_dir()


@pytest.fixture(scope="session")
def demo_gguf(demo_path: Path) -> Path:
    """The assembled Gemma 3 270M Q4_K_M GGUF that ``demo_path`` was converted from."""
    from interp.model.demo import demo_gguf_path

    return demo_gguf_path()


@pytest.fixture(scope="session")
def demo_model(demo_path: Path):
    """The real Gemma 3 270M in fp32, shared by every test (treat it as read-only: tests
    that hook it use scopes, which always clean up)."""
    from interp.model import Gemma3

    model = Gemma3.from_pretrained("demo")
    yield model
    assert not model.registry.active, "a test left hooks on the shared demo model"


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(demo_gguf: Path):
    """transformers' own tokenizer for the demo GGUF (``AutoTokenizer.from_pretrained(gguf_file=)``)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(demo_gguf.parent), gguf_file=demo_gguf.name)


@pytest.fixture(scope="session")
def hf_gguf_model(demo_gguf: Path):
    """transformers' ``Gemma3ForCausalLM`` loaded from the same GGUF (fp32, eager attention)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(demo_gguf.parent), gguf_file=demo_gguf.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()

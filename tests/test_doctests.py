"""Every docstring example in the package runs (the installed modules, by their installed names).

pytest's own ``--doctest-modules`` would import ``model/`` and ``hooks/`` by their folder names,
not as ``interp.model`` and ``interp.hooks``; this walks the installed package instead.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import interp
import interp.hooks
import interp.model


def _modules() -> list[str]:
    # interp.model and interp.hooks live in other folders (package-dir): walk each package's own path
    names = {"interp", "interp.model", "interp.hooks"}
    for pkg in (interp, interp.model, interp.hooks):
        names.update(m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))
    return sorted(n for n in names if not n.endswith("__main__"))


MODULES = _modules()
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def test_every_subpackage_is_found():
    names = set(MODULES)
    for pkg in ("interp.model", "interp.hooks", "interp.patching", "interp.attention", "interp.model.gemma3"):
        assert pkg in names


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    globs = {"torch": __import__("torch")}
    for test in finder.find(module, name, globs=dict(module.__dict__, **globs)):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name} (see the output above)"

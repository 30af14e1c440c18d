"""docs/api.md lists every public name (each package's ``__all__``) as the code has it today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import interp

ROOT = Path(__file__).resolve().parents[1]


def _make_api():
    spec = importlib.util.spec_from_file_location("make_api", ROOT / "docs" / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_page_is_current():
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert page == _make_api().page(), "regenerate it: python docs/make_api.py"


def test_every_top_level_name_is_on_the_page():
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    section = page.split("## `interp`", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in interp.__all__ if f"| `{name}" not in section]
    assert not missing, missing


def test_every_public_name_exists():
    for package in _make_api().PACKAGES:
        module = importlib.import_module(package)
        assert all(hasattr(module, name) for name in module.__all__), package

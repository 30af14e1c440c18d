"""What a person sees: figures rendered by a real browser (headless Chromium), read back from the DOM.

The ``&quot;`` bug was only visible this way: the HTML source was fine, plotly's renderer showed
the escape literally. These tests write figures as offline HTML, let Chromium run plotly.js, and
read the text plotly drew into the SVG (tick labels, titles, cell text).

Chromium comes from Debian (``apt-get install chromium``; ``.ci/run`` installs it and sets
``INTERP_REQUIRE_BROWSER=1``, so in CI a missing browser fails instead of skipping).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from support import SCRIPT, TINY, FakeTokenizer, make_model

import interp
from interp.plots import heatmap

pytestmark = pytest.mark.subprocess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> str:
    if CHROMIUM is None:
        if os.environ.get("INTERP_REQUIRE_BROWSER"):
            pytest.fail("INTERP_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium); CI installs it")
    return CHROMIUM


class _SvgText(HTMLParser):
    """Collects the text content of SVG ``<text>`` elements by the class of their enclosing group."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[str | None] = []
        self.current: list[str] | None = None
        self.owner: str | None = None
        self.texts: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class")
        if tag == "text":
            self.current, self.owner = [], cls or next((g for g in reversed(self.groups) if g), None)
        self.groups.append(cls)

    def handle_endtag(self, tag: str) -> None:
        if self.groups:
            self.groups.pop()
        if tag == "text" and self.current is not None:
            self.texts.setdefault(self.owner or "", []).append("".join(self.current))
            self.current = None

    def handle_data(self, data: str) -> None:
        if self.current is not None:
            self.current.append(data)


def rendered_text(browser: str, fig, tmp_path: Path) -> dict[str, list[str]]:
    """``{svg group class: [displayed text, ...]}`` of ``fig`` as Chromium draws it."""
    page = tmp_path / "figure.html"
    fig.write_html(page, include_plotlyjs=True, full_html=True)
    proc = subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parser = _SvgText()
    parser.feed(proc.stdout)
    assert parser.texts, "plotly drew no text: the page did not render"
    return parser.texts


def test_quotes_tags_and_ampersands_show_as_typed(browser, tmp_path):
    labels = ['say "hi"', "<b>x</b>", " Paris & co", SCRIPT, "a'b"]
    texts = rendered_text(browser, heatmap([[0.1, 0.2, 0.3, 0.4, 0.5]], labels, ["L0"]), tmp_path)
    assert texts["xtick"] == ['say "hi"', "<b>x</b>", "·Paris & co", SCRIPT, "a'b"]
    every = [t for group in texts.values() for t in group]
    assert not any("&quot;" in t or "&amp;" in t or "&lt;" in t or "&#x27;" in t for t in every), every


def test_lens_plot_shows_tokens_and_cells_as_typed(browser, tmp_path):
    tok = FakeTokenizer(TINY.vocab_size)
    tok.vocab[9] = 'x="1"'
    m = make_model(TINY, tokenizer=tok)
    lens = interp.logit_lens(m, torch.tensor([[2, 9, 7, 8]]), k=2)
    texts = rendered_text(browser, lens.plot(), tmp_path)
    assert texts["xtick"] == ["<bos>", 'x="1"', SCRIPT, "a↵b"]
    assert "L5 (global)" in texts["ytick"]
    assert all("&quot;" not in t for group in texts.values() for t in group)


def test_patching_title_names_the_tokens(browser, tmp_path):
    tok = FakeTokenizer(TINY.vocab_size)
    m = make_model(TINY, tokenizer=tok, sensitive=True)
    r = interp.patch_sweep(m, torch.tensor([[2, 11, 23, 5]]), torch.tensor([[2, 11, 31, 5]]),
                           interp.logit_diff(" w40", 7), progress=False)
    title = " ".join(rendered_text(browser, r.plot(), tmp_path)["gtitle"])
    assert f"logit_diff(' w40', '{SCRIPT}')" in title, title

"""Every notebook runs top to bottom on the demo model (a notebook that errors fails the suite),
and has a rendered copy with static figures in docs/notebooks/ (for GitHub and nbconvert).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RENDERED = ROOT / "docs" / "notebooks"


def code(nb: nbformat.NotebookNode) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07", "08"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, demo_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("INTERP_PLOTLY_RENDERER", "plotly_mimetype")  # no PNGs here: 3 s each; see below
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} is committed with outputs; strip them"
    client = NotebookClient(nb, timeout=900,  # 07 trains the demo transcoders on first use
                             kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_rendered_copy_is_current_and_static(path):
    """docs/notebooks/ holds each notebook executed, with PNG figures only (no scripts): a notebook
    edited without ``python docs/render_notebooks.py`` fails here."""
    source = nbformat.read(path, as_version=4)
    rendered = nbformat.read(RENDERED / path.name, as_version=4)
    assert code(rendered) == code(source), f"re-render {path.name}: python docs/render_notebooks.py"
    outputs = [o for c in rendered.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    kinds = {k for o in outputs for k in o.get("data", {})}
    assert kinds <= {"image/png", "text/plain"}, kinds
    if ".plot(" in "".join(code(source)):
        assert "image/png" in kinds, f"{path.name}'s figures have no static image"


@pytest.mark.subprocess
def test_a_kernel_gets_static_figures(tmp_path, monkeypatch):
    """Inside a kernel, the first figure of ours picks a renderer whose output works without a
    kernel: a PNG when kaleido and a browser are there (as in CI), else an offline HTML copy
    (whose first output is plotly.js itself; the figure is the output holding the plot)."""
    from interp.display import find_browser

    monkeypatch.delenv("INTERP_PLOTLY_RENDERER", raising=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import plotly.io as pio\nbefore = pio.renderers.default\nimport interp\n"
                                          "print(pio.renderers.default == before)"),
                nbformat.v4.new_code_cell("interp.plots.heatmap([[0.0, 1.0]], ['a', 'say \"b\"'], ['L0'])"),
                nbformat.v4.new_code_cell("print(pio.renderers.default)")]
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    assert nb.cells[0].outputs[0]["text"].strip() == "True", "import interp changed plotly's renderer"
    renderer = nb.cells[2].outputs[0]["text"].strip()
    figures = [o["data"] for o in nb.cells[1].outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 1, [list(o.get("data", {})) for o in nb.cells[1].outputs]
    data = figures[0]  # still interactive in a live front end
    if find_browser() is not None or os.environ.get("INTERP_REQUIRE_BROWSER"):
        assert renderer == "plotly_mimetype+png" and "image/png" in data
    else:
        assert renderer == "plotly_mimetype+notebook" and "text/html" in data


@pytest.mark.subprocess
def test_import_has_no_side_effects():
    """``import interp`` changes neither plotly's renderer nor the environment, even in a kernel
    (ipykernel imported); the first figure of ours does, once."""
    import subprocess
    import sys

    script = ("import os, ipykernel, plotly.io as pio\nbefore, env = pio.renderers.default, dict(os.environ)\n"
              "import interp\nassert pio.renderers.default == before and dict(os.environ) == env\n"
              "interp.plots.bars([1.0], ['a'])\nprint(pio.renderers.default != before)")
    env = {k: v for k, v in os.environ.items() if k not in ("INTERP_PLOTLY_RENDERER", "BROWSER_PATH")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"

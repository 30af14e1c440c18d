"""Execute every notebook and save a copy with static outputs in docs/notebooks/, for reading where
no kernel runs (GitHub shows the PNGs). The notebooks in notebooks/ stay without outputs.

    python docs/render_notebooks.py            # needs the [notebook] extra and a Chrome/Chromium

Each figure keeps its PNG (and the plain-text repr); the interactive MIME bundle and HTML
(hundreds of kB each, and scripts) are dropped. ``tests/test_notebooks.py`` checks that every
notebook has a rendered copy with the same code.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks"
RENDERED = ROOT / "docs" / "notebooks"
KEEP = ("image/png", "text/plain")


def static_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of an executed notebook whose outputs hold only PNG images and plain text."""
    out = copy.deepcopy(nb)
    for cell in out.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for o in cell.outputs:
            if o.output_type in ("display_data", "execute_result"):
                data = {k: v for k, v in o.data.items() if k in KEEP}
                if "image/png" in data:
                    data.pop("text/plain", None)  # "Figure({...})": the picture says it
                if not data:
                    continue
                o = copy.deepcopy(o)
                o.data = data
                o.metadata = {}
            kept.append(o)
        cell.outputs = kept
    out.metadata.pop("widgets", None)
    return out


def render(path: Path) -> Path:
    """Execute ``path`` and write its static copy; returns the copy's path."""
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env.pop("INTERP_PLOTLY_RENDERER", None)  # the kernel picks plotly_mimetype+png
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    RENDERED.mkdir(parents=True, exist_ok=True)
    target = RENDERED / path.name
    nbformat.write(static_outputs(nb), target)
    return target


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(SOURCE.glob("*.ipynb"))
    for path in paths:
        target = render(path)
        pngs = sum("image/png" in o.get("data", {}) for c in nbformat.read(target, 4).cells
                   if c.cell_type == "code" for o in c.outputs)
        print(f"{path.name}: {pngs} figures -> {target.relative_to(ROOT)} ({target.stat().st_size // 1024} kB)")
        if pngs == 0 and ".plot(" in path.read_text(encoding="utf-8"):
            print("  no PNG: install the [notebook] extra (kaleido) and a Chrome/Chromium", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Render the README's pictures from the demo model (needs a Chromium for the screenshots).

    python docs/make_images.py            # writes docs/images/*.png

Each figure is written as standalone HTML, then photographed by headless Chromium.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

import interp
from interp.metrics import logit_diff

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "docs" / "images"


def snap(fig, name: str, width: int = 1000, height: int = 560) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium")
    fig.update_layout(width=width, height=height)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / f"{name}.html"
        fig.write_html(page, include_plotlyjs=True, config={"displayModeBar": False})
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--disable-background-networking", "--disable-component-update", "--no-first-run",
                        f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
                        f"--screenshot={OUT / (name + '.png')}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
    print("wrote", OUT / f"{name}.png")


def main() -> None:
    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)
    m = interp.load("demo")
    prompt = "The capital of France is"
    snap(interp.logit_lens(m, prompt, targets=[" Paris"]).plot(), "logit_lens", height=620)
    snap(interp.head_scores(m, "induction", seq_len=50, batch_size=2, seed=0).plot(), "induction_heads", width=700)
    result = interp.patch_sweep(m, prompt, "The capital of Italy is", logit_diff(" Paris", " Rome"),
                                site="resid_pre", progress=False)
    snap(result.plot(), "patching_resid_pre", width=800, height=620)
    from interp.features.demo import demo_transcoders  # trained and cached on first use (a few minutes)

    graph = interp.attribution_graph(m, prompt, demo_transcoders(m), progress=False)
    snap(graph.prune(0.6, 0.9).plot(), "attribution_graph", width=900, height=780)


if __name__ == "__main__":
    main()

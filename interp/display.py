"""How figures show in a notebook, so that they also show outside a live kernel.

Plotly's default in Jupyter is a MIME bundle that only a running front end draws: opened on
GitHub or converted with ``jupyter nbconvert --to html``, such a notebook shows no plots. Inside
an IPython kernel, the first figure this toolkit makes (:func:`figure`, :func:`subplots`) therefore
sets plotly's default renderer to

- ``plotly_mimetype+png`` when ``kaleido`` (``pip install 'gemma3-interp[notebook]'``) and a
  Chrome or Chromium are available: the interactive figure plus a static PNG that GitHub and
  nbconvert show;
- ``plotly_mimetype+notebook`` otherwise: the interactive figure plus an offline HTML copy
  (plotly.js embedded once per notebook) that nbconvert's HTML shows.

``INTERP_PLOTLY_RENDERER`` overrides the choice (any plotly renderer string; ``default`` keeps
plotly's own). Outside a kernel nothing is changed, and ``import interp`` changes nothing anywhere:
a notebook that makes no figure of ours keeps its own plotly settings (call
:func:`configure_notebook_renderer` yourself to choose earlier).

>>> choose_renderer(in_kernel=False, has_png=True) is None
True
>>> choose_renderer(in_kernel=True, has_png=True)
'plotly_mimetype+png'
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import plotly.graph_objects as go

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    """A Chrome or Chromium executable for kaleido (``BROWSER_PATH`` first), or None."""
    given = os.environ.get("BROWSER_PATH")
    if given and os.path.exists(given):
        return given
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def choose_renderer(in_kernel: bool, has_png: bool, override: str | None = None) -> str | None:
    """The plotly renderer to set (None: leave plotly's default)."""
    if override:
        return None if override == "default" else override
    if not in_kernel:
        return None
    return "plotly_mimetype+png" if has_png else "plotly_mimetype+notebook"


def configure_notebook_renderer() -> str | None:
    """Set plotly's default renderer for a notebook (see the module docstring); returns it."""
    in_kernel = "ipykernel" in sys.modules
    override = os.environ.get("INTERP_PLOTLY_RENDERER")
    if not in_kernel and not override:
        return None
    browser = find_browser()
    has_png = importlib.util.find_spec("kaleido") is not None and browser is not None
    renderer = choose_renderer(in_kernel, has_png, override)
    if renderer is None:
        return None
    if has_png and browser and not os.environ.get("BROWSER_PATH"):
        os.environ["BROWSER_PATH"] = browser  # where kaleido looks for the browser
    import plotly.io as pio

    pio.renderers.default = renderer
    return renderer


_configured: list[bool] = []


def _configure_once() -> None:
    if not _configured:
        _configured.append(True)
        configure_notebook_renderer()


def figure(*args: Any, **kwargs: Any) -> go.Figure:
    """``plotly.graph_objects.Figure(*args, **kwargs)``, after choosing the notebook renderer once
    (see the module docstring): every figure of this toolkit is made here.

    >>> figure().data
    ()
    """
    import plotly.graph_objects as go

    _configure_once()
    return go.Figure(*args, **kwargs)


def subplots(**kwargs: Any) -> go.Figure:
    """``plotly.subplots.make_subplots(**kwargs)``, after choosing the notebook renderer once."""
    from plotly.subplots import make_subplots

    _configure_once()
    return make_subplots(**kwargs)


__all__ = ["configure_notebook_renderer", "choose_renderer", "find_browser", "figure", "subplots"]

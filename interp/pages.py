"""HTML pages through one Jinja2 environment with autoescaping: every value put into a page is
escaped unless it is marked safe here (plotly's own figure markup and its library), so token text
(which a model can make ``<script>``) can never become markup.

>>> render("<p>{{ text }}</p>", text="<script>")
'<p>&lt;script&gt;</p>'
>>> render("<p>{{ tok | token }}</p>", tok="a\\nb")
'<p>a↵b</p>'
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup


def visible(text: Any) -> str:
    """A token's text with newlines, tabs and carriage returns shown (``↵``, ``⇥``, ``⏎``); ``∅``
    for an empty token. Spaces are kept (pages show tokens with ``white-space: pre``)."""
    text = str(text)
    return text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "⏎") or "∅"


@cache
def environment() -> jinja2.Environment:
    """The environment every page is rendered with: autoescape on, strict about undefined names."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["token"] = visible
    return env


def render(template: str, **values: Any) -> str:
    """Render ``template`` (Jinja2 source) with ``values``, escaping every value."""
    return environment().from_string(template).render(**values)


def trusted(markup: str) -> Markup:
    """Mark markup this toolkit generated itself (plotly's figure ``<div>``, plotly.js) as safe.
    Never pass text that holds tokens, names or anything from a file."""
    return Markup(markup)


__all__ = ["render", "trusted", "visible", "environment"]

"""Token text as a person reads it in plots and pages: escaped, whitespace visible, byte-fallback
tokens and characters that draw nothing shown by their value (no missing-glyph boxes, no raw ``\\x``)."""

from __future__ import annotations

import pytest

from interp.plots import escape_token


@pytest.mark.parametrize("token, shown", [
    ("\\xee", "⟨0xEE⟩"), ("\\xF0", "⟨0xF0⟩"),          # one byte of a longer UTF-8 character
    ("\x01", "⟨U+0001⟩"), ("a\u200bb", "a⟨U+200B⟩b"),  # control and zero-width characters
    ("\ue000", "⟨U+E000⟩"),                              # private use: a box in every font
    ("\u0301", "◌\u0301"),                               # a combining mark alone sits on a dotted circle
    ("&#", "&amp;#"), ("<b>", "&lt;b&gt;"),              # still escaped for HTML
    (" Paris", "·Paris"), ("\n", "↵"), ("東京", "東京"), ("", "∅"),
    ("\\x", "\\x"), ("a\\xee", "a\\xee"),                # only a whole byte token is one
])
def test_escape_token(token, shown):
    assert escape_token(token) == shown


def test_demo_byte_tokens_show_their_value(demo_model):
    """The demo tokenizer writes a byte-fallback token as ``'\\xNN'``; plots show ``⟨0xNN⟩``."""
    tok = demo_model.tokenizer
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    assert len(byte_ids) == 256
    texts = [escape_token(t) for t in tok.to_str_tokens(byte_ids)]
    assert all(t.startswith("⟨") or t.isprintable() for t in texts)
    assert "⟨0xEE⟩" in texts and not any("\\x" in t for t in texts)

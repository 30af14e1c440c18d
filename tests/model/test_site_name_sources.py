"""Site names come from the site table only: code outside ``model/sites.py`` builds a layer's site
name with ``block_site`` / ``split_site`` (which refuse unknown kinds), never by formatting
``blocks.{i}.…`` by hand, and layer types are compared with the config's constants."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = [p for d in ("interp", "model", "hooks") for p in sorted((ROOT / d).rglob("*.py"))]
HAND_BUILT = re.compile(r"""f["'](blocks\.|\{[^}]*\}\.attn\.)"""  # f"blocks.{i}.…", f"{pre}.attn.…"
                        r"""|removeprefix\(f["']blocks|["'](full|sliding)_attention["']""")


def _code_lines(path: Path):
    """Lines outside docstrings and comments (doctest examples may spell names out)."""
    in_doc = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        quotes = stripped.count('"""') + stripped.count("'''")
        if in_doc or stripped.startswith(('"""', "'''", 'r"""', "#")):
            if quotes % 2 == 1:
                in_doc = not in_doc
            continue
        yield n, line


def test_no_site_name_is_built_by_hand():
    allowed = {ROOT / "model" / "sites.py", ROOT / "model" / "config_rules.py", ROOT / "model" / "hf_config.py"}
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in CODE if p not in allowed
             for n, line in _code_lines(p) if HAND_BUILT.search(line)]
    assert not found, "build site names with interp.model.sites.block_site:\n" + "\n".join(found)


def test_the_check_sees_a_hand_built_name(tmp_path):
    """The pattern itself: it must catch what it is there to catch (else the test above cannot fail)."""
    bad = ['x = f"blocks.{i}.attn.z"', "y = name.removeprefix(f'blocks.{i}.')", 'z = t == "full_attention"']
    assert all(HAND_BUILT.search(b) for b in bad)
    assert not HAND_BUILT.search('block_site(i, "attn.z")')

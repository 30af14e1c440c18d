"""Files that appear whole or not at all: the one atomic-write helper every long job uses.

A file is written under a temporary name beside its target (unique per process and thread, so
concurrent writers never share one) and renamed over the target only once it is complete; a
reader, or a rerun after ``kill -9``, never sees half of it.

>>> import tempfile, pathlib
>>> target = pathlib.Path(tempfile.mkdtemp()) / "plan.json"
>>> write_text(target, '{"ok": true}')
>>> target.read_text(), [p.name for p in target.parent.iterdir()]
('{"ok": true}', ['plan.json'])
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``; the
    temporary file is removed if ``write`` fails."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)`` (UTF-8), atomically."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


__all__ = ["atomic_write", "write_text"]

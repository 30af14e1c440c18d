"""One progress bar for every long job (sweeps, harvests, training): tqdm, on stderr.

>>> bar = progress_bar(3, "demo", "step", enabled=False)
>>> bar.update(3); bar.close()
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (text, so it works in a terminal, a log and a notebook alike); ``enabled=False``
    gives a silent one with the same interface."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, **kwargs)


__all__ = ["progress_bar"]

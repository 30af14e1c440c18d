"""Argument checks shared by every layer of the toolkit (the floor: this package imports nothing of
Gemma, and the model and the analyses import it).

Python counts ``True`` as the int 1; no count, index or size here is ever a bool, so the checks
refuse bools.

>>> is_int(3), is_int(True), is_int(3.0), is_number(2.5), is_number(False)
(True, False, False, True, False)
>>> check_int("batch_size", 0, low=1)
Traceback (most recent call last):
    ...
ValueError: batch_size must be a positive int, got 0
"""

from __future__ import annotations

from typing import Any, TypeGuard


def is_int(value: Any) -> TypeGuard[int]:
    """An ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[int | float]:
    """An ``int`` or a ``float`` and not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              allow_none: bool = False) -> Any:
    """``value`` if it is an int in ``[low, high]`` (either bound optional; None too with
    ``allow_none``), else a ``ValueError`` naming ``name``, what it must be, and what it got."""
    if allow_none and value is None:
        return value
    if is_int(value) and (low is None or value >= low) and (high is None or value <= high):
        return value
    if low == 1 and high is None:
        want = "a positive int"
    elif low is not None and high is not None:
        want = f"an int in {low}..{high}"
    elif low is not None:
        want = f"an int >= {low}"
    elif high is not None:
        want = f"an int <= {high}"
    else:
        want = "an int"
    raise ValueError(f"{name} must be {want}{' or None' if allow_none else ''}, got {value!r}")


__all__ = ["is_int", "is_number", "check_int"]

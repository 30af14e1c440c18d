"""The one rule for ``positions=``: every function that takes sequence positions reads them here.

A position selector is an int, a slice, a sequence of ints, a 1-D LongTensor, or a 1-D bool
tensor (one entry per token). Negative ints count from the end of the sequence (``-1`` is the
last token). An int outside the sequence is an :class:`IndexError` that names the valid range;
nothing is wrapped or dropped silently. Slices follow Python's slicing (``slice(5, None)`` is
"from position 5 on", however long the sequence gets), which is the way to select positions
that may not exist yet, e.g. during generation.

>>> import torch
>>> resolve_positions(-1, 5)
tensor([4])
>>> resolve_positions([0, -2], 5).tolist(), resolve_positions(slice(3, None), 5).tolist()
([0, 3], [3, 4])
>>> resolve_positions(7, 5)
Traceback (most recent call last):
...
interp.hooks.positions.PositionError: position 7 is outside a sequence of 5 tokens (valid: 0..4, or -5..-1 from the end)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import is_int

Positions = int | slice | Sequence[int] | torch.Tensor


class PositionError(IndexError, ValueError):
    """A position (or row, head, neuron index) outside its range; both an IndexError and a ValueError."""


def _ints(positions: object, what: str) -> torch.Tensor:
    if isinstance(positions, bool):
        raise TypeError(f"{what}= must be an int, a list of ints, a slice or a tensor, not a bool")
    if isinstance(positions, int):
        return torch.tensor([positions], dtype=torch.long)
    if isinstance(positions, torch.Tensor):
        if positions.dtype.is_floating_point or positions.dtype.is_complex:
            raise TypeError(f"{what}= must hold integer positions, got a {positions.dtype} tensor")
        if positions.dim() > 1:
            raise ValueError(f"{what}= must be 1-D here, got shape {tuple(positions.shape)}")
        return positions.detach().to("cpu", torch.long).reshape(-1)
    if isinstance(positions, (list, tuple, range)):
        bad = [p for p in positions if not is_int(p)]
        if bad:
            raise TypeError(f"{what}= must hold ints, got {bad[0]!r} in {list(positions)!r}")
        return torch.tensor(list(positions), dtype=torch.long)
    raise TypeError(f"{what}= must be an int, a list of ints, a slice or a tensor, got {type(positions).__name__}")


def resolve_positions(positions: Positions, length: int, *, what: str = "positions") -> torch.Tensor:
    """Absolute indices ``[k]`` (CPU LongTensor, in the order given) of ``positions`` in a
    sequence of ``length`` tokens; raises :class:`IndexError` for an int outside it.

    >>> resolve_positions(torch.tensor([True, False, True]), 3).tolist()
    [0, 2]
    """
    if isinstance(positions, slice):
        return torch.arange(length)[positions]
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.dim() != 1 or positions.numel() != length:
            raise ValueError(f"a bool {what}= mask needs one entry per token ({length}), got shape "
                             f"{tuple(positions.shape)}")
        return positions.detach().cpu().nonzero().flatten()
    idx = _ints(positions, what)
    bad = (idx < -length) | (idx >= length)
    if bool(bad.any()):
        p = int(idx[bad][0])
        if what == "positions":
            raise PositionError(f"position {p} is outside a sequence of {length} tokens (valid: 0..{length - 1}, "
                             f"or -{length}..-1 from the end)")
        raise PositionError(f"{what}={p} is out of range: valid are 0..{length - 1} (or -{length}..-1 from the end)")
    return torch.where(idx < 0, idx + length, idx)


def positions_mask(positions: Positions, length: int, *, what: str = "positions") -> torch.Tensor:
    """Bool ``[length]``: True at the selected positions (same rule as :func:`resolve_positions`).

    >>> positions_mask([0, -1], 4).tolist()
    [True, False, False, True]
    """
    mask = torch.zeros(length, dtype=torch.bool)
    mask[resolve_positions(positions, length, what=what)] = True
    return mask


def sorted_positions(positions: Positions | None, length: int, *, what: str = "positions") -> list[int]:
    """Sorted, de-duplicated absolute positions (every position when ``positions`` is None);
    an empty selection is a :class:`ValueError`.

    >>> sorted_positions([-1, 0, 0], 4)
    [0, 3]
    """
    if positions is None:
        return list(range(length))
    out = sorted(set(resolve_positions(positions, length, what=what).tolist()))
    if not out:
        raise ValueError(f"{what}={positions!r} selects no token of a sequence of {length}")
    return out


def resolve_position(position: int, length: int, *, what: str = "position") -> int:
    """One absolute position from an int (negative counts from the end).

    >>> resolve_position(-1, 6)
    5
    """
    if not is_int(position):
        raise TypeError(f"{what}= must be an int, got {type(position).__name__}")
    return int(resolve_positions(position, length, what=what)[0])


__all__ = ["Positions", "PositionError", "resolve_positions", "resolve_position", "positions_mask", "sorted_positions"]

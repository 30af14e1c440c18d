"""Non-finite results: a cheap check of an analysis's output, then a second, checking pass
that names the first site where NaN or inf appeared.

NaN spreads backwards in time through attention: a masked key gets weight exactly 0, but
``0 * NaN = NaN`` in ``pattern @ v``, so a NaN written into one position's values makes every
position's output NaN, earlier ones included. The checking pass therefore names the site
where the first NaN or inf appeared, not the position.

>>> import torch
>>> check_finite(torch.ones(2), "a result", lambda: None)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import torch

from ..hooks import NonFiniteError, checking_pass, partial_run


def raise_non_finite(what: str, rerun: Callable[[], Any]) -> NoReturn:
    """Raise a :class:`~interp.hooks.NonFiniteError` for ``what``, naming the first non-finite
    site found by calling ``rerun`` (the computation again, same inputs and hooks) with every
    site checking its tensor."""
    try:
        with checking_pass(), partial_run():
            rerun()
    except NonFiniteError as e:
        raise NonFiniteError(f"{what}: NaN or inf found. {e} (NaN in one position's keys or values reaches "
                             "every position, earlier ones included)") from None
    raise NonFiniteError(f"{what}: NaN or inf found, but every site of the model was finite when rerun: "
                         "it arose after the model (in the analysis or metric)")


def check_finite(value: torch.Tensor, what: str, rerun: Callable[[], Any]) -> None:
    """The cheap check: if ``value`` holds NaN or inf, find the first non-finite site and raise."""
    if not bool(torch.isfinite(value).all()):
        raise_non_finite(what, rerun)


__all__ = ["check_finite", "raise_non_finite"]

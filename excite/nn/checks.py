"""Argument checks for the layers and model constructors.

Arguments arrive from the command line (``--model-arg growth_rate=-2``) and config files, so each bad value
is a one-line ValueError that names the argument and what it may be, raised before anything is built; the
CLI and ``fit`` turn it into their one-line error.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a width


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is a whole number of at least ``minimum``, else a ValueError naming ``name``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
    return value


def check_ints(name: str, value: Any, minimum: int = 1, length: int | None = None) -> tuple[int, ...]:
    """``value`` as a tuple if it is a non-empty list of whole numbers of at least ``minimum`` (and ``length``
    long when given), else a ValueError naming ``name``."""
    ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
          and all(_is_int(v) and v >= minimum for v in value) and (length is None or len(value) == length))
    if not ok:
        count = f"{length} " if length is not None else ""
        raise ValueError(f"{name} must be a list of {count}whole numbers of at least {minimum}, got {value!r}")
    return tuple(value)


def check_float(name: str, value: Any, low: float, high: float, closed: str = "[)") -> float:
    """``value`` if it is a number in the interval from ``low`` to ``high`` (``closed`` says which ends belong
    to it: "[)", "(]", "[]" or "()"), else a ValueError naming ``name`` and the interval."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = number and (low <= value if closed[0] == "[" else low < value) and (
        value <= high if closed[1] == "]" else value < high)
    if not inside:
        raise ValueError(f"{name} must be a number in {closed[0]}{low}, {high}{closed[1]}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False, else a ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value

"""JSON for the numbers dkm records: one encoding, read back by one function.

Finite floats are JSON numbers; NaN and ±infinity, which JSON has not, are the strings
``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (what ``float()`` reads back) where the value
must come back exactly (models, checkpoints, reports), or ``null`` in logs and metrics
that tools read as plain JSON. :func:`to_json` makes any record of such values JSON-safe.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Literal

import numpy as np

NonFinite = Literal["string", "null"]


def float_to_json(value: float, nonfinite: NonFinite = "string") -> float | str | None:
    """``value`` as a JSON value (see the module docstring)."""
    value = float(value)
    if math.isfinite(value):
        return value
    if nonfinite == "null":
        return None
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def float_from_json(value: Any) -> float:
    """The float :func:`float_to_json` wrote (``null`` is NaN); ValueError otherwise."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None


def to_json(value: Any, where: str) -> Any:
    """A JSON-safe copy: NumPy scalars and arrays to Python, non-finite floats to strings;
    TypeError naming ``where`` for what JSON cannot hold."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float_to_json(float(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            out[key] = to_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist(), where)
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored as JSON")


def json_param(value: Any) -> tuple[bool, Any]:
    """(True, JSON value) for scalar parameters; (False, None) for arrays, callables, …"""
    if value is None or isinstance(value, bool | str | np.bool_):
        return True, None if value is None else (value if isinstance(value, str) else bool(value))
    if isinstance(value, numbers.Integral):
        return True, int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return True, float(value)
    return False, None

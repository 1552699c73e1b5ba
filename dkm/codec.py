"""JSON for the numbers dkm records: one encoding, read back by one function.

Finite floats are JSON numbers; NaN and ±infinity, which JSON has not, are the strings
``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (what ``float()`` reads back) where the value
must come back exactly (models, checkpoints, reports), or ``null`` in logs and metrics
that tools read as plain JSON.
"""

from __future__ import annotations

import math
from typing import Any, Literal

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

"""Strict JSON out: the one rule every file and answer this package writes follows.

Python's ``json`` writes NaN and infinity as the bare words ``NaN`` / ``Infinity``, which are not JSON (jq and strict
parsers reject them). An undefined number (a metric over no ground truth, a loss that diverged) is written as
``null`` instead, everywhere: ``evaluate --out``, ``metrics.jsonl``, ``predict``'s files and the server's answers.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["finite_or_none", "dumps"]


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN / inf float (in dicts, lists and tuples, at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``value`` with undefined numbers as null; anything else non-JSON is an error."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)

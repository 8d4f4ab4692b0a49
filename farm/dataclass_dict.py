"""One check for building a config dataclass from a mapping: unknown keys fail with the class, the
keys and a close-match hint for a typo (``student_filter`` -> did you mean ``student_filters``?)."""

from __future__ import annotations

import difflib
from dataclasses import fields


def check_keys(cls, d: dict) -> dict:
    """``d`` unchanged when every key is a field of dataclass ``cls``; else a ValueError naming them."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        hints = [f"{k!r} -> did you mean {m[0]!r}?" for k in unknown
                 if (m := difflib.get_close_matches(k, names, n=1, cutoff=0.6))]
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}" + (f" ({'; '.join(hints)})" if hints else "")
                         + f"; known: {names}")
    return d

"""Config mappings: one check for building a config dataclass from a mapping (unknown keys fail with
the class, the keys and a close-match hint for a typo: ``student_filter`` -> did you mean
``student_filters``?), and dotted ``key.sub=value`` overrides of a nested mapping."""

from __future__ import annotations

import copy
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


def apply_overrides(d: dict, overrides: list[str] | None) -> dict:
    """``key.sub=value`` strings (value parsed as YAML) applied to a copy of ``d``; ValueError on a
    malformed override or a key that is not a section."""
    import yaml

    d = copy.deepcopy(d)
    for o in overrides or []:
        if "=" not in o:
            raise ValueError(f"override {o!r}: expected key=value (e.g. farm.num_cpus=2)")
        dotted, v = o.split("=", 1)
        keys = dotted.strip().split(".")
        cur = d
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
            if not isinstance(cur, dict):
                raise ValueError(f"override {dotted.strip()!r}: {k!r} is not a section")
        cur[keys[-1]] = yaml.safe_load(v)
    return d

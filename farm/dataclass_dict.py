"""Config dataclasses <-> plain mappings, one way for every config in farm.

``from_dict(cls, d)`` builds a (nested) config dataclass from a YAML/JSON mapping, checking every
value against the field's type hint down to the leaves; ``to_dict(obj)`` is its inverse (tuples as
lists, nested dataclasses as mappings). Errors are ``ConfigValueError``s that name the dotted key
path, the bad value and what is allowed, with a close-match hint for a misspelt key
(``compress.student_filter`` -> did you mean ``student_filters``?). Range checks stay in each
class's ``__post_init__``; their ValueErrors come out prefixed with the key path too.

``apply_overrides(d, ["key.sub=value"], cls)`` sets dotted keys of a nested mapping; with ``cls``
the value is parsed against the field's type (a ``str`` field takes the text as written, so
``neurons=190923:5`` stays that string instead of YAML 1.1's base-60 integer).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigValueError(ValueError):
    """A config value or key that does not fit its dataclass; the message names the key path."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                "dict": "a mapping", "list": "a list", "tuple": "a list"}.get(hint.__name__,
                                                                             f"a {hint.__name__} mapping")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return "a mapping"
    return str(hint)


def _fail(where: str, value, hint) -> typing.NoReturn:
    raise ConfigValueError(f"{where}: got {value!r} ({type(value).__name__}), expected {_type_name(hint)}")


def coerce(hint, value, where: str):
    """``value`` as the type ``hint`` describes (nested dataclasses built with ``from_dict``)."""
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            _fail(where, value, hint)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, where)
            except ConfigValueError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        _fail(where, value, hint)
    if origin is typing.Literal:
        if value not in args:
            _fail(where, value, hint)
        return value
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            _fail(where, value, hint)
        return from_dict(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            _fail(where, value, hint)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            _fail(where, value, hint)
        return int(value)
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as text
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, value, hint)
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            _fail(where, value, hint)
        return str(value)  # YAML reads session 190923 as an int; the field means the text
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(where, value, hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                _fail(where, value, hint)
            items = [coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        elif args:
            items = [coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            items = list(value)
        return tuple(items) if (hint is tuple or origin is tuple) else items
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            _fail(where, value, hint)
        if len(args) == 2:
            return {coerce(args[0], k, f"{where}.{k}"): coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if isinstance(hint, type):
        if not isinstance(value, hint):
            _fail(where, value, hint)
        return value
    return value


def _key(where: str, k) -> str:
    return f"{where}.{k}" if where else str(k)


def check_keys(cls, d: dict, where: str | None = None) -> dict:
    """``d`` unchanged when every key is a field of dataclass ``cls``; else a ConfigValueError naming them."""
    where = (cls.__name__ if where is None else where) or "top level"
    if not isinstance(d, dict):
        raise ConfigValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {d!r}")
    names = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(d) - set(names), key=str)
    if unknown:
        hints = [f"{k!r} -> did you mean {m[0]!r}?" for k in unknown
                 if (m := difflib.get_close_matches(str(k), names, n=1, cutoff=0.6))]
        raise ConfigValueError(f"{where}: unknown key(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else "")
                               + f"; known: {names}")
    return d


def from_dict(cls, d: dict | None, where: str | None = None):
    """An instance of dataclass ``cls`` from mapping ``d`` (missing keys keep their defaults).
    ``where``: the key path for messages (None: the class name; "": the top level). A class may
    define ``_config_prepare(d) -> d`` (e.g. CompressConfig fills in its recipe's preset)."""
    where = cls.__name__ if where is None else where
    if d is None:
        d = {}
    prepare = getattr(cls, "_config_prepare", None)
    if prepare is not None and isinstance(d, dict):
        try:
            d = prepare(d)
        except ValueError as e:
            raise ConfigValueError(f"{where}: {e}" if where else str(e)) from None
    check_keys(cls, d, where)
    missing = [f.name for f in fields(cls) if f.init and f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigValueError(f"{where or 'top level'}: missing required key(s) {missing}")
    hints = _hints(cls)
    kwargs = {k: coerce(hints[k], _over_default(cls, k, v), _key(where, k)) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigValueError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigValueError(f"{where}: {e}" if where else str(e)) from None


def _over_default(cls, name: str, value):
    """A partial mapping for a field whose default is a dataclass instance: over the values in which
    that instance differs from its class's own defaults (a parent may set its own defaults for a
    section, e.g. AnalysisConfig.synth). Only those: the class's own defaults must stay unset here,
    or they would hide what the class's ``_config_prepare`` fills in (JobConfig.compress is a plain
    CompressConfig(); spelling out its tau 0.9 would override the recipe's tau)."""
    if not isinstance(value, dict):
        return value
    f = cls.__dataclass_fields__[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if is_dataclass(default) and not isinstance(default, type):
        parent = to_dict(default)
        try:
            own = to_dict(type(default)())
        except TypeError:  # no defaults of its own: the parent's instance is all there is
            own = {}
        unset = object()
        return {**{k: v for k, v in parent.items() if own.get(k, unset) != v}, **value}
    return value


def to_dict(obj) -> Any:
    """Inverse of ``from_dict``: nested dataclasses as mappings, tuples as lists."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def non_default_dict(obj) -> dict:
    """``to_dict`` of a config dataclass without the fields whose value is the field's own default,
    recursively: what makes this config differ from its classes' defaults. A stable identity (a job
    id) that a field added later with a default leaves unchanged."""
    out = {}
    for f in fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(value) and not isinstance(value, type):
            sub = non_default_dict(value)
            if sub or type(default) is not type(value):  # a section that is None by default: present
                out[f.name] = sub
        elif default is dataclasses.MISSING or to_dict(value) != to_dict(default):
            out[f.name] = to_dict(value)
    return out


def field_hint(cls, keys: list[str]):
    """The type hint at dotted path ``keys`` under dataclass ``cls`` (None where it is not typed)."""
    hint = cls
    for k in keys:
        hint = _strip_optional(hint)
        if not is_dataclass(hint):
            return None
        h = _hints(hint)
        if k not in h:
            return None
        hint = h[k]
    return hint


def _strip_optional(hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        dc = [a for a in rest if is_dataclass(a)]
        if dc:
            return dc[0]
        if len(rest) == 1:
            return rest[0]
    return hint


def parse_override_value(text: str, hint=None, what: str = "override"):
    """An override's value: the text itself for a string field, else YAML (a clear error if it is not)."""
    import yaml

    if _strip_optional(hint) is str and text.strip().lower() not in ("null", "~", "none"):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = str(e).replace("\n", " ")
        raise ConfigValueError(f"{what}: value {text!r} is not valid YAML ({msg})") from None


def read_yaml_mapping(path, what: str = "config") -> dict:
    """The mapping in YAML file ``path`` ({} for an empty file): the one YAML reader of farm's
    configs. FileNotFoundError / ConfigValueError name the file and what is wrong."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p}: no such file")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigValueError(f"{p}: expected a mapping at the top level, got {type(d).__name__}")
    return d


def apply_overrides(d: dict, overrides: list[str] | None, cls=None) -> dict:
    """``key.sub=value`` strings applied to a copy of ``d`` (values parsed against ``cls``'s field
    types when given, else as YAML); ConfigValueError on a malformed override or a key that is not a
    section."""
    d = copy.deepcopy(d)
    for o in overrides or []:
        if "=" not in o:
            raise ConfigValueError(f"override {o!r}: expected key=value (e.g. farm.num_cpus=2)")
        dotted, v = o.split("=", 1)
        dotted = dotted.strip()
        keys = dotted.split(".")
        if not all(keys):
            raise ConfigValueError(f"override {o!r}: empty key in {dotted!r}")
        cur = d
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
            if not isinstance(cur, dict):
                raise ConfigValueError(f"override {dotted!r}: {k!r} is not a section")
        hint = field_hint(cls, keys) if cls is not None else None
        cur[keys[-1]] = parse_override_value(v, hint, f"override {dotted}")
    return d


__all__ = ["ConfigValueError", "apply_overrides", "check_keys", "coerce", "field_hint", "from_dict",
           "parse_override_value", "to_dict"]

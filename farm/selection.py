"""The neuron-selection grammar of job configs (``neurons:``, ``sweep.neurons``, ``analysis.neurons``).

Items are separated by whitespace or ';': ``all``; ``<session>`` or ``<session>:*`` (all of a
session); ``<session>:<i>``, ``<session>:<a>-<b>`` (inclusive) or ``<session>:0-3,7``.
``check_selection`` checks the syntax alone (at config load, before any data is read);
``parse_neuron_selection`` resolves a selection against the teacher's neuron ids.
"""

from __future__ import annotations

import re
from typing import Sequence

_PART = re.compile(r"(\d+)(?:-(\d+))?")


def _items(selection: str | Sequence[str]) -> list[str]:
    if not isinstance(selection, str):
        selection = " ".join(selection)
    items = [s for s in re.split(r"[\s;]+", selection.strip()) if s]
    if not items:
        raise ValueError("neuron selection is empty; use e.g. 'all' or '190923:0-9'")
    return items


def _ranges(item: str, spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        m = _PART.fullmatch(part)
        if not m:
            raise ValueError(f"neuron selection {item!r}: {part!r} is not an index or a range a-b")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"neuron selection {item!r}: range {part!r} ends before it starts")
        out.append((a, b))
    return out


def neuron_sort_key(neuron_id: str):
    """Sort key of a neuron id: by session, then by index as a number (190923:2 before 190923:10)."""
    s, _, i = neuron_id.partition(":")
    return (s, int(i) if i.isdigit() else i)


def check_selection(selection: str | Sequence[str], key: str = "neurons") -> None:
    """ValueError (prefixed with the config ``key``) when ``selection`` is not in the grammar (see the
    module docstring)."""
    try:
        for item in _items(selection):
            session, _, spec = item.partition(":")
            if item != "all" and spec not in ("", "*"):
                _ranges(item, spec)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def parse_neuron_selection(selection: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """Neuron ids from a selection, in ``available`` order."""
    avail = list(available)
    by_session: dict[str, list[str]] = {}
    for nid in avail:
        by_session.setdefault(nid.split(":", 1)[0], []).append(nid)
    chosen: set[str] = set()
    for item in _items(selection):
        if item == "all":
            chosen.update(avail)
            continue
        session, _, spec = item.partition(":")
        if session not in by_session:
            raise ValueError(f"neuron selection {item!r}: no session {session!r} among the teacher's "
                             f"neurons (sessions: {sorted(by_session)})")
        if spec in ("", "*"):
            chosen.update(by_session[session])
            continue
        for a, b in _ranges(item, spec):
            for i in range(a, b + 1):
                nid = f"{session}:{i}"
                if nid not in by_session[session]:
                    raise ValueError(f"neuron selection {item!r}: {nid} is not one of the teacher's "
                                     f"neurons ({len(by_session[session])} in session {session})")
                chosen.add(nid)
    return [n for n in avail if n in chosen]


def neuron_slug(neuron_id: str) -> str:
    """A neuron id as a file or folder name ("190923:3" -> "190923_3")."""
    return neuron_id.replace(":", "_").replace("/", "_")

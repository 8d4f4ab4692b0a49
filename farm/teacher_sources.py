"""Teachers made elsewhere, by kind: one table that every command dispatches through (job configs'
``teacher.kind``, ``farm teacher import``, a folder's ``teacher_ref.json``).

    teacher, teacher_id = published_teacher("shared_compact", path, session="190923")
    teacher = load_teacher_folder("farm_runs/demo/teacher")   # a saved ensemble or a teacher_ref.json
"""

from __future__ import annotations

import json
from pathlib import Path

TEACHER_REF_FILE = "teacher_ref.json"


def _shared(path, session):
    from farm.models.published import shared_compact_teacher

    return (shared_compact_teacher(path, sessions=[session] if session else None),
            f"shared-{Path(path).stem}-{session or 'all'}")


def _published(path, session):
    from farm.models.published import published_compact_teacher

    session = session or "190923"
    return published_compact_teacher(path, session), f"published-{session}"


#: kind -> loader(path, session) -> (Teacher, teacher id)
PUBLISHED_KINDS = {"shared_compact": _shared, "published_compact": _published}


def published_teacher(kind: str, path: str | Path, session: str | None = None):
    """(teacher, teacher id) of a published model of ``kind`` at ``path``, restricted to ``session``."""
    if kind not in PUBLISHED_KINDS:
        raise ValueError(f"teacher kind {kind!r} is not a published model; choose one of {sorted(PUBLISHED_KINDS)}")
    return PUBLISHED_KINDS[kind](path, session)


def write_teacher_ref(out: str | Path, kind: str, path: str | Path, session: str | None) -> Path:
    """A folder that names a published teacher (``farm teacher import``); returns the ref file."""
    from farm.files import write_text_atomic

    teacher, _ = published_teacher(kind, path, session)
    ref = {"kind": kind, "path": str(Path(path).resolve()), "session": session,
           "neuron_ids": list(teacher.neuron_ids)}
    return write_text_atomic(Path(out) / TEACHER_REF_FILE, json.dumps(ref, indent=2))


def load_teacher_folder(path: str | Path):
    """The teacher in a folder: a ``teacher_ref.json`` (a published model) or a saved EnsembleTeacher
    (the folder itself or its ``teacher/``)."""
    p = Path(path)
    if (p / TEACHER_REF_FILE).is_file():
        ref = json.loads((p / TEACHER_REF_FILE).read_text())
        return published_teacher(ref["kind"], ref["path"], ref.get("session"))[0]
    from farm.teacher import EnsembleTeacher

    return EnsembleTeacher.load(p / "teacher" if (p / "teacher" / "teacher.json").is_file() else p)

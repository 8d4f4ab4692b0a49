"""Files farm writes and reads back: atomic writes (a file appears complete under its name or not
at all: a crash, a full disk or a killed worker leaves the old file, or nothing, never half a file)
and versioned JSON manifests (a file of another kind or version is refused, naming the file).

    with atomic_path(path) as tmp:        # any writer: np.save, torch.save, pq.write_table, savefig
        torch.save(state, tmp)
    write_text_atomic(path, text)
    manifest = read_manifest(path, ("format", "farm-image-bank"), ("version", 1), "image bank")
    state = load_state_dict(path)          # tensors only: a pickle of anything else is refused
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """A temp file next to ``path`` (same folder, so the rename is atomic) that replaces ``path``
    when the block ends without an exception and is removed when it raises. The folder is created.
    ``fsync``: flush the file to disk before the rename (for data that must survive a power loss)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_manifest(path: str | os.PathLike, kind: tuple[str, str], version: tuple[str, int], what: str,
                  missing: str = "") -> dict:
    """The JSON mapping in ``path`` whose ``kind[0]`` field is ``kind[1]`` and ``version[0]`` field
    is ``version[1]``; FileNotFoundError (with the ``missing`` hint) or ValueError naming the file,
    what it should be and what it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; not a {what}" + (f" ({missing})" if missing else ""))
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt {what} manifest (not JSON): {e}") from e
    if not isinstance(d, dict) or d.get(kind[0]) != kind[1]:
        got = d.get(kind[0]) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: not a {what} ({kind[0]} {got!r}, expected {kind[1]!r})")
    if d.get(version[0]) != version[1]:
        raise ValueError(f"{path}: {what} {version[0]} {d.get(version[0])!r} is not supported "
                         f"(expected {version[1]})")
    return d


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created; it records the holder's pid and host) for the
    block. ``wait``: block until it is free; else raise ``Busy`` naming ``what`` and the holder."""
    import fcntl
    import socket

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise Busy(f"{what} is already running ({holder}); wait for it to end, or stop it") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class Busy(ValueError):
    """Another process holds the lock (``exclusive``)."""


def load_state_dict(path: str | os.PathLike, map_location="cpu") -> dict:
    """The tensors in a ``torch.save``d state_dict, loaded with ``weights_only=True``: a file holding
    any other pickled object (code could run on load) is refused, and so is an unreadable one,
    with a sentence naming the file."""
    import pickle

    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" not in str(e).lower():  # not a pickle of objects at all: a damaged file
            raise ValueError(f"{path}: not a readable PyTorch state_dict (UnpicklingError)") from None
        raise ValueError(f"refusing to load {path}: not a plain state_dict (it holds pickled objects "
                         f"other than tensors)") from None
    except Exception as e:  # noqa: BLE001 - a damaged file surfaces as OSError, RuntimeError, EOFError, ...
        raise ValueError(f"{path}: not a readable PyTorch state_dict ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"refusing to load {path}: not a state_dict (a {type(state).__name__})")
    return state

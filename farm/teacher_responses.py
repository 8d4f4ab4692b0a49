"""The teacher's responses to an image bank: ONE pass of the teacher over the images for ALL neurons
(the teacher is the expensive model; its response to an image is the same whichever neuron is being
compressed), cached on disk keyed by (teacher id, bank id); and the held-out split of the bank.

Images are uint8 RGB (N, H, W, 3). Plain NumPy/PyArrow/PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from farm.files import atomic_path
from farm.models.input import check_images as _check_images

log = logging.getLogger(__name__)

RESPONSES_FILE = "teacher_responses.arrow"
RESPONSES_FORMAT_VERSION = 1
IMAGE_ID_COLUMN = "image_id"

# ---------------------------------------------------------------------------------------------------
# Teacher responses
# ---------------------------------------------------------------------------------------------------


@dataclass
class TeacherResponses:
    """The teacher's response of every neuron to every image of a bank.

    image_ids: int64 (N,), the bank's image ids (row i of ``responses`` is image ``image_ids[i]``).
    responses: float32 (N, n_neurons), in the teacher's output units (often standardized).
    neuron_ids: (n_neurons,) "<session>:<index>" ids of the columns.
    teacher_id, bank_id: what produced the table and from which images (the cache key).
    """

    image_ids: np.ndarray
    responses: np.ndarray
    neuron_ids: tuple[str, ...]
    teacher_id: str
    bank_id: str

    def __post_init__(self):
        self.image_ids = np.asarray(self.image_ids, dtype=np.int64)
        self.responses = np.asarray(self.responses, dtype=np.float32)
        self.neuron_ids = tuple(str(n) for n in self.neuron_ids)
        if self.image_ids.ndim != 1:
            raise ValueError(f"TeacherResponses.image_ids must be 1-D (N,), got shape {self.image_ids.shape}")
        if self.responses.ndim != 2 or self.responses.shape != (len(self.image_ids), len(self.neuron_ids)):
            raise ValueError(
                f"TeacherResponses.responses must be (N images, n_neurons) = "
                f"({len(self.image_ids)}, {len(self.neuron_ids)}), got shape {self.responses.shape}")
        if len(set(self.neuron_ids)) != len(self.neuron_ids):
            raise ValueError("TeacherResponses.neuron_ids must be unique")
        if IMAGE_ID_COLUMN in self.neuron_ids:
            raise ValueError(f"TeacherResponses: {IMAGE_ID_COLUMN!r} is reserved and cannot be a neuron id")

    @property
    def n_images(self) -> int:
        return int(self.responses.shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.responses.shape[1])

    def column(self, neuron_id: str) -> np.ndarray:
        """The teacher's responses of one neuron to every image, float32 (N,)."""
        try:
            j = self.neuron_ids.index(str(neuron_id))
        except ValueError:
            raise KeyError(f"neuron {neuron_id!r} is not among this teacher's {self.n_neurons} neurons "
                           f"({', '.join(self.neuron_ids[:5])}{', ...' if self.n_neurons > 5 else ''})") from None
        return self.responses[:, j]

    def to_arrow(self):
        """A pyarrow Table: column ``image_id`` (int64) and one float32 column per neuron id."""
        import pyarrow as pa

        cols = {IMAGE_ID_COLUMN: pa.array(self.image_ids)}
        for j, nid in enumerate(self.neuron_ids):
            cols[nid] = pa.array(np.ascontiguousarray(self.responses[:, j]))
        meta = {
            "farm_kind": "TeacherResponses",
            "format_version": str(RESPONSES_FORMAT_VERSION),
            "teacher_id": self.teacher_id,
            "bank_id": self.bank_id,
            "neuron_ids": json.dumps(list(self.neuron_ids)),
        }
        return pa.table(cols).replace_schema_metadata(meta)

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/teacher_responses.arrow`` (Arrow IPC file) atomically; returns its path."""
        import pyarrow as pa

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / RESPONSES_FILE
        table = self.to_arrow()
        with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
                pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "TeacherResponses":
        """Read a table written by ``save`` (``directory`` or the ``.arrow`` file itself)."""
        import pyarrow as pa

        p = Path(directory)
        path = p if p.suffix == ".arrow" else p / RESPONSES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no teacher responses here (expected a file written by "
                                    f"TeacherResponses.save)")
        try:
            with pa.memory_map(str(path), "r") as source:
                table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: not a readable Arrow IPC file: {e}") from e
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("farm_kind") != "TeacherResponses":
            raise ValueError(f"{path}: schema metadata farm_kind={meta.get('farm_kind')!r}, "
                             f"expected 'TeacherResponses'")
        if meta.get("format_version") != str(RESPONSES_FORMAT_VERSION):
            raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                             f"(expected {RESPONSES_FORMAT_VERSION})")
        neuron_ids = tuple(json.loads(meta["neuron_ids"]))
        missing = [c for c in (IMAGE_ID_COLUMN, *neuron_ids) if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing columns {missing[:5]}")
        image_ids = table.column(IMAGE_ID_COLUMN).to_numpy()
        responses = np.empty((table.num_rows, len(neuron_ids)), dtype=np.float32)
        for j, nid in enumerate(neuron_ids):
            responses[:, j] = table.column(nid).to_numpy()
        return cls(image_ids=image_ids, responses=responses, neuron_ids=neuron_ids,
                   teacher_id=meta["teacher_id"], bank_id=meta["bank_id"])


def teacher_fingerprint(teacher) -> str | None:
    """A stable id for a teacher: its ``teacher_id`` attribute; else a hash of the weights of its
    ``models`` (CompactTeacher) and its neuron ids; else, for a wrapper holding another teacher in
    ``.teacher`` (e.g. ``SelectOutputs``), that teacher's id plus a hash of the selected neuron ids;
    None when none of these exists."""
    tid = getattr(teacher, "teacher_id", None)
    if tid:
        return str(tid)
    models = getattr(teacher, "models", None)
    if not models:
        inner = getattr(teacher, "teacher", None)
        inner_id = teacher_fingerprint(inner) if inner is not None and inner is not teacher else None
        if inner_id is None:
            return None
        ids = hashlib.blake2b(json.dumps(list(teacher.neuron_ids)).encode(), digest_size=8).hexdigest()
        return f"{inner_id}-{type(teacher).__name__}-{ids}"
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(list(teacher.neuron_ids)).encode())
    for m in models:
        spec = getattr(m, "spec", None)
        if spec is not None:
            h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return f"{type(teacher).__name__}-{h.hexdigest()}"


def images_fingerprint(images: np.ndarray) -> str:
    """A content hash of an image array (shape, dtype and bytes)."""
    a = np.ascontiguousarray(images)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
    return f"images-{h.hexdigest()}"


def _slug(s: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", s)
    if len(clean) <= 60:
        return clean
    return clean[:40] + "-" + hashlib.blake2b(s.encode(), digest_size=8).hexdigest()


def responses_cache_path(cache_dir: str | Path, teacher_id: str, bank_id: str) -> Path:
    """The folder that caches the responses of ``teacher_id`` to bank ``bank_id``."""
    return Path(cache_dir) / f"{_slug(teacher_id)}__{_slug(bank_id)}"


ShardRunner = Callable[..., Iterable[tuple[np.ndarray, np.ndarray]]]


def shard_responses(teacher, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """The teacher's responses to one shard of images: float32 (n, neurons), shape-checked.
    batch_size: None = the teacher's own default (a teacher knows what its activations cost: a
    200-filter compact model at 112 px needs ~12 GB at batch 256, ~1.5 GB at its default 32)."""
    images = _check_images(images, "bank shard")
    r = np.asarray(teacher.predict(images) if batch_size is None else
                   teacher.predict(images, batch_size=batch_size), dtype=np.float32)
    if r.shape != (len(images), len(teacher.neuron_ids)):
        raise ValueError(f"teacher.predict returned shape {r.shape} for {len(images)} images and "
                         f"{len(teacher.neuron_ids)} neurons; expected (images, neurons)")
    return r


def compute_teacher_responses(teacher, bank_or_images, batch_size: int | None = None,
                              progress: Callable[[int, int | None], None] | None = None,
                              cache_dir: str | Path | None = None, teacher_id: str | None = None,
                              bank_id: str | None = None, runner: ShardRunner | None = None,
                              mirror: bool = False) -> TeacherResponses:
    """Every neuron's teacher response to every image, in ONE pass over the images.

    teacher: a ``farm.models.base.Teacher`` (``predict(uint8 (n, H, W, 3)) -> (n, neurons)``).
    bank_or_images: an image bank with ``iter_shards()`` -> (ids, images uint8, kinds) and ``bank_id``
        (streamed shard by shard, so the bank never has to fit in memory), or a uint8 array
        (N, H, W, 3) whose image ids are 0..N-1.
    progress: called as ``progress(images_done, images_total_or_None)`` after every shard/batch.
    cache_dir: when given, the table is stored under ``cache_dir`` keyed by (teacher id, bank id); a
        later call with the same key loads it instead of running the teacher.
    teacher_id / bank_id: override the ids (default: ``teacher_fingerprint(teacher)``; the bank's
        ``bank_id``, or a content hash of an image array).
    runner: how a bank's shards are run: ``runner(teacher, bank, batch_size, progress)`` -> one
        (image ids, responses (n, neurons)) pair per shard, in shard order. Default: one shard after
        another in this process. ``farm.fanout.ray_shard_runner`` runs them as Ray tasks.
    mirror: the responses to the images' left-right mirrors instead (same image ids; the bank id,
        and so the cache entry, gets a "|mirrored" suffix).
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None: the teacher's default), got {batch_size}")
    neuron_ids = tuple(str(n) for n in teacher.neuron_ids)
    is_bank = hasattr(bank_or_images, "iter_shards")
    if not is_bank:
        images = _check_images(bank_or_images, "compute_teacher_responses: images")
    tid = teacher_id or teacher_fingerprint(teacher)
    if bank_id is None:
        bank_id = getattr(bank_or_images, "bank_id", None) if is_bank else images_fingerprint(images)
    if mirror and bank_id:
        bank_id = f"{bank_id}|mirrored"

    cache = None
    if cache_dir is not None:
        if not tid:
            raise ValueError(f"compute_teacher_responses: cannot cache the responses of a "
                             f"{type(teacher).__name__} without an id: give it a teacher_id attribute "
                             f"or pass teacher_id=")
        if not bank_id:
            raise ValueError("compute_teacher_responses: cannot cache without a bank id: the bank has "
                             "no bank_id; pass bank_id=")
        cache = responses_cache_path(cache_dir, tid, str(bank_id))
        cached = None
        if (cache / RESPONSES_FILE).is_file():
            try:
                cached = TeacherResponses.load(cache)
            except (ValueError, OSError) as e:  # truncated or damaged: computed again, the file replaced
                log.warning("teacher responses cache %s is unreadable (%s); computing them again",
                            cache / RESPONSES_FILE, e)
        if cached is not None:
            if (cached.teacher_id, cached.bank_id, cached.neuron_ids) != (tid, str(bank_id), neuron_ids):
                raise ValueError(f"{cache}: cached responses are for teacher {cached.teacher_id!r}, bank "
                                 f"{cached.bank_id!r} and {cached.n_neurons} neurons, not for this "
                                 f"request; delete the folder")
            log.info("teacher responses loaded from cache %s", cache)
            return cached

    if runner is not None:
        if not is_bank:
            raise ValueError("compute_teacher_responses: a shard runner needs an image bank, not an array")
        parts = list(runner(teacher, bank_or_images, batch_size, progress, mirror=True) if mirror
                     else runner(teacher, bank_or_images, batch_size, progress))
    else:
        if is_bank:
            total = len(bank_or_images) if hasattr(bank_or_images, "__len__") else None
            shards = ((ids, imgs) for ids, imgs, *_ in bank_or_images.iter_shards())
        else:
            total = len(images)
            step = batch_size or 256  # images per progress report
            shards = ((np.arange(s, min(s + step, total), dtype=np.int64), images[s:s + step])
                      for s in range(0, total, step))
        parts, done = [], 0
        for ids, imgs in shards:
            if mirror:
                imgs = np.ascontiguousarray(imgs[:, :, ::-1])
            parts.append((ids, shard_responses(teacher, imgs, batch_size)))
            done += len(imgs)
            if progress is not None:
                progress(done, total)
    all_ids, all_resp = [], []
    for ids, r in parts:
        ids = np.asarray(ids, dtype=np.int64)
        r = np.asarray(r, dtype=np.float32)
        if r.shape != (len(ids), len(neuron_ids)):
            raise ValueError(f"teacher responses of shape {r.shape} for {len(ids)} images and "
                             f"{len(neuron_ids)} neurons; expected (images, neurons)")
        all_ids.append(ids)
        all_resp.append(r)
    if not all_ids:
        raise ValueError("compute_teacher_responses: no images")
    result = TeacherResponses(image_ids=np.concatenate(all_ids), responses=np.concatenate(all_resp),
                              neuron_ids=neuron_ids, teacher_id=tid or "unknown",
                              bank_id=str(bank_id or "unknown"))
    if cache is not None:
        result.save(cache)
    return result


def split_heldout(n: int, n_heldout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random split of n image indices into (train, heldout), both sorted int64 arrays.

    The paper holds out 5 k of its 10 k test images for pruning and monitoring (method.md §1.3, §5.1).
    """
    if not 0 < n_heldout < n:
        raise ValueError(f"split_heldout: need 0 < n_heldout < n, got n_heldout={n_heldout}, n={n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_heldout:]).astype(np.int64), np.sort(perm[:n_heldout]).astype(np.int64)

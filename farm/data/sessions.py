"""Recording sessions: images + responses + ids, stored as Parquet.

A Session holds one recording session:
  images     uint8 (N, H, W, 3) RGB
  responses  float32 (neurons, N, repeats), spikes per 100 ms, NaN-padded at the END of the repeat
             axis where an image had fewer repeats; averaged-only data has repeats == 1
  image_kinds  (N,) str: "normal", "gaudy", "synthetic", "maximizing", ...
  neuron_ids   "<session>:<index>", index = row in responses
  role         "train" | "validation" | "test" | "heldout"
  has_repeats  True when the repeat axis holds raw repeats; False when it is repeat-averaged only

Sessions whose images are not published (e.g. V4 session 201016, method.md §11.5a) keep their
responses usable for metrics: their ``images`` array has shape (N, 0, 0, 3) uint8 and
``metadata["images_available"]`` is False. ``validate`` accepts a zero-sized image array only
together with that flag, and ``Session.images_available`` reports it.

On disk (``write_session`` / ``read_session``), one Parquet file per session, one row per image:

  image      fixed_size_binary(H*W*3): the raw uint8 HWC pixels (absent when images are unavailable)
  kind       string: the image kind
  responses  fixed_size_list<float32>(neurons*repeats): this image's responses, neuron-major,
             NaN padding kept bit for bit

and the session fields as JSON values under ``farm.*`` keys of the Arrow schema metadata
(``farm.schema_version`` = ``SCHEMA_VERSION``). Fixed-size columns let a reader turn each column
into one numpy array without a per-row loop, so loading a session costs little more than reading
its bytes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from farm.files import atomic_path

logger = logging.getLogger(__name__)

ROLES = ("train", "validation", "test", "heldout")

#: Version of the on-disk layout written by ``write_session``; ``read_session`` reads only this one.
SCHEMA_VERSION = 1

#: Metadata key that marks a session without images (``images`` then has shape (N, 0, 0, 3)).
IMAGES_AVAILABLE = "images_available"

_META_PREFIX = "farm."
_META_FIELDS = ("schema_version", "session_id", "animal", "role", "has_repeats", "neuron_ids",
                "images_shape", "responses_shape", "metadata")
# zstd at level 1: V4 session pixels shrink ~18 % (48.5 -> 39.9 MB for 190923) for ~+0.05 s of
# load time against no compression (benchmarks/sessions_io.py); higher levels cost more than they save.
_COMPRESSION = "zstd"
_COMPRESSION_LEVEL = 1
_ROW_GROUP_ROWS = 256  # several row groups per session so pyarrow decodes them on parallel threads


class SessionError(ValueError):
    """A session (in memory or in a file) breaks the Session contract; the message names the
    source, the field and what was expected."""


@dataclass
class Session:
    """One recording session. Shapes: images uint8 (N, H, W, 3); responses float32
    (neurons, N, repeats), spikes per 100 ms, NaN only as trailing padding on the repeat axis;
    image_kinds str (N,); neuron_ids (neurons,). See the module docstring for sessions without
    images."""

    session_id: str
    images: np.ndarray
    responses: np.ndarray
    image_kinds: np.ndarray
    role: str = "train"
    has_repeats: bool = True
    animal: str | None = None
    neuron_ids: tuple[str, ...] = field(default_factory=tuple)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.session_id = str(self.session_id)
        if not self.neuron_ids:
            self.neuron_ids = tuple(f"{self.session_id}:{i}" for i in range(np.shape(self.responses)[0]))
        self.neuron_ids = tuple(self.neuron_ids)
        self.image_kinds = np.asarray(self.image_kinds, dtype=object)

    @property
    def n_neurons(self) -> int:
        return int(self.responses.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.responses.shape[1])

    @property
    def images_available(self) -> bool:
        """False for a session stored without images (``images`` of shape (N, 0, 0, 3))."""
        return bool(self.metadata.get(IMAGES_AVAILABLE, True))

    def mean_responses(self) -> np.ndarray:
        """Repeat-averaged responses, float32 (neurons, images)."""
        return np.nanmean(self.responses, axis=2).astype(np.float32)

    def repeat_counts(self) -> np.ndarray:
        """Non-NaN repeats per image, int (images,) (from neuron 0; the pattern is shared)."""
        return np.sum(~np.isnan(self.responses[0]), axis=1)

    def subset(self, image_index) -> "Session":
        """A Session with only the given images (same neurons), e.g. the first half of a test session."""
        idx = np.asarray(image_index)
        return Session(
            session_id=self.session_id,
            images=self.images[idx],
            responses=self.responses[:, idx],
            image_kinds=self.image_kinds[idx],
            role=self.role,
            has_repeats=self.has_repeats,
            animal=self.animal,
            neuron_ids=self.neuron_ids,
            metadata=dict(self.metadata),
        )

    def halves(self) -> tuple["Session", "Session"]:
        """First half (readout fitting) and second half (evaluation) in file order (method.md §1.6)."""
        h = self.n_images // 2
        return self.subset(np.arange(h)), self.subset(np.arange(h, self.n_images))

    def validate(self, source: str = "<memory>") -> "Session":
        """Check the Session contract; raise SessionError naming ``source`` and the field.

        Returns self, so ``Session(...).validate()`` reads as construction plus check.
        """

        def fail(field_name: str, expected: str, got) -> None:
            raise SessionError(f"{source}: session {self.session_id!r}: field '{field_name}': "
                               f"expected {expected}, got {got}")

        if not isinstance(self.session_id, str) or not self.session_id:
            fail("session_id", "a non-empty string", repr(self.session_id))
        if self.role not in ROLES:
            fail("role", f"one of {ROLES}", repr(self.role))
        if not isinstance(self.has_repeats, (bool, np.bool_)):
            fail("has_repeats", "a bool", repr(self.has_repeats))
        if self.animal is not None and not isinstance(self.animal, str):
            fail("animal", "a string or None", repr(self.animal))
        if not isinstance(self.metadata, dict):
            fail("metadata", "a dict", type(self.metadata).__name__)

        r = self.responses
        if not isinstance(r, np.ndarray) or r.ndim != 3 or not np.issubdtype(r.dtype, np.floating):
            fail("responses", "a 3-D float array (neurons, images, repeats)",
                 _describe_array(r))
        im = self.images
        if not isinstance(im, np.ndarray) or im.ndim != 4 or im.shape[3] != 3:
            fail("images", "an array of shape (N, H, W, 3)", _describe_array(im))
        if im.dtype != np.uint8:
            fail("images", "dtype uint8 (raw RGB 0-255)", f"dtype {im.dtype}")
        if im.shape[0] != r.shape[1]:
            fail("images", f"one image per response column: {r.shape[1]} images "
                 f"(responses shape {r.shape})", f"{im.shape[0]} images (shape {im.shape})")
        if r.shape[1] == 0:
            fail("responses", "a non-empty session (at least 1 image)", "0 images")
        if r.shape[0] == 0:
            fail("responses", "a non-empty session (at least 1 neuron)", "0 neurons")

        no_images = self.metadata.get(IMAGES_AVAILABLE, True) is False
        if no_images and im.shape[1:3] != (0, 0):
            fail("images", f"shape (N, 0, 0, 3) when metadata['{IMAGES_AVAILABLE}'] is False",
                 f"shape {im.shape}")
        if not no_images and (im.shape[1] == 0 or im.shape[2] == 0):
            fail("images", f"H, W > 0 (a zero-sized image array needs metadata['{IMAGES_AVAILABLE}']"
                 " = False)", f"shape {im.shape}")

        kinds = self.image_kinds
        if not isinstance(kinds, np.ndarray) or kinds.ndim != 1 or kinds.shape[0] != r.shape[1]:
            fail("image_kinds", f"one kind per image, shape ({r.shape[1]},)",
                 f"shape {np.shape(kinds)}")
        bad_kinds = [k for k in kinds if not isinstance(k, str) or not k]
        if bad_kinds:
            fail("image_kinds", "non-empty strings", f"{bad_kinds[:3]!r}")

        ids = self.neuron_ids
        if len(ids) != r.shape[0]:
            fail("neuron_ids", f"one id per neuron ({r.shape[0]})", f"{len(ids)} ids")
        if any(not isinstance(i, str) or not i for i in ids):
            fail("neuron_ids", "non-empty strings", repr([i for i in ids if not isinstance(i, str) or not i][:3]))
        if len(set(ids)) != len(ids):
            seen, dups = set(), []
            for i in ids:
                if i in seen:
                    dups.append(i)
                seen.add(i)
            fail("neuron_ids", "unique ids", f"duplicates {sorted(set(dups))[:5]}")

        n_rep = r.shape[2]
        if n_rep == 0:
            fail("responses", "at least 1 entry on the repeat axis", f"shape {r.shape}")
        if not self.has_repeats and n_rep != 1:
            fail("responses", "repeat axis of length 1 when has_repeats is False (averaged-only)",
                 f"shape {r.shape}")
        if np.isinf(r).any():
            n, i, k = np.argwhere(np.isinf(r))[0]
            fail("responses", "finite spike counts (NaN only as repeat padding)",
                 f"{r[n, i, k]} at (neuron {n}, image {i}, repeat {k})")
        if (r < 0).any():
            n, i, k = np.argwhere(r < 0)[0]
            fail("responses", "non-negative spike counts", f"{r[n, i, k]} at (neuron {n}, image {i}, repeat {k})")
        nan = np.isnan(r)
        if nan.any():
            if nan[:, :, 0].any():
                n, i = np.argwhere(nan[:, :, 0])[0]
                fail("responses", "at least one repeat for every image (repeat 0 not NaN)",
                     f"image {i} with zero repeats (neuron {n})")
            if (nan[:, :, :-1] & ~nan[:, :, 1:]).any():
                n, i, k = np.argwhere(nan[:, :, :-1] & ~nan[:, :, 1:])[0]
                fail("responses", "NaN only as trailing padding at the end of the repeat axis",
                     f"NaN at repeat {k} followed by a value (neuron {n}, image {i})")
            if (nan != nan[:1]).any():
                n, i, _ = np.argwhere(nan != nan[:1])[0]
                fail("responses", "the same NaN padding (repeat counts) for every neuron",
                     f"neuron {n} differs from neuron 0 at image {i}")
        return self


def _describe_array(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.ndim}-D {a.dtype} array of shape {a.shape}"
    return type(a).__name__


# ------------------------------------------------------------------------------------------ write


def _session_table(session: Session, source: str) -> pa.Table:
    """The Arrow table (one row per image) + schema metadata for ``session`` (already validated)."""
    n_neurons, n_images, n_rep = session.responses.shape
    meta_values = {
        "schema_version": SCHEMA_VERSION,
        "session_id": session.session_id,
        "animal": session.animal,
        "role": session.role,
        "has_repeats": bool(session.has_repeats),
        "neuron_ids": list(session.neuron_ids),
        "images_shape": [int(s) for s in session.images.shape],
        "responses_shape": [n_neurons, n_images, n_rep],
        "metadata": session.metadata,
    }
    schema_meta = {}
    for key, value in meta_values.items():
        try:
            schema_meta[_META_PREFIX + key] = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise SessionError(f"{source}: session {session.session_id!r}: field '{key}': "
                               f"expected JSON-serializable values, got {e}") from e

    columns = {}
    if session.images_available:
        pixels = np.ascontiguousarray(session.images, dtype=np.uint8)
        width = int(np.prod(pixels.shape[1:]))
        columns["image"] = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), n_images, [None, pa.py_buffer(pixels)])
    columns["kind"] = pa.array([str(k) for k in session.image_kinds], type=pa.string())
    # (neurons, images, repeats) -> one row per image holding its neurons x repeats block.
    per_image = np.ascontiguousarray(session.responses.astype(np.float32, copy=False).transpose(1, 0, 2))
    columns["responses"] = pa.FixedSizeListArray.from_arrays(
        pa.array(per_image.reshape(-1), type=pa.float32()), n_neurons * n_rep)
    table = pa.table(columns)
    return table.replace_schema_metadata(schema_meta)


def write_session(session: Session, path: str | Path) -> Path:
    """Validate ``session`` and write it to ``path`` (Parquet, layout in the module docstring).

    Atomic: the file is written to a temp file in the same folder and moved into place with
    ``os.replace``; on any failure neither the temp file nor a new ``path`` is left behind (an
    existing ``path`` stays untouched). Responses are stored as float32. Returns ``path``.
    """
    path = Path(path)
    session.validate(source=str(path))
    if not path.parent.is_dir():
        raise SessionError(f"{path}: cannot write: folder {path.parent} does not exist")
    table = _session_table(session, str(path))
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(
            table, tmp,
            row_group_size=_ROW_GROUP_ROWS,
            compression=_COMPRESSION, compression_level=_COMPRESSION_LEVEL,
            use_dictionary=["kind"],
            write_statistics=["kind"],  # min/max of 37 kB pixel blobs would only bloat the footer
            write_page_checksum=True,
        )
    return path


# ------------------------------------------------------------------------------------------- read


def _read_header(path: Path, schema: pa.Schema) -> dict:
    """Decode and check the ``farm.*`` schema metadata of ``path``."""
    raw = schema.metadata or {}
    meta = {k.decode(): v for k, v in raw.items() if k.startswith(_META_PREFIX.encode())}
    if not meta:
        raise SessionError(f"{path}: not a farm session file: the Parquet schema has no "
                           f"'{_META_PREFIX}*' metadata")
    header = {}
    for key in _META_FIELDS:
        full = _META_PREFIX + key
        if full not in meta:
            raise SessionError(f"{path}: metadata field '{full}' is missing")
        try:
            header[key] = json.loads(meta[full])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SessionError(f"{path}: metadata field '{full}': expected JSON, got {meta[full][:80]!r}") from e
        if key == "schema_version" and header[key] != SCHEMA_VERSION:
            raise SessionError(f"{path}: unknown schema version {header[key]!r}: this farm reads "
                               f"schema version {SCHEMA_VERSION}")
    for key, n in (("images_shape", 4), ("responses_shape", 3)):
        shape = header[key]
        if not (isinstance(shape, list) and len(shape) == n and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise SessionError(f"{path}: metadata field '{_META_PREFIX}{key}': expected {n} "
                               f"non-negative ints, got {shape!r}")
    if not isinstance(header["metadata"], dict):
        raise SessionError(f"{path}: metadata field '{_META_PREFIX}metadata': expected a JSON "
                           f"object, got {header['metadata']!r}")
    if not isinstance(header["neuron_ids"], list):
        raise SessionError(f"{path}: metadata field '{_META_PREFIX}neuron_ids': expected a list")
    return header


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise SessionError(f"{path}: session file not found")
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise SessionError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from e


def read_session_header(path: str | Path) -> dict:
    """The session fields of ``path`` without its arrays: session_id, animal, role, has_repeats,
    neuron_ids, images_shape, responses_shape, metadata, schema_version. Cheap (footer only)."""
    path = Path(path)
    return _read_header(path, _open_parquet(path).schema_arrow)


def read_session(path: str | Path) -> Session:
    """Read and validate a Session written by ``write_session``.

    Raises SessionError for a missing file, a truncated or corrupt file, an unknown schema
    version, missing metadata fields, columns that disagree with the recorded shapes, or a
    Session that fails ``Session.validate``. Returned arrays are writable and own their memory.
    """
    path = Path(path)
    pf = _open_parquet(path)
    header = _read_header(path, pf.schema_arrow)
    n_neurons, n_images, n_rep = header["responses_shape"]
    images_shape = tuple(header["images_shape"])
    images_available = header["metadata"].get(IMAGES_AVAILABLE, True) is not False
    try:
        table = pf.read(use_threads=True)
    except (pa.ArrowException, OSError) as e:
        raise SessionError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from e

    if table.num_rows != n_images or images_shape[0] != n_images:
        raise SessionError(f"{path}: expected {n_images} rows (one per image, from "
                           f"'{_META_PREFIX}responses_shape'), got {table.num_rows} rows and "
                           f"'{_META_PREFIX}images_shape' {list(images_shape)}")

    def chunks(name: str, expected_type: pa.DataType) -> list[pa.Array]:
        if name not in table.column_names:
            raise SessionError(f"{path}: column '{name}' is missing")
        col = table.column(name)
        if col.type != expected_type:
            raise SessionError(f"{path}: column '{name}': expected type {expected_type}, got {col.type}")
        if col.null_count:
            raise SessionError(f"{path}: column '{name}': expected no nulls, got {col.null_count}")
        return col.chunks

    # Copy chunk by chunk straight into the final arrays: one copy, no combine_chunks.
    per_image = np.empty((n_images, n_neurons, n_rep), dtype=np.float32)
    row = 0
    for chunk in chunks("responses", pa.list_(pa.float32(), n_neurons * n_rep)):
        values = chunk.flatten().to_numpy(zero_copy_only=True)
        per_image[row:row + len(chunk)] = values.reshape(len(chunk), n_neurons, n_rep)
        row += len(chunk)
    responses = np.ascontiguousarray(per_image.transpose(1, 0, 2))

    kinds = np.array([k for chunk in chunks("kind", pa.string()) for k in chunk.to_pylist()], dtype=object)

    images = np.zeros(images_shape, dtype=np.uint8)
    if images_available:
        width = int(np.prod(images_shape[1:]))
        flat_images = images.reshape(n_images, width)
        row = 0
        for chunk in chunks("image", pa.binary(width)):
            data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8, count=len(chunk) * width,
                                 offset=chunk.offset * width)
            flat_images[row:row + len(chunk)] = data.reshape(len(chunk), width)
            row += len(chunk)

    session = Session(
        session_id=header["session_id"],
        images=images,
        responses=responses,
        image_kinds=kinds,
        role=header["role"],
        has_repeats=header["has_repeats"],
        animal=header["animal"],
        neuron_ids=tuple(header["neuron_ids"]),
        metadata=header["metadata"],
    )
    return session.validate(source=str(path))


def list_sessions(directory: str | Path) -> list[Path]:
    """Session files (``*.parquet``) in ``directory``, sorted by file name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SessionError(f"{directory}: session folder not found")
    return sorted(p for p in directory.glob("*.parquet") if p.is_file() and not p.name.startswith("."))


def check_job_sessions(sessions: Sequence[Session], where: str) -> None:
    """The sessions of one job fit together: no neuron id in two sessions, and one image size (the
    bank, the teacher and every compact model see images of one size). SessionError naming them."""
    owner: dict[str, str] = {}
    for s in sessions:
        for nid in s.neuron_ids:
            if nid in owner and owner[nid] != s.session_id:
                raise SessionError(f"{where}: neuron id {nid!r} is in session {owner[nid]!r} and in "
                                   f"{s.session_id!r}; neuron ids must be unique across a job's sessions")
            owner[nid] = s.session_id
    sizes: dict[tuple, list[str]] = {}
    for s in sessions:
        if s.images_available and s.images.size:
            sizes.setdefault(tuple(s.images.shape[1:3]), []).append(s.session_id)
    if len(sizes) > 1:
        desc = "; ".join(f"{h}x{w} px: {', '.join(ids)}" for (h, w), ids in sorted(sizes.items()))
        raise SessionError(f"{where}: the sessions' images differ in size ({desc}); one job needs one "
                           f"image size (resize the odd sessions, or run them as separate jobs)")


def read_sessions(directory: str | Path, role: str | None = None) -> list[Session]:
    """All sessions in ``directory`` (only those with ``role`` if given), sorted by session id.

    Files of other roles are skipped after reading only their footer. Two files holding the same
    session id are an error.
    """
    if role is not None and role not in ROLES:
        raise SessionError(f"role: expected one of {ROLES} or None, got {role!r}")
    chosen: dict[str, Path] = {}
    for path in list_sessions(directory):
        header = read_session_header(path)
        if role is not None and header["role"] != role:
            continue
        sid = header["session_id"]
        if sid in chosen:
            raise SessionError(f"{path}: session id {sid!r} is also stored in {chosen[sid]}")
        chosen[sid] = path
    return [read_session(chosen[sid]) for sid in sorted(chosen)]

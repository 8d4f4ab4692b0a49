"""Import of the published V4 data release (Cowley, Stan, Pillow & Smith) into Sessions.

Release layout (method.md §1.1-§1.2), under one source folder:

  responses_raw/responses_<session>.npy               float64 (neurons, images, max_repeats), NaN-padded
  responses_repeat_averaged/responses_<session>.npy   float64 (neurons, images)
  images/images_<session>.zip                         112x112 RGB JPEGs ``imageNNNN.jpg``, 1-based

``load_v4_session`` builds one Session: raw repeats when the raw file exists (``has_repeats`` True),
otherwise the repeat-averaged responses as a single repeat (``has_repeats`` False,
``metadata["responses_kind"] == "averaged-only"``). Image ``imageK.jpg`` becomes ``images[K-1]``,
aligned with response index K-1. A session without an image zip (201016-201020 are not published)
gets ``images`` of shape (N, 0, 0, 3) and ``metadata["images_available"] = False`` (see
farm.data.sessions). ``import_v4_release`` writes one Parquet file per session.

Image kinds follow method.md §1.5: for the 1909xx training sessions images 1-600 are "normal",
601-900 "synthetic" (the code's "synth"; the ensemble skips them) and 901-1200 "active_learning".
A session of one image type gets that kind throughout. Where the readme lists several types but
the release does not say which image is which, every image is "unknown" and
``metadata["image_types"]`` keeps the readme's description.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from farm.data.sessions import IMAGES_AVAILABLE, Session, SessionError, write_session

logger = logging.getLogger(__name__)

#: Side of the square RGB images of the release, pixels (method.md §1.2).
V4_IMAGE_SIZE = 112

NORMAL = "normal"
SYNTHETIC = "synthetic"
ACTIVE_LEARNING = "active_learning"
GAUDY = "gaudy"
MAXIMIZING = "maximizing"
VALIDATION_EXPERIMENT = "validation_experiment"
ARTIFICIAL = "artificial"
BASHIVAN = "bashivan"
#: Kind of every image of a session whose readme lists several types in an unpublished order.
UNKNOWN = "unknown"

# A member is found by its name suffix: some zips keep images under a folder (images_190923/...).
_MEMBER = re.compile(r"(?:^|/)image(\d+)\.jpg$")


@dataclass(frozen=True)
class V4SessionInfo:
    """One row of method.md §1.5.

    n_neurons, n_images: sizes of the release files (images: "images in file").
    repeats: the readme's repeats per image (text: some rows give a range).
    image_types: the readme's description of the images.
    kind_ranges: ((first, last, kind), ...), 1-based inclusive image numbers covering 1..n_images;
        empty when the per-image order of several types is not published (kinds become "unknown").
    ensemble_images: 1-based inclusive ranges of the images the ensemble trained on (training
        sessions only; empty for test/validation/held-out).
    """

    session_id: str
    animal: str
    role: str
    n_neurons: int
    n_images: int
    repeats: str
    image_types: str
    kind_ranges: tuple[tuple[int, int, str], ...] = ()
    ensemble_images: tuple[tuple[int, int], ...] = ()

    def image_kinds(self) -> np.ndarray:
        """(n_images,) object array of kind strings, index K-1 for image K."""
        kinds = np.full(self.n_images, UNKNOWN, dtype=object)
        for first, last, kind in self.kind_ranges:
            kinds[first - 1:last] = kind
        return kinds


def _animal(session_id: str) -> str:
    # WE = 1909xx; PE = 2010xx-2103xx; RA = 2106xx-2111xx (method.md §1.5)
    if session_id.startswith("1909"):
        return "WE"
    if "201000" <= session_id < "210400":
        return "PE"
    if "210600" <= session_id < "211200":
        return "RA"
    raise ValueError(f"session {session_id}: date outside the release's animals")


def _row(session_id, role, n_neurons, n_images, repeats, image_types, kinds=None) -> V4SessionInfo:
    """``kinds``: a kind for all images, a tuple of ranges, or None for an unpublished order."""
    if isinstance(kinds, str):
        kinds = ((1, n_images, kinds),)
    if session_id.startswith("1909") and role == "train":
        ensemble = ((1, 600), (901, 1200))
    elif role == "train":
        ensemble = ((1, n_images),)
    else:
        ensemble = ()
    return V4SessionInfo(str(session_id), _animal(str(session_id)), role, n_neurons, n_images,
                         str(repeats), image_types, tuple(kinds or ()), ensemble)


# 1909xx training sessions: the files hold 1,200 images (readme: 900); 601-900 are the code's
# "synth" images, which the ensemble skips (method.md §1.5, §11.2).
_WE_TRAIN_KINDS = ((1, 600, NORMAL), (601, 900, SYNTHETIC), (901, 1200, ACTIVE_LEARNING))
_WE_TRAIN_TYPES = "normal 600 + active learning 300 (file: 1200; 601-900 synth)"

#: The 50 sessions of the release (method.md §1.5), keyed by session id.
V4_SESSIONS: dict[str, V4SessionInfo] = {row.session_id: row for row in (
    _row("190923", "test", 33, 1200, 14, "normal 1200", NORMAL),
    _row("190924", "train", 25, 1200, "11-15", _WE_TRAIN_TYPES, _WE_TRAIN_KINDS),
    _row("190925", "train", 36, 1200, 14, _WE_TRAIN_TYPES, _WE_TRAIN_KINDS),
    _row("190926", "train", 27, 1200, "11-15", _WE_TRAIN_TYPES, _WE_TRAIN_KINDS),
    _row("190927", "train", 31, 1200, 11, _WE_TRAIN_TYPES, _WE_TRAIN_KINDS),
    _row("190928", "train", 24, 1200, 13, _WE_TRAIN_TYPES, _WE_TRAIN_KINDS),
    _row("190929", "train", 33, 1200, 15, _WE_TRAIN_TYPES, _WE_TRAIN_KINDS),
    _row("201016", "train", 82, 600, 6, "normal 300, gaudy 300"),
    _row("201017", "train", 88, 600, 7, "normal, active learning, gaudy"),
    _row("201018", "train", 80, 600, 5, "normal 600", NORMAL),
    _row("201019", "train", 82, 1600, 4, "normal 800, active learning 400, gaudy 400"),
    _row("201020", "train", 87, 1600, 4, "normal 800, active learning 400, gaudy 400"),
    _row("201021", "train", 88, 1600, 7, "normal 800, active learning 400, gaudy 400"),
    _row("201022", "train", 79, 2000, 5, "normal 1000, active learning 500, gaudy 500"),
    _row("201023", "train", 86, 2000, 7, "normal 1000, active learning 500, gaudy 500"),
    _row("201024", "train", 85, 2000, 7, "normal 1000, active learning 500, gaudy 500"),
    _row("201025", "test", 89, 1200, 12, "normal 1200", NORMAL),
    _row("210224", "validation", 67, 800, 9, "normal 800", NORMAL),
    _row("210225", "test", 55, 1200, 6, "normal 1200", NORMAL),
    _row("210226", "train", 78, 1600, 6, "normal 600, maximizing 1000"),
    _row("210301", "train", 61, 2000, 4, "maximizing 650, validation experiments 1350"),
    _row("210302", "train", 70, 2000, 5, "maximizing 650, validation experiments 1350"),
    _row("210303", "train", 67, 2049, 3, "maximizing 2049", MAXIMIZING),
    _row("210304", "train", 65, 1968, 5, "maximizing 1968", MAXIMIZING),
    _row("210305", "train", 70, 400, 22, "validation experiments 400", VALIDATION_EXPERIMENT),
    _row("210308", "train", 70, 2000, 4, "normal 500, validation experiments 1500"),
    _row("210309", "train", 56, 2000, 4, "normal 600, validation experiments 1200, artificial 200"),
    _row("210310", "train", 64, 2000, 3, "normal 1000, gaudy 1000"),
    _row("210312", "train", 81, 2000, 4, "maximizing 2000", MAXIMIZING),
    _row("210315", "train", 65, 2000, 2, "maximizing 2000", MAXIMIZING),
    _row("210316", "train", 62, 2000, 3, "normal 1000, gaudy 1000"),
    # Order measured on images_210322.zip: images 601-1200 are all grey-aperture Bashivan stimuli.
    _row("210322", "train", 59, 1200, 4, "normal 600, Bashivan 600",
         ((1, 600, NORMAL), (601, 1200, BASHIVAN))),
    _row("210323", "train", 59, 1200, 4, "normal 600, gaudy 600"),
    _row("210324", "train", 54, 1200, 4, "normal 600, gaudy 600"),
    _row("210325", "heldout", 50, 640, 8, "Bashivan 640", BASHIVAN),
    _row("210326", "train", 60, 1200, 4, "normal 600, gaudy 600"),
    _row("210620", "train", 42, 1600, 9, "normal 1600", NORMAL),
    _row("210621", "train", 51, 1200, 16, "normal 1200", NORMAL),
    _row("211008", "train", 21, 1200, 24, "normal 1200", NORMAL),
    _row("211012", "train", 51, 2000, "11-18", "normal 1000, gaudy 1000"),
    _row("211013", "train", 52, 2000, "11-18", "normal 1000, gaudy 1000"),
    _row("211014", "train", 46, 2000, "11-18", "normal 1000, gaudy 1000"),
    _row("211015", "train", 49, 2000, "11-18", "normal 1000, gaudy 1000"),
    _row("211018", "train", 56, 3000, 10, "normal 1500, gaudy 1500"),
    _row("211022", "test", 42, 1600, 20, "normal 1600", NORMAL),
    _row("211025", "train", 54, 2000, 16, "normal 233, maximizing 150, gaudy 233, artificial 1384"),
    _row("211026", "train", 56, 2000, "13-18", "normal, validation experiments, active learning 250, gaudy 250"),
    _row("211027", "train", 56, 2000, "13-18", "normal, validation experiments, active learning 250, gaudy 250"),
    _row("211028", "train", 55, 2000, "13-18", "normal, validation experiments, active learning 250, gaudy 250"),
    _row("211103", "train", 49, 3000, 13, "normal, maximizing, active learning, gaudy (750 each)"),
)}


def _paths(src: Path, session_id: str) -> tuple[Path, Path, Path]:
    return (src / "responses_raw" / f"responses_{session_id}.npy",
            src / "responses_repeat_averaged" / f"responses_{session_id}.npy",
            src / "images" / f"images_{session_id}.zip")


def _load_npy(path: Path, ndim: int) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise SessionError(f"{path}: not a readable .npy response file: {e}") from e
    if array.ndim != ndim or not np.issubdtype(array.dtype, np.floating):
        raise SessionError(f"{path}: expected a {ndim}-D float array, got {array.ndim}-D {array.dtype} "
                           f"of shape {array.shape}")
    return array


def read_v4_images(zip_path: str | Path, n_images: int, size: int = V4_IMAGE_SIZE) -> np.ndarray:
    """Decode ``image1.jpg`` ... ``image<n_images>.jpg`` from a release zip.

    Members are matched by the name suffix ``imageNNNN.jpg`` (any folder, any archive order).
    Returns uint8 (n_images, size, size, 3) RGB with ``imageK.jpg`` at index K-1. Raises
    SessionError naming the zip for a missing or duplicated image number, numbers beyond
    ``n_images``, an undecodable member, or an image that is not ``size``x``size`` RGB.
    """
    zip_path = Path(zip_path)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise SessionError(f"{zip_path}: not a readable zip file: {e}") from e
    with zf:
        members: dict[int, str] = {}
        for name in zf.namelist():
            match = _MEMBER.search(name)
            if match is None or name.startswith("__MACOSX/"):
                continue
            number = int(match.group(1))
            if number in members:
                raise SessionError(f"{zip_path}: image {number} appears twice: {members[number]!r} "
                                   f"and {name!r}")
            members[number] = name
        extra = sorted(k for k in members if not 1 <= k <= n_images)
        if extra:
            raise SessionError(f"{zip_path}: count mismatch: the responses have {n_images} images "
                               f"(image1..image{n_images}) but the zip also holds image numbers "
                               f"{extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(members)} images)")
        missing = [k for k in range(1, n_images + 1) if k not in members]
        if missing:
            raise SessionError(f"{zip_path}: image {missing[0]} (image{missing[0]:04d}.jpg) is missing"
                               f" ({len(missing)} of {n_images} images missing)")

        images = np.empty((n_images, size, size, 3), dtype=np.uint8)
        for number in range(1, n_images + 1):
            name = members[number]
            try:
                with Image.open(BytesIO(zf.read(name))) as im:
                    im.load()
                    if im.mode != "RGB" or im.size != (size, size):
                        raise SessionError(f"{zip_path}: member {name!r} (image {number}): expected a "
                                           f"{size}x{size} RGB image, got mode {im.mode} size "
                                           f"{im.size[0]}x{im.size[1]}")
                    images[number - 1] = np.asarray(im)
            except SessionError:
                raise
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise SessionError(f"{zip_path}: member {name!r} (image {number}) cannot be decoded: {e}") from e
    return images


def load_v4_session(src_dir: str | Path, session_id: str | int, require_images: bool = False) -> Session:
    """One session of the release in ``src_dir`` as a validated Session.

    Responses: raw repeats (float32 (neurons, N, max_repeats), NaN padding kept) when
    ``responses_raw/responses_<id>.npy`` exists, else the repeat-averaged file as one repeat
    (float32 (neurons, N, 1), ``has_repeats`` False). Images: ``images/images_<id>.zip`` decoded to
    uint8 (N, 112, 112, 3); without a zip, (N, 0, 0, 3) and ``metadata["images_available"]``
    False, or a SessionError if ``require_images``. Role, animal and image kinds come from
    ``V4_SESSIONS``. Errors name the file and what is wrong.
    """
    src = Path(src_dir)
    sid = str(session_id)
    if sid not in V4_SESSIONS:
        raise SessionError(f"session {sid!r}: not a session of the V4 release (V4_SESSIONS)")
    info = V4_SESSIONS[sid]
    raw_path, avg_path, zip_path = _paths(src, sid)

    if raw_path.is_file():
        responses = _load_npy(raw_path, 3).astype(np.float32)
        has_repeats, responses_file, responses_kind = True, raw_path, "raw"
        if avg_path.is_file():
            averaged = _load_npy(avg_path, 2)
            if averaged.shape != responses.shape[:2]:
                raise SessionError(f"{avg_path}: count mismatch: shape {averaged.shape} but {raw_path} "
                                   f"has (neurons, images) {responses.shape[:2]}")
    elif avg_path.is_file():
        responses = _load_npy(avg_path, 2).astype(np.float32)[:, :, None]
        has_repeats, responses_file, responses_kind = False, avg_path, "averaged-only"
    else:
        raise SessionError(f"{avg_path}: missing response file for session {sid} "
                           f"(looked for {raw_path} and {avg_path})")
    n_images = responses.shape[1]
    if n_images != info.n_images:
        raise SessionError(f"{responses_file}: count mismatch: {n_images} images, but session {sid} "
                           f"has {info.n_images} images in the release table (V4_SESSIONS)")

    if zip_path.is_file():
        images = read_v4_images(zip_path, n_images)
        images_file = str(zip_path.relative_to(src))
    elif require_images:
        raise SessionError(f"{zip_path}: missing image zip for session {sid} (require_images=True)")
    else:
        logger.info("session %s: no %s; importing responses without images", sid, zip_path)
        images = np.zeros((n_images, 0, 0, 3), dtype=np.uint8)
        images_file = None

    if responses.shape[0] != info.n_neurons:
        logger.warning("session %s: %s has %d neurons, the release table says %d", sid,
                       responses_file, responses.shape[0], info.n_neurons)

    metadata = {
        "source": "V4 release, Cowley, Stan, Pillow & Smith (github.com/cowleygroup/V4_compact_models)",
        "responses_file": str(responses_file.relative_to(src)),
        "responses_kind": responses_kind,
        "units": "spike counts per 100 ms",
        "images_file": images_file,
        IMAGES_AVAILABLE: images_file is not None,
        "image_types": info.image_types,
        "nominal_repeats": info.repeats,
        "ensemble_images": [list(r) for r in info.ensemble_images],
    }
    session = Session(
        session_id=sid,
        images=images,
        responses=responses,
        image_kinds=info.image_kinds(),
        role=info.role,
        has_repeats=has_repeats,
        animal=info.animal,
        metadata=metadata,
    )
    return session.validate(source=str(responses_file))


def find_v4_sessions(src_dir: str | Path) -> list[str]:
    """Ids of the sessions with a response file (raw or repeat-averaged) in ``src_dir``, sorted."""
    src = Path(src_dir)
    if not src.is_dir():
        raise SessionError(f"{src}: V4 release folder not found")
    ids = {p.stem.removeprefix("responses_")
           for sub in ("responses_raw", "responses_repeat_averaged")
           for p in (src / sub).glob("responses_*.npy")}
    return sorted(ids)


def import_v4_release(src_dir: str | Path, out_dir: str | Path, sessions: Iterable[str] | None = None,
                      progress: Callable[[int, int, str], None] | None = None) -> list[Path]:
    """Write ``<out_dir>/<session>.parquet`` for each session of the release in ``src_dir``.

    sessions: ids to import; None = every session with a response file in ``src_dir`` (ids not
        in ``V4_SESSIONS`` are skipped with a warning). Requested ids are checked before any
        file is written.
    progress: called as ``progress(done, total, session_id)`` after each session is written.
    Returns the written paths in import order (sorted by session id when ``sessions`` is None).
    All or nothing: the sessions are written into a hidden folder next to ``out_dir`` and moved in
    only when every one of them was read and written; a failure leaves ``out_dir`` as it was.
    """
    src, out = Path(src_dir), Path(out_dir)
    found = find_v4_sessions(src)
    if sessions is None:
        unknown = [s for s in found if s not in V4_SESSIONS]
        if unknown:
            logger.warning("%s: skipping response files of sessions not in the release table: %s", src, unknown)
        chosen = [s for s in found if s in V4_SESSIONS]
    else:
        chosen = [str(s) for s in sessions]
        not_release = [s for s in chosen if s not in V4_SESSIONS]
        if not_release:
            raise SessionError(f"sessions {not_release}: not sessions of the V4 release (V4_SESSIONS)")
        absent = [s for s in chosen if s not in found]
        if absent:
            raise SessionError(f"{src}: no response file for sessions {absent} "
                               f"(found: {', '.join(found) or 'none'})")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.importing-"))
    try:
        for done, sid in enumerate(chosen, start=1):
            session = load_v4_session(src, sid)
            write_session(session, stage / f"{sid}.parquet")
            logger.info("imported V4 session %s (%d/%d): %d neurons x %d images", sid, done, len(chosen),
                        session.n_neurons, session.n_images)
            if progress is not None:
                progress(done, len(chosen), sid)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for sid in chosen:
            os.replace(stage / f"{sid}.parquet", out / f"{sid}.parquet")
            written.append(out / f"{sid}.parquet")
        return written
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def release_sessions(src_dir: str | Path) -> list[str]:
    """The sessions of the V4 release present in ``src_dir`` (what a full import writes)."""
    return [s for s in find_v4_sessions(Path(src_dir)) if s in V4_SESSIONS]

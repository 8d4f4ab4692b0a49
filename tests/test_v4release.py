"""Import of the published V4 release: every session here, alignment, kinds, errors, Parquet."""

from __future__ import annotations

import hashlib
import zipfile
from collections import Counter
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from farm.data.sessions import SessionError, read_session
from farm.data.v4release import (
    ACTIVE_LEARNING,
    BASHIVAN,
    NORMAL,
    SYNTHETIC,
    UNKNOWN,
    VALIDATION_EXPERIMENT,
    V4_SESSIONS,
    find_v4_sessions,
    import_v4_release,
    load_v4_session,
)

# /work/shared/data/v4/README.md: session -> (neurons, images)
README_SIZES = {
    "190923": (33, 1200), "190925": (36, 1200), "190927": (31, 1200), "190928": (24, 1200),
    "190929": (33, 1200), "210224": (67, 800), "210305": (70, 400), "210322": (59, 1200),
    "210621": (51, 1200), "201016": (82, 600),
}
WITH_IMAGES = sorted(set(README_SIZES) - {"201016"})


@pytest.fixture(scope="module")
def v4_sessions(v4_dir):
    """All 10 sessions of the local release, decoded once for the module (~5 s)."""
    return {sid: load_v4_session(v4_dir, sid) for sid in find_v4_sessions(v4_dir)}


def zip_pixels(v4_dir, session_id: str, member: str) -> np.ndarray:
    """Independent read of one image: the member by its exact name, decoded by PIL."""
    with zipfile.ZipFile(v4_dir / "images" / f"images_{session_id}.zip") as zf:
        return np.asarray(Image.open(BytesIO(zf.read(member))).convert("RGB"))


def member_name(session_id: str, k: int) -> str:
    # 190923 is the one zip here that keeps its images under a folder
    prefix = "images_190923/" if session_id == "190923" else ""
    return f"{prefix}image{k:04d}.jpg"


# ----------------------------------------------------------------------------- the table


def test_table_matches_method_counts():
    rows = list(V4_SESSIONS.values())
    assert len(rows) == 50
    assert Counter(r.role for r in rows) == {"train": 44, "test": 4, "validation": 1, "heldout": 1}
    assert sorted(r.session_id for r in rows if r.role == "test") == ["190923", "201025", "210225", "211022"]
    assert sum(r.n_neurons for r in rows if r.role == "test") == 219
    assert V4_SESSIONS["210224"].role == "validation" and V4_SESSIONS["210325"].role == "heldout"
    # method.md §1.5 [measured]: 2,612 training neurons, 70,817 image presentations, 4.28 M pairs
    train = [r for r in rows if r.role == "train"]
    assert sum(r.n_neurons for r in train) == 2612
    used = {r.session_id: sum(b - a + 1 for a, b in r.ensemble_images) for r in train}
    assert sum(used.values()) == 70817
    assert round(sum(r.n_neurons * used[r.session_id] for r in train) / 1e4) == 428


def test_table_animals_by_date():
    for r in V4_SESSIONS.values():
        expected = "WE" if r.session_id.startswith("1909") else "PE" if r.session_id < "210600" else "RA"
        assert r.animal == expected, r.session_id


def test_table_kind_ranges_cover_every_image():
    for r in V4_SESSIONS.values():
        kinds = r.image_kinds()
        assert kinds.shape == (r.n_images,)
        if r.kind_ranges:
            assert UNKNOWN not in set(kinds), r.session_id


# ----------------------------------------------------------------------------- real sessions


def test_all_local_sessions_found(v4_dir):
    assert find_v4_sessions(v4_dir) == sorted(README_SIZES)


@pytest.mark.parametrize("session_id", sorted(README_SIZES))
def test_counts_and_shapes(v4_sessions, session_id):
    s = v4_sessions[session_id]
    n_neurons, n_images = README_SIZES[session_id]
    assert (s.n_neurons, s.n_images) == (n_neurons, n_images)
    assert s.responses.dtype == np.float32
    assert s.neuron_ids[0] == f"{session_id}:0" and len(s.neuron_ids) == n_neurons
    assert s.role == V4_SESSIONS[session_id].role
    assert s.image_kinds.shape == (n_images,)
    if session_id == "201016":
        assert s.images.shape == (n_images, 0, 0, 3) and not s.images_available
    else:
        assert s.images.shape == (n_images, 112, 112, 3) and s.images.dtype == np.uint8
        assert s.images_available


@pytest.mark.parametrize("session_id", WITH_IMAGES)
def test_image_k_is_response_index_k_minus_1(v4_dir, v4_sessions, session_id):
    s = v4_sessions[session_id]
    with zipfile.ZipFile(v4_dir / "images" / f"images_{session_id}.zip") as zf:
        first_member = zf.namelist()[1 if session_id == "190923" else 0]  # archive order, not numeric
    first_k = int(first_member.rsplit("image", 1)[1][:4])
    for k in sorted({1, 2, s.n_images // 2 + 1, s.n_images, first_k}):
        assert np.array_equal(s.images[k - 1], zip_pixels(v4_dir, session_id, member_name(session_id, k))), k


@pytest.mark.parametrize("session_id, k, sha256", [
    ("190923", 1, "2d47c32d8e7756ad9e01b0cd9ad58231b3a2cd92d8adfc46341443674fe941ef"),
    ("190925", 1018, "0a7629ab0edb8c9db49810b4f2b75b434b14dbea95e02a8cf1321a6129be8e79"),
    ("210322", 601, "59019255c5a1e4bcda75f882cf7100bbd6819e8a683486d3a892f5c3b910de71"),
])
def test_pinned_pixel_checksums(v4_sessions, session_id, k, sha256):
    # sha256 of the decoded uint8 HWC pixels of imageK.jpg, computed once with zipfile + PIL
    assert hashlib.sha256(v4_sessions[session_id].images[k - 1].tobytes()).hexdigest() == sha256


def test_201016_raw_repeats_and_average(v4_dir, v4_sessions):
    s = v4_sessions["201016"]
    assert s.has_repeats and s.responses.shape == (82, 600, 10)
    assert s.metadata["responses_kind"] == "raw"
    counts = s.repeat_counts()
    assert counts.min() == 5 and counts.max() == 9  # data README: 5-9 repeats
    raw = np.load(v4_dir / "responses_raw" / "responses_201016.npy")
    assert np.array_equal(np.isnan(s.responses), np.isnan(raw))
    averaged = np.load(v4_dir / "responses_repeat_averaged" / "responses_201016.npy")
    np.testing.assert_allclose(s.mean_responses(), averaged, rtol=1e-6, atol=0)
    assert set(s.image_kinds) == {UNKNOWN} and "gaudy" in s.metadata["image_types"]


@pytest.mark.parametrize("session_id", WITH_IMAGES)
def test_averaged_only_sessions(v4_dir, v4_sessions, session_id):
    s = v4_sessions[session_id]
    assert not s.has_repeats and s.responses.shape[2] == 1
    assert s.metadata["responses_kind"] == "averaged-only"
    averaged = np.load(v4_dir / "responses_repeat_averaged" / f"responses_{session_id}.npy")
    assert np.array_equal(s.responses[:, :, 0], averaged.astype(np.float32))


def test_image_kinds(v4_sessions):
    for sid in ("190925", "190927", "190928", "190929"):
        kinds = v4_sessions[sid].image_kinds
        assert set(kinds[:600]) == {NORMAL}
        assert set(kinds[600:900]) == {SYNTHETIC}
        assert set(kinds[900:]) == {ACTIVE_LEARNING}
        assert v4_sessions[sid].metadata["ensemble_images"] == [[1, 600], [901, 1200]]
    for sid in ("190923", "210224", "210621"):
        assert set(v4_sessions[sid].image_kinds) == {NORMAL}
    assert list(v4_sessions["210322"].image_kinds) == [NORMAL] * 600 + [BASHIVAN] * 600
    assert set(v4_sessions["210305"].image_kinds) == {VALIDATION_EXPERIMENT}


def test_210322_second_half_is_grey_aperture(v4_sessions):
    # the measured reason for 210322's kinds: Bashivan images sit in a grey circular aperture, so
    # their corners are one flat mid grey (a few photos have flat black or white corners)
    images = v4_sessions["210322"].images.astype(np.int16)
    corners = np.stack([images[:, :3, :3], images[:, :3, -3:], images[:, -3:, :3], images[:, -3:, -3:]],
                       axis=1).reshape(len(images), -1)
    flat_grey = (np.ptp(corners, axis=1) <= 8) & (corners.mean(axis=1) > 64) & (corners.mean(axis=1) < 224)
    assert flat_grey[600:].all() and not flat_grey[:600].any()


def test_import_and_parquet_round_trip(v4_dir, v4_sessions, tmp_path):
    calls = []
    paths = import_v4_release(v4_dir, tmp_path / "out", sessions=["190925", "201016"],
                              progress=lambda done, total, sid: calls.append((done, total, sid)))
    assert [p.name for p in paths] == ["190925.parquet", "201016.parquet"]
    assert calls == [(1, 2, "190925"), (2, 2, "201016")]
    for p in paths:
        original, back = v4_sessions[p.stem], read_session(p)
        assert np.array_equal(back.images, original.images)
        assert np.array_equal(back.responses, original.responses, equal_nan=True)
        assert list(back.image_kinds) == list(original.image_kinds)
        assert (back.role, back.animal, back.has_repeats, back.neuron_ids, back.metadata) == (
            original.role, original.animal, original.has_repeats, original.neuron_ids, original.metadata)


def test_import_rejects_absent_session_before_writing(v4_dir, tmp_path):
    with pytest.raises(SessionError, match=r"no response file for sessions \['211022'\]"):
        import_v4_release(v4_dir, tmp_path / "out", sessions=["210305", "211022"])
    assert not (tmp_path / "out").exists()


def test_require_images(v4_dir):
    with pytest.raises(SessionError, match=r"images_201016\.zip: missing image zip"):
        load_v4_session(v4_dir, "201016", require_images=True)


# ----------------------------------------------------------------------------- bad release folders


def fake_release(root, session_id, n_neurons, image_numbers, size=112, mode="RGB", n_images=None,
                 folder=""):
    """A release-shaped folder with averaged responses for ``n_images`` images and a zip holding
    ``image_numbers`` (JPEGs of ``size`` and ``mode``)."""
    n_images = len(image_numbers) if n_images is None else n_images
    (root / "responses_repeat_averaged").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(root / "responses_repeat_averaged" / f"responses_{session_id}.npy",
            rng.uniform(0, 10, size=(n_neurons, n_images)))
    with zipfile.ZipFile(root / "images" / f"images_{session_id}.zip", "w") as zf:
        for k in image_numbers:
            buf = BytesIO()
            Image.new(mode, (size, size), color=k % 256 if mode == "L" else (k % 256, 0, 0)).save(buf, "JPEG")
            zf.writestr(f"{folder}image{k:04d}.jpg", buf.getvalue())
    return root


def test_missing_response_file(tmp_path):
    with pytest.raises(SessionError, match=r"responses_190923\.npy: missing response file"):
        load_v4_session(tmp_path, "190923")


def test_unknown_session_id(tmp_path):
    with pytest.raises(SessionError, match=r"'123456': not a session of the V4 release"):
        load_v4_session(tmp_path, "123456")


def test_zip_member_missing_names_the_image(tmp_path):
    # 210305 has 400 images; image 137 is not in the zip
    fake_release(tmp_path, "210305", 3, [k for k in range(1, 401) if k != 137], size=8, n_images=400)
    with pytest.raises(SessionError, match=r"images_210305\.zip: image 137 \(image0137\.jpg\) is missing"):
        load_v4_session(tmp_path, "210305")


def test_image_not_112_rgb(tmp_path):
    fake_release(tmp_path, "210305", 3, range(1, 401), size=64)
    with pytest.raises(SessionError, match=r"images_210305\.zip: member 'image0001\.jpg'.*112x112 RGB.*64x64"):
        load_v4_session(tmp_path, "210305")


def test_image_not_rgb(tmp_path):
    fake_release(tmp_path, "210305", 3, range(1, 401), mode="L")
    with pytest.raises(SessionError, match=r"images_210305\.zip.*112x112 RGB image, got mode L"):
        load_v4_session(tmp_path, "210305")


def test_count_mismatch_images_vs_responses(tmp_path):
    fake_release(tmp_path, "210305", 3, range(1, 402), size=8, n_images=400)
    with pytest.raises(SessionError, match=r"images_210305\.zip: count mismatch.*400 images.*\[401\]"):
        load_v4_session(tmp_path, "210305")


def test_count_mismatch_responses_vs_table(tmp_path):
    # all images present and valid, but 210305 has 400 images in the release, not 3
    fake_release(tmp_path, "210305", 3, [3, 1, 2], folder="images_210305/")
    with pytest.raises(SessionError, match=r"responses_210305\.npy: count mismatch: 3 images.*400"):
        load_v4_session(tmp_path, "210305")


def test_a_failed_import_writes_nothing_and_a_v4_job_completes_a_partial_folder(tmp_path):
    """A bad zip stopped the import with the earlier sessions already written, and a later
    data.kind: v4 job used that partial folder without a word. Now an import is all or nothing, and
    the job imports whatever sessions of the release its folder lacks."""
    from farm.config import load_job_config
    from farm.pipeline import prepare_sessions

    src, out = tmp_path / "release", tmp_path / "sessions"
    fake_release(src, "210224", 3, range(1, 801), size=112)
    fake_release(src, "210305", 3, [k for k in range(1, 401) if k != 137], size=112, n_images=400)
    with pytest.raises(SessionError, match=r"images_210305\.zip: image 137"):
        import_v4_release(src, out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["release"]  # no partial data, no temp

    import_v4_release(src, out, sessions=["210224"])  # a folder with one of the two sessions
    fake_release(src, "210305", 3, range(1, 401), size=112)  # the release repaired
    cfg = load_job_config("v4_190923", [f"data.dir={out}", f"data.source={src}", f"out_dir={tmp_path}/job"])
    sessions, _, _ = prepare_sessions(cfg)
    assert [s.session_id for s in sessions] == ["210224", "210305"]

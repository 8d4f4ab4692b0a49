"""Sessions: validation, exact Parquet round trip, clear errors for bad files, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.data import sessions as sessions_module
from farm.data.sessions import (
    IMAGES_AVAILABLE,
    SCHEMA_VERSION,
    Session,
    SessionError,
    list_sessions,
    read_session,
    read_session_header,
    read_sessions,
    write_session,
)


def make_session(session_id="190923", n_images=12, n_neurons=5, n_repeats=4, size=8, role="test",
                 seed=0) -> Session:
    """A small session with NaN padding: image i has 1 + (i % n_repeats) repeats."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_images, size, size, 3), dtype=np.uint8)
    responses = rng.poisson(3.0, size=(n_neurons, n_images, n_repeats)).astype(np.float32)
    counts = 1 + np.arange(n_images) % n_repeats
    responses[:, np.arange(n_repeats)[None, :] >= counts[:, None]] = np.nan
    kinds = np.array(["normal", "gaudy", "synthetic"] * (n_images // 3) + ["normal"] * (n_images % 3),
                     dtype=object)
    return Session(session_id, images, responses, kinds, role=role, has_repeats=True, animal="WE",
                   metadata={"source": "unit test", "nested": {"a": [1, 2.5, None]}})


def assert_same_session(a: Session, b: Session) -> None:
    assert a.session_id == b.session_id
    assert a.role == b.role and a.animal == b.animal and a.has_repeats == b.has_repeats
    assert a.neuron_ids == b.neuron_ids
    assert a.metadata == b.metadata
    assert b.images.dtype == np.uint8 and np.array_equal(a.images, b.images)
    assert b.responses.dtype == np.float32
    assert np.array_equal(np.isnan(a.responses), np.isnan(b.responses))
    assert np.array_equal(a.responses, b.responses, equal_nan=True)
    assert list(a.image_kinds) == list(b.image_kinds)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_exact(tmp_path):
    s = make_session()
    s.neuron_ids = tuple(f"190923:{i}" for i in (4, 0, 17, 2, 9))  # non-default ids survive
    path = write_session(s, tmp_path / "190923.parquet")
    back = read_session(path)
    assert_same_session(s, back)
    assert np.array_equal(back.repeat_counts(), s.repeat_counts())
    # arrays are independent writable copies, not views into Arrow buffers
    assert back.images.flags.writeable and back.responses.flags.writeable


def test_round_trip_keeps_nan_bit_pattern_and_values(tmp_path):
    s = make_session(n_images=9, n_repeats=3)
    s.responses[:, :, 0] = np.float32(1e-7)  # tiny non-zero value: float32 exact
    back = read_session(write_session(s, tmp_path / "s.parquet"))
    assert s.responses.tobytes() == back.responses.tobytes()


def test_float64_responses_are_stored_as_float32(tmp_path):
    s = make_session()
    s.responses = s.responses.astype(np.float64) / 3.0
    back = read_session(write_session(s, tmp_path / "s.parquet"))
    assert back.responses.dtype == np.float32
    assert np.array_equal(back.responses, s.responses.astype(np.float32), equal_nan=True)


def test_averaged_only_session_round_trip(tmp_path):
    s = make_session(n_repeats=1)
    s.has_repeats = False
    s.metadata["responses_kind"] = "averaged-only"
    back = read_session(write_session(s, tmp_path / "s.parquet"))
    assert_same_session(s, back)
    assert back.responses.shape == (5, 12, 1) and not back.has_repeats


def test_session_without_images_round_trip(tmp_path):
    s = make_session()
    s.images = np.zeros((s.n_images, 0, 0, 3), dtype=np.uint8)
    s.metadata[IMAGES_AVAILABLE] = False
    path = write_session(s, tmp_path / "s.parquet")
    assert "image" not in pq.read_schema(path).names
    back = read_session(path)
    assert_same_session(s, back)
    assert back.images.shape == (12, 0, 0, 3) and not back.images_available


def test_schema_metadata_is_versioned_json(tmp_path):
    s = make_session()
    path = write_session(s, tmp_path / "s.parquet")
    meta = pq.read_schema(path).metadata
    assert json.loads(meta[b"farm.schema_version"]) == SCHEMA_VERSION == 1
    assert json.loads(meta[b"farm.responses_shape"]) == [5, 12, 4]
    assert json.loads(meta[b"farm.images_shape"]) == [12, 8, 8, 3]
    header = read_session_header(path)
    assert header["session_id"] == "190923" and header["role"] == "test"


def test_subset_and_halves_keep_alignment():
    s = make_session(n_images=12)
    first, second = s.halves()
    assert first.n_images == 6 and second.n_images == 6
    assert np.array_equal(second.images, s.images[6:])
    assert np.array_equal(second.responses, s.responses[:, 6:], equal_nan=True)
    assert list(second.image_kinds) == list(s.image_kinds[6:])


# ----------------------------------------------------------------------------- validation


def test_validate_accepts_good_session():
    s = make_session()
    assert s.validate() is s


def test_validate_image_response_count_mismatch():
    s = make_session()
    s.images = s.images[:-1]
    with pytest.raises(SessionError, match=r"field 'images'.*11 images"):
        s.validate("x.parquet")


def test_validate_image_shape_not_nhw3():
    s = make_session()
    s.images = s.images[..., :1]
    with pytest.raises(SessionError, match=r"x.parquet.*field 'images'.*\(N, H, W, 3\)"):
        s.validate("x.parquet")


def test_validate_image_dtype_not_uint8():
    s = make_session()
    s.images = s.images.astype(np.float32)
    with pytest.raises(SessionError, match=r"field 'images'.*uint8"):
        s.validate()


def test_validate_responses_not_3d():
    s = make_session()
    s.responses = s.mean_responses()
    with pytest.raises(SessionError, match=r"field 'responses'.*3-D float"):
        s.validate()


def test_validate_responses_not_float():
    s = make_session()
    s.responses = np.nan_to_num(s.responses).astype(np.int64)
    with pytest.raises(SessionError, match=r"field 'responses'.*3-D float.*int64"):
        s.validate()


def test_validate_negative_count():
    s = make_session()
    s.responses[2, 3, 0] = -1.0
    with pytest.raises(SessionError, match=r"field 'responses'.*non-negative.*neuron 2, image 3"):
        s.validate()


def test_validate_infinite_count():
    s = make_session()
    s.responses[1, 5, 0] = np.inf
    with pytest.raises(SessionError, match=r"field 'responses'.*finite.*neuron 1, image 5"):
        s.validate()


def test_validate_nan_not_trailing():
    s = make_session()
    s.responses[:, 7, 0] = np.nan  # image 7 has 4 repeats; a hole at repeat 0 with values after it
    s.responses[:, 7, 0] = 1.0
    s.responses[:, 7, 1] = np.nan
    with pytest.raises(SessionError, match=r"field 'responses'.*trailing padding.*image 7"):
        s.validate()


def test_validate_nan_pattern_differs_between_neurons():
    s = make_session()
    s.responses[3, 11, 3] = np.nan  # image 11 has 4 repeats; only neuron 3 loses its last one
    with pytest.raises(SessionError, match=r"field 'responses'.*same NaN padding.*neuron 3.*image 11"):
        s.validate()


def test_validate_image_with_zero_repeats():
    s = make_session()
    s.responses[:, 4, :] = np.nan
    with pytest.raises(SessionError, match=r"field 'responses'.*image 4 with zero repeats"):
        s.validate()


def test_validate_duplicate_neuron_ids():
    s = make_session()
    s.neuron_ids = ("a", "b", "c", "b", "e")
    with pytest.raises(SessionError, match=r"field 'neuron_ids'.*duplicates \['b'\]"):
        s.validate()


def test_validate_neuron_id_count_mismatch():
    s = make_session()
    s.neuron_ids = s.neuron_ids[:3]
    with pytest.raises(SessionError, match=r"field 'neuron_ids'.*one id per neuron \(5\)"):
        s.validate()


def test_validate_empty_session_no_images():
    s = make_session()
    s.images, s.responses, s.image_kinds = s.images[:0], s.responses[:, :0], s.image_kinds[:0]
    with pytest.raises(SessionError, match=r"field 'responses'.*at least 1 image"):
        s.validate()


def test_validate_empty_session_no_neurons():
    s = make_session()
    s.responses, s.neuron_ids = s.responses[:0], ()
    with pytest.raises(SessionError, match=r"field 'responses'.*at least 1 neuron"):
        s.validate()


def test_validate_unknown_role():
    s = make_session(role="training")
    with pytest.raises(SessionError, match=r"field 'role'.*'training'"):
        s.validate()


def test_validate_image_kinds_length_mismatch():
    s = make_session()
    s.image_kinds = s.image_kinds[:-2]
    with pytest.raises(SessionError, match=r"field 'image_kinds'.*\(12,\)"):
        s.validate()


def test_validate_averaged_only_must_have_one_repeat():
    s = make_session()
    s.has_repeats = False
    with pytest.raises(SessionError, match=r"field 'responses'.*length 1 when has_repeats is False"):
        s.validate()


def test_validate_zero_sized_images_need_the_flag():
    s = make_session()
    s.images = np.zeros((s.n_images, 0, 0, 3), dtype=np.uint8)
    with pytest.raises(SessionError, match=rf"field 'images'.*{IMAGES_AVAILABLE}"):
        s.validate()


def test_write_validates_and_names_the_file(tmp_path):
    s = make_session()
    s.responses[0, 0, 0] = -3.0
    target = tmp_path / "bad.parquet"
    with pytest.raises(SessionError, match=r"bad\.parquet.*non-negative"):
        write_session(s, target)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_non_json_metadata(tmp_path):
    s = make_session()
    s.metadata["array"] = np.arange(3)
    with pytest.raises(SessionError, match=r"field 'metadata'.*JSON"):
        write_session(s, tmp_path / "s.parquet")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad files


def test_read_missing_file(tmp_path):
    with pytest.raises(SessionError, match=r"nope\.parquet: session file not found"):
        read_session(tmp_path / "nope.parquet")


def test_read_truncated_file(tmp_path):
    path = write_session(make_session(), tmp_path / "s.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SessionError, match=r"s\.parquet: not a readable Parquet file"):
        read_session(path)


def test_read_random_bytes(tmp_path):
    path = tmp_path / "noise.parquet"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(SessionError, match=r"noise\.parquet: not a readable Parquet file"):
        read_session(path)


def test_read_corrupted_page_is_caught_by_checksum(tmp_path):
    path = write_session(make_session(n_images=30, size=16), tmp_path / "s.parquet")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the pixel pages, footer intact
    path.write_bytes(bytes(data))
    with pytest.raises(SessionError, match=r"s\.parquet: not a readable Parquet file"):
        read_session(path)


def _rewrite_metadata(path, change):
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    change(meta)
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_read_unknown_schema_version(tmp_path):
    path = write_session(make_session(), tmp_path / "s.parquet")
    _rewrite_metadata(path, lambda m: m.__setitem__(b"farm.schema_version", b"2"))
    with pytest.raises(SessionError, match=r"s\.parquet: unknown schema version 2.*reads schema version 1"):
        read_session(path)


def test_read_missing_metadata_field(tmp_path):
    path = write_session(make_session(), tmp_path / "s.parquet")
    _rewrite_metadata(path, lambda m: m.pop(b"farm.neuron_ids"))
    with pytest.raises(SessionError, match=r"s\.parquet: metadata field 'farm.neuron_ids' is missing"):
        read_session(path)


def test_read_plain_parquet_is_not_a_session(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    with pytest.raises(SessionError, match=r"plain\.parquet: not a farm session file"):
        read_session(path)


def test_read_validates_content(tmp_path):
    # a file whose stored values break the contract (written around write_session) is refused
    path = write_session(make_session(), tmp_path / "s.parquet")
    table = pq.read_table(path)
    flat = table.column("responses").combine_chunks().flatten().to_numpy().copy()
    flat[0] = -5.0
    bad = pa.FixedSizeListArray.from_arrays(pa.array(flat), table.column("responses").type.list_size)
    table = table.set_column(table.schema.get_field_index("responses"), "responses", bad)
    pq.write_table(table, path)
    with pytest.raises(SessionError, match=r"s\.parquet.*non-negative"):
        read_session(path)


# ----------------------------------------------------------------------------- atomic write


def test_failed_write_mid_file_leaves_nothing(tmp_path, monkeypatch):
    # pyarrow (a dependency, not the code under test) fails after writing part of the file
    def failing_write_table(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(sessions_module.pq, "write_table", failing_write_table)
    with pytest.raises(OSError, match="disk full"):
        write_session(make_session(), tmp_path / "s.parquet")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    good = make_session(seed=1)
    path = write_session(good, tmp_path / "s.parquet")

    def failing_write_table(table, where, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sessions_module.pq, "write_table", failing_write_table)
    with pytest.raises(OSError):
        write_session(make_session(seed=2), path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]
    assert_same_session(good, read_session(path))


def test_write_into_missing_folder(tmp_path):
    with pytest.raises(SessionError, match=r"folder .*missing_dir does not exist"):
        write_session(make_session(), tmp_path / "missing_dir" / "s.parquet")


# ----------------------------------------------------------------------------- folders


def test_list_and_read_sessions_sorted_and_filtered(tmp_path):
    for sid, role in (("210224", "validation"), ("190923", "test"), ("190925", "train"), ("201025", "test")):
        write_session(make_session(session_id=sid, role=role), tmp_path / f"{sid}.parquet")
    (tmp_path / "notes.txt").write_text("not a session")
    assert [p.name for p in list_sessions(tmp_path)] == [
        "190923.parquet", "190925.parquet", "201025.parquet", "210224.parquet"]
    assert [s.session_id for s in read_sessions(tmp_path)] == ["190923", "190925", "201025", "210224"]
    tests = read_sessions(tmp_path, role="test")
    assert [s.session_id for s in tests] == ["190923", "201025"]
    assert all(s.role == "test" for s in tests)


def test_read_sessions_rejects_unknown_role_and_duplicates(tmp_path):
    write_session(make_session(session_id="190923"), tmp_path / "a.parquet")
    write_session(make_session(session_id="190923"), tmp_path / "b.parquet")
    with pytest.raises(SessionError, match=r"role"):
        read_sessions(tmp_path, role="training")
    with pytest.raises(SessionError, match=r"b\.parquet: session id '190923' is also stored in .*a\.parquet"):
        read_sessions(tmp_path)


def test_list_sessions_missing_folder(tmp_path):
    with pytest.raises(SessionError, match="session folder not found"):
        list_sessions(tmp_path / "none")


def test_a_jobs_sessions_must_share_an_image_size_and_not_share_neuron_ids():
    from farm.data.sessions import check_job_sessions

    a, b = make_session("s1", size=8), make_session("s2", size=8, role="train")
    check_job_sessions([a, b], "data")  # fine
    with pytest.raises(SessionError, match=r"data: the sessions' images differ in size \(8x8 px: s1; 10x10 px: s3\)"):
        check_job_sessions([a, make_session("s3", size=10)], "data")
    twin = make_session("s4", size=8)
    twin.neuron_ids = a.neuron_ids
    with pytest.raises(SessionError, match=r"neuron id 's1:0' is in session 's1' and in 's4'"):
        check_job_sessions([a, twin], "data")

"""farm.files: a file is replaced whole or not at all, and no temp file is left either way."""

import pytest

from farm.files import atomic_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_text_atomic(path, "old")  # creates the folder
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["result.json"]
    with atomic_path(path, fsync=True) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("new")
        assert path.read_text() == "old"  # not visible before the block ends
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["result.json"]

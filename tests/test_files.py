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


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: run code on load
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_a_state_dict_holding_other_pickles_is_refused_without_unsafe_advice(tmp_path):
    import torch

    from farm.files import load_state_dict
    from farm.models.compact import CompactSpec, build_compact, load_compact, save_compact

    save_compact(build_compact(CompactSpec(filters=(2,) * 5, image_size=16, neuron_ids=("s:0",)), seed=0), tmp_path / "m")
    assert set(load_state_dict(tmp_path / "m" / "state_dict.pt")) >= {"readout.weight"}
    torch.save({"readout.weight": _Payload()}, tmp_path / "m" / "state_dict.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*state_dict.pt: not a plain state_dict") as err:
        load_compact(tmp_path / "m")
    assert "weights_only" not in str(err.value)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*list.pt: not a state_dict \(a list\)"):
        load_state_dict(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk.pt: not a readable PyTorch state_dict"):
        load_state_dict(tmp_path / "junk.pt")


def test_teacher_predict_refuses_float_images_with_a_hint(tmp_path, capsys):
    """Floats in [0, 1] were read as 0-255 (near-black images) and predicted with exit 0."""
    import numpy as np

    from farm.cli import main

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 16, 16, 3)))
    rc = main(["teacher", "predict", str(tmp_path / "no_teacher_needed"), str(tmp_path / "x.npy"),
               "--out", str(tmp_path / "y.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "y.npy").exists(), err
    assert "x.npy: images must be uint8 RGB (N, H, W, 3) with values 0-255, got dtype float64" in err
    assert "multiply by 255 and cast to uint8" in err

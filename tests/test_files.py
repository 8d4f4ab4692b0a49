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


def test_teacher_predict_names_a_bad_images_file_or_size_and_writes_its_output_whole(tmp_path, capsys,
                                                                                      published_dir):
    """An .npz archive, a truncated .npy and images of the wrong size for the teacher were raw numpy /
    torch tracebacks; each is now an error naming the file or the sizes, with no output written."""
    import numpy as np

    from farm.cli import main

    keras = published_dir / "shared_compact_models" / "from_ensemble_model" / "shared_compact_model_5filters.keras"
    assert main(["teacher", "import", "shared_compact", str(keras), "--session", "190923",
                 "--out", str(tmp_path / "teacher")]) == 0
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", images=rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8))
    np.save(tmp_path / "whole.npy", rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:5000])
    np.save(tmp_path / "small.npy", rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    for name, message in (("a.npz", "a.npz: an .npz archive (images); give one .npy array"),
                          ("cut.npy", "cut.npy: not a readable .npy array of images"),
                          ("small.npy", "the images are 16x16 px but the model takes 112x112")):
        capsys.readouterr()
        rc = main(["teacher", "predict", str(tmp_path / "teacher"), str(tmp_path / name), "--out",
                   str(tmp_path / "y.npy")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err
        assert not list(tmp_path.glob("*y.npy*")), name  # nothing written, no temp file left
    assert main(["teacher", "predict", str(tmp_path / "teacher"), str(tmp_path / "whole.npy"), "--out",
                 str(tmp_path / "y.npy")]) == 0
    assert np.load(tmp_path / "y.npy").shape == (2, 33)  # 190923's 33 neurons


def test_one_driver_per_job_and_the_second_is_told_who_holds_it(tmp_path):
    """A second driver of the same job exits at once naming the first (pid, host), never
    compressing the job's neurons a second time; the lock is free again afterwards."""
    import os

    from farm.config import load_job_config
    from farm.files import Busy, exclusive
    from farm.pipeline import run_compress_job

    cfg = load_job_config("demo", [f"out_dir={tmp_path}/out", f"data.dir={tmp_path}/data"])
    job = cfg.resolved_job_id()
    with exclusive(tmp_path / "out" / f".job-{job}.lock", f"job {job}"):  # the first driver
        with pytest.raises(Busy, match=rf"job {job} is already running \(pid {os.getpid()} on "):
            run_compress_job(cfg, progress=False)
    assert not (tmp_path / "data").exists()  # refused before any work
    with exclusive(tmp_path / "out" / f".job-{job}.lock", f"job {job}"):
        pass  # released: the next driver gets it

"""The `farm` command: data import/simulate, analyze, ui; bad input gives a clear error and exit 2."""

import json

import numpy as np
import pytest

from farm.cli import main
from farm.data.sessions import read_session, read_sessions
from farm.models.compact import CompactSpec, build_compact, save_compact


def test_data_simulate_writes_sessions_and_ground_truth(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["data", "simulate", "--neurons", "3", "--sessions", "2", "--images", "60",
                 "--size", "16", "--seed", "1", "--out", str(out)]) == 0
    sessions = read_sessions(out / "sessions")
    assert [s.role for s in sessions] == ["train", "test"]
    assert all(s.n_neurons == 3 and s.n_images == 60 and s.images.shape[1:] == (16, 16, 3) for s in sessions)
    assert (out / "population.json").is_file()
    report = capsys.readouterr().out
    assert "sim1" in report and "test" in report


def test_data_import_v4_one_session(tmp_path, v4_dir):
    assert main(["data", "import-v4", str(v4_dir), "--out", str(tmp_path), "--sessions", "210305"]) == 0
    s = read_session(tmp_path / "210305.parquet")
    assert (s.n_neurons, s.n_images) == (70, 400) and not s.has_repeats


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert main(["data", "import-v4", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_analyze_needs_a_model_and_out_or_a_job_config(tmp_path, capsys):
    assert main(["analyze"]) == 2
    assert "--config JOB_CONFIG" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "m")]) == 2  # no --out
    # a job config whose bank was never built: the error names the missing bank folder
    assert main(["analyze", "--config", "demo", f"out_dir={tmp_path / 'job'}"]) == 2
    assert str(tmp_path / "job" / "bank") in capsys.readouterr().err


def test_ui_prints_a_loopback_command(tmp_path, capsys):
    assert main(["ui", "--uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    assert "--host 127.0.0.1" in capsys.readouterr().out


@pytest.mark.slow
def test_analyze_writes_figures_data_and_metrics(tmp_path):
    model = build_compact(CompactSpec(filters=(4,) * 5, image_size=32, neuron_ids=("s:0",)), seed=0)
    save_compact(model, tmp_path / "m")
    np.save(tmp_path / "imgs.npy", np.random.default_rng(0).integers(0, 255, (48, 32, 32, 3), dtype=np.uint8))
    assert main(["analyze", str(tmp_path / "m"), "--out", str(tmp_path / "a"),
                 "--images", str(tmp_path / "imgs.npy")]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    # maximizing synthesized images beat the natural images' 99th percentile
    assert metrics["synth_max_best"] > metrics["natural_p99"]
    assert (tmp_path / "a" / "saliency.png").is_file() and (tmp_path / "a" / "synth_max.npz").is_file()


def test_farm_ui_prints_the_store_the_jobs_write_by_default(tmp_path, monkeypatch, capsys):
    """One store default for every command: from a directory, `farm ui` opens
    farm_runs/mlflow.db there (where `make demo` writes); `farm ui --config` that job's store."""
    import mlflow

    from farm.cli import main
    from farm.config import JobConfig, load_job_config

    monkeypatch.chdir(tmp_path)
    assert main(["ui"]) == 0
    want = f"sqlite:///{tmp_path.resolve()}/farm_runs/mlflow.db"
    out = capsys.readouterr().out
    assert f"--backend-store-uri {want} " in out
    # no store yet: the experiment list, in the UI's Model training mode (not created by `farm ui`)
    assert out.strip().endswith("then open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning")
    assert not (tmp_path / "farm_runs").exists()
    # once the demo's experiment is in that store, the page is its runs
    from farm.tracking import Tracker

    Tracker.open(want, load_job_config("demo").tracking.experiment)
    exp_id = mlflow.MlflowClient(tracking_uri=want).get_experiment_by_name("farm-demo").experiment_id
    assert main(["ui"]) == 0
    assert capsys.readouterr().out.strip().endswith(
        f"then open http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning")
    assert JobConfig().tracking_uri() == want == load_job_config("demo").tracking_uri()
    assert main(["ui", "--config", "demo", f"out_dir={tmp_path}/elsewhere/job"]) == 0
    assert f"--backend-store-uri sqlite:///{tmp_path.resolve()}/elsewhere/mlflow.db " in capsys.readouterr().out


def test_a_ray_job_with_relative_result_paths_is_refused_and_submit_pins_them(tmp_path, monkeypatch):
    """Inside a Ray Job (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR; an uploaded working_dir), relative
    result paths would land in Ray's temporary copy: refused. `farm submit` pins them absolute."""
    import json as _json

    from farm.config import load_job_config
    from farm.submit import check_not_in_ray_job_copy, resolved_overrides

    cfg = load_job_config("demo")  # out_dir farm_runs/demo, no tracking.uri
    check_not_in_ray_job_copy(cfg)  # not in a Ray Job: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", _json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    with pytest.raises(ValueError, match=r"temporary copy of the working dir .* out_dir='farm_runs/demo'.*farm submit"):
        check_not_in_ray_job_copy(cfg)
    monkeypatch.chdir(tmp_path)
    pinned = load_job_config("demo", resolved_overrides(load_job_config("demo")))
    assert pinned.out_dir == str(tmp_path.resolve() / "farm_runs" / "demo")
    assert pinned.tracking.uri == f"sqlite:///{tmp_path.resolve()}/farm_runs/mlflow.db"
    (tmp_path / "ray_copy").mkdir()
    monkeypatch.chdir(tmp_path / "ray_copy")  # the job runs in Ray's copy, elsewhere
    check_not_in_ray_job_copy(pinned)  # absolute, outside the copy: accepted


def test_teacher_training_as_a_plain_ray_job_refuses_paths_in_the_copy_before_training(tmp_path, monkeypatch, capsys):
    """`ray job submit -- python jobs/train_teacher.py --out farm_runs/teacher` would train into Ray's
    temporary copy of the working dir (and the default store there): refused, nothing written."""
    import json as _json

    from farm.cli import main
    from farm.config import CONFIG_DIR
    from farm.submit import check_paths_not_in_ray_job_copy

    copy = tmp_path / "copy"
    copy.mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", _json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    rc = main(["teacher", "train", "--config", str(CONFIG_DIR / "teacher_demo.yaml"), "--out", "farm_runs/teacher"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--out='farm_runs/teacher'" in err
    assert f"--tracking-uri (unset: the default store sqlite:///{copy.resolve()}/farm_runs/mlflow.db)" in err
    assert list(copy.iterdir()) == []  # no teacher, no store
    # an absolute path inside the copy is as lost as a relative one; outside it, accepted
    with pytest.raises(ValueError, match=r"--out='.*/copy/t'"):
        check_paths_not_in_ray_job_copy({"--out": str(copy / "t")}, f"sqlite:///{tmp_path}/s.db", "unused")
    with pytest.raises(ValueError, match=r"tracking.uri='sqlite:///s.db'"):
        check_paths_not_in_ray_job_copy({"--out": str(tmp_path / "t")}, "sqlite:///s.db", "unused")
    check_paths_not_in_ray_job_copy({"--out": str(tmp_path / "t")}, f"sqlite:///{tmp_path}/s.db", "unused")
    check_paths_not_in_ray_job_copy({"--out": str(tmp_path / "t")}, "http://head:5000", "unused")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    check_paths_not_in_ray_job_copy({"--out": "farm_runs/teacher"}, None, "sqlite:///rel.db")  # not in a Ray Job

"""The Ray/MLflow edge of the farm, on real local Ray and real sqlite MLflow stores (no mocks).

A tiny simulated population (teacher = its true rates, 16 px images, 6-filter students) keeps every
compression to seconds. The simulated data and image bank are built once per module; every test has
its own MLflow store (a copy of one empty, already migrated sqlite file: creating the schema costs
5-15 s) and its own out_dir. Ray runs in this process (2 CPUs, a small object store) under a private
RAY_TMPDIR, so a `ray start` cluster of someone else on the machine is never joined.

Fast: a job end to end + idempotent re-run, a failed neuron, a killed worker.
Slow: a killed driver + re-run through the CLI, the Tune sweep.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import RAY_ENV
from farm.config import load_job_config
from farm.fanout import run_neurons
from farm.neuron_runs import NeuronInputs, compress_and_log
from farm.tracking import TAG_ERROR, TAG_JOB, TAG_KIND, TAG_NEURON, Tracker

REPO = Path(__file__).resolve().parents[1]
N_NEURONS = 4  # per simulated session; the teacher holds the test session's neurons

TINY_COMPRESS = {
    "student_filters": [6, 6, 6, 6, 6],
    "distill": {"passes": 1, "log_every_steps": 5, "bn_recalibrate_images": 256},
    "retrain": {"passes": 1, "log_every_steps": 5, "bn_recalibrate_images": 256},
}



# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """Simulated sessions + image bank (shared, read-only after this) and an empty migrated store."""
    from mlflow import MlflowClient

    from farm.pipeline import prepare_job

    base = tmp_path_factory.mktemp("farm_base")
    template = base / "template.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()  # creates + migrates the schema
    cfg_path = write_config(base / "prep", base)
    prepare_job(load_job_config(cfg_path))
    return base


def write_config(run_dir: Path, base: Path, **overrides) -> Path:
    """A tiny job config in ``run_dir`` (own out_dir and MLflow store); ``overrides``: top-level
    sections merged one level deep (e.g. ``farm={"num_cpus": 1}``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    db = run_dir / "mlflow.db"
    if (base / "template.db").is_file() and not db.exists():
        shutil.copyfile(base / "template.db", db)
    cfg = {
        "name": "tiny",
        "out_dir": str(run_dir / "out"),
        "neurons": "sim1",
        "data": {"kind": "simulated", "dir": str(base / "data"),
                 "simulate": {"n_neurons": N_NEURONS, "n_sessions": 2, "n_images": 200, "image_size": 16,
                              "filters": [3, 4], "n_calibration": 64}},
        "teacher": {"kind": "ground_truth"},
        "bank": {"dir": str(base / "bank"), "heldout": 200, "bank": {"n_images": 1000, "shard_size": 1000}},
        "compress": TINY_COMPRESS,
        "farm": {"num_cpus": 1, "local_num_cpus": 2, "object_store_memory": 300_000_000},
        "tracking": {"experiment": "tiny", "uri": f"sqlite:///{db}"},
        "sweep": {"taus": [0.8, 0.95], "max_concurrent": 2, "neurons": "sim1:0-1"},
    }
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path = run_dir / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def neuron_children(tracker: Tracker, parent: str, status: str | None = None) -> list:
    runs = tracker.child_runs(parent, "neuron")
    return [r for r in runs if status is None or r.info.status == status]


def all_runs(tracker: Tracker) -> list:
    return tracker.client.search_runs([tracker.experiment_id], max_results=1000)


def artifact_paths(tracker: Tracker, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in tracker.client.list_artifacts(run_id, path):
        out |= artifact_paths(tracker, run_id, a.path) if a.is_dir else {a.path}
    return out


# -- a job end to end -------------------------------------------------------------------------------
def test_compress_job_end_to_end_then_rerun_is_idempotent(tiny_base, local_ray, tmp_path):
    from farm.compress import RealData
    from farm.distill import predict, squared_pearson
    from farm.metrics import evaluate_predictions, r2_raw
    from farm.models.compact import load_compact
    from farm.pipeline import prepare_job, run_compress_job

    cfg = load_job_config(write_config(tmp_path, tiny_base))
    res = run_compress_job(cfg, progress=False)
    tracker = Tracker.open(cfg.tracking.uri, "tiny")
    prepared = prepare_job(cfg)  # every stage cached: the same arrays the tasks got
    neurons = prepared.neuron_ids
    assert len(neurons) == N_NEURONS and res.failed == [] and res.skipped == []
    assert sorted(r["neuron_id"] for r in res.rows) == sorted(neurons)

    parent = tracker.client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[TAG_KIND] == "job" and parent.data.tags[TAG_JOB] == res.job_id
    assert parent.data.metrics["neurons_finished"] == N_NEURONS
    assert {"figures/params_histogram.png", "figures/filters_per_layer.png",
            "figures/compact_vs_teacher_r2.png"} <= artifact_paths(tracker, res.parent_run_id, "figures")
    # the UI opens the experiment on its runs, and the job run shows a per-neuron table
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    table = json.loads((Path(tracker.download(res.parent_run_id, "neurons.json", tmp_path / "table"))).read_text())
    assert sorted(table["columns"][:5]) == sorted(["neuron", "status", "params", "filters", "r2_to_teacher"])
    assert len(table["data"]) == N_NEURONS and {row[1] for row in table["data"]} == {"FINISHED"}

    children = neuron_children(tracker, res.parent_run_id)
    assert sorted(r.data.tags[TAG_NEURON] for r in children) == sorted(neurons)  # one each
    inp = prepared.inputs
    for run in children:
        nid, m = run.data.tags[TAG_NEURON], run.data.metrics
        assert run.info.status == "FINISHED" and run.data.tags[TAG_JOB] == res.job_id
        assert run.data.params["neuron_id"] == nid
        for key in ("param_count", "trainable_params", "total_filters", "r2_teacher_heldout", "r2_er",
                    "r2_ground_truth", "cpu_seconds", *(f"filters_layer{i}" for i in range(5))):
            assert key in m, f"{nid}: metric {key} missing"
        arts = artifact_paths(tracker, run.info.run_id)
        assert {"model/spec.json", "model/state_dict.pt", "history/pruning_history.csv",
                "figures/filter_weights.png", "figures/pruning_history.png"} <= arts

        local = tracker.download(run.info.run_id, "", tmp_path / "dl" / nid.replace(":", "_"))
        model = load_compact(local / "model")  # torch.load(weights_only=True)
        filters = [int(m[f"filters_layer{i}"]) for i in range(5)]
        assert list(model.spec.filters) == filters
        assert model.spec.param_count() == m["param_count"]
        assert model.spec.trainable_param_count() == m["trainable_params"]
        assert model.spec.filter_count() == m["total_filters"] == 2 * filters[0] + sum(filters[1:])
        with open(local / "history" / "pruning_history.csv") as fh:
            assert len(list(csv.DictReader(fh))) >= 1

        # The logged model predicts what the logged metrics say (the task ran with other threads).
        col = neurons.index(nid)
        pred = predict(model, inp.heldout_images)
        assert squared_pearson(inp.heldout_targets[:, col], pred) == pytest.approx(
            m["r2_teacher_heldout"], rel=1e-3, abs=1e-5)
        assert float(r2_raw(inp.ground_truth_heldout[:, col][None], pred[None])[0]) == pytest.approx(
            m["r2_ground_truth"], rel=1e-3, abs=1e-5)
        rd = inp.real[nid.split(":")[0]]
        real = RealData(rd["images"], rd["responses"][rd["neuron_ids"].index(nid)], rd["has_repeats"])
        assert real.has_repeats  # simulated sessions have repeats: r2_er is the real-data score
        scores = evaluate_predictions(real.responses, predict(model, real.images), True)
        assert float(scores["r2_er"][0]) == pytest.approx(m["r2_er"], rel=1e-3, abs=1e-4)

    # Re-running the same config is the same job: nothing compressed, no run added.
    n_runs = len(all_runs(tracker))
    again = run_compress_job(load_job_config(write_config(tmp_path, tiny_base)), progress=False)
    assert again.job_id == res.job_id and again.parent_run_id == res.parent_run_id
    assert again.rows == [] and sorted(again.skipped) == sorted(neurons)
    assert len(all_runs(tracker)) == n_runs
    assert {r.info.run_id for r in neuron_children(tracker, res.parent_run_id)} == \
           {r.info.run_id for r in children}

    # `farm analyze` downloads the job's models; a folder an interrupted download left (spec.json
    # without weights) is fetched again, not taken for a model
    from farm.analyze_job import job_models

    dst = tmp_path / "models"
    half = dst / neurons[0].replace(":", "_") / "model"
    half.mkdir(parents=True)
    (half / "spec.json").write_text("{}")
    got = job_models(tracker, res.job_id, dst)
    assert [n for n, _, _ in got] == sorted(neurons, key=lambda n: int(n.split(":")[1]))
    for nid, run, folder in got:
        assert list(load_compact(folder).spec.neuron_ids) == [nid]
    assert not [p for p in dst.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_changed_simulation_or_a_selection_the_teacher_lacks_fails_before_any_work(tiny_base, tmp_path):
    """data.simulate changed on an existing data.dir used to load the old population silently; a
    neuron selection naming neurons the teacher lacks was found only after the bank and its teacher
    responses. Both now fail first, naming the key."""
    from farm.pipeline import prepare_job, prepare_sessions

    cfg = load_job_config(write_config(tmp_path / "a", tiny_base))
    more = {**cfg.data.simulate, "n_neurons": N_NEURONS + 1}
    changed = load_job_config(write_config(tmp_path / "b", tiny_base, data={"simulate": more}))
    with pytest.raises(ValueError, match=rf"data.simulate: the population simulated in {tiny_base / 'data'} was "
                                         rf"made with another config \(n_neurons: {N_NEURONS} there, {N_NEURONS + 1} "
                                         rf"asked\); delete"):
        prepare_sessions(changed)
    assert len(prepare_sessions(cfg)[0]) == 2  # the config that made it: reused
    beyond = load_job_config(write_config(tmp_path / "c", tiny_base, neurons=f"sim1:0-{N_NEURONS}"))
    with pytest.raises(ValueError, match=rf"neurons: neuron selection 'sim1:0-{N_NEURONS}': sim1:{N_NEURONS} is "
                                         rf"not one of the teacher's neurons"):
        prepare_job(beyond)
    sweep = load_job_config(write_config(tmp_path / "d", tiny_base, sweep={"neurons": "sim0:0"}))
    with pytest.raises(ValueError, match=r"sweep.neurons: neuron selection 'sim0:0'"):
        prepare_job(sweep)
    assert not (tmp_path / "c" / "out" / "responses").exists() and not (tmp_path / "d" / "out" / "responses").exists()


def test_an_image_size_other_than_the_sessions_fails_before_the_bank(tiny_base, tmp_path):
    """A bank or student at another size than the sessions' images failed in every neuron task, after
    its training (scoring on the sessions' images); now before the bank, naming the key."""
    from farm.pipeline import prepare_job

    bank = load_job_config(write_config(tmp_path / "a", tiny_base, bank={"bank": {"n_images": 1000, "image_size": 24}}))
    with pytest.raises(ValueError, match=r"the sessions' images are 16 px, but bank.bank.image_size is 24"):
        prepare_job(bank)
    student = load_job_config(write_config(tmp_path / "b", tiny_base, compress={**TINY_COMPRESS, "image_size": 24}))
    with pytest.raises(ValueError, match=r"the sessions' images are 16 px, but compress.image_size is 24"):
        prepare_job(student)
    assert not (tmp_path / "a" / "out" / "responses").exists()


def test_a_missing_input_path_fails_before_any_work_naming_its_key(tmp_path):
    from farm.pipeline import prepare_job

    for sets, key in ((["teacher.kind=saved", f"teacher.path={tmp_path / 'no_teacher'}"], "teacher.path"),
                      ([f"compress.shared.path={tmp_path / 'no.keras'}"], "compress.shared.path"),
                      (["data.kind=v4", f"data.source={tmp_path / 'no_release'}"], "data.source")):
        cfg = load_job_config("demo", [f"out_dir={tmp_path / 'out'}", f"data.dir={tmp_path / 'data'}", *sets])
        with pytest.raises(FileNotFoundError, match=rf"{key}: {tmp_path}/no\S* does not exist"):
            prepare_job(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_a_shared_recipe_job_trains_one_shared_student_and_starts_each_neuron_from_its_slice(
        tiny_base, local_ray, tmp_path, capsys):
    """compress.recipe: shared. The driver distills ONE shared student for the teacher's neurons
    (cached under out_dir/shared), every neuron task starts from its slice (its distilled R² is the
    slice's), and the runs record the recipe, the teacher's score on the same recorded images and
    the shared stage's cost. Its retrain trains on the bank's mirrors too (retrain.mirrors): the
    driver computes the teacher's responses to them once, and each task gets its neuron's column."""
    from farm.distill import predict, squared_pearson
    from farm.models.compact import load_compact, output_slice
    from farm.pipeline import prepare_job, run_compress_job

    compress = {"recipe": "shared", "student_filters": [6] * 5, "iterative_retrain_passes": 0.2,
                "shared": {"early_filters": 6, "late_filters": 6, "distill": {"passes": 2, "bn_recalibrate_images": 256}},
                "retrain": {"passes": 1, "bn_recalibrate_images": 256, "mirrors": True}}
    # no tracking.uri: the default store, next to out_dir, is where `farm ui --config` points
    path = write_config(tmp_path, tiny_base, compress=compress, tracking={"experiment": "tiny", "uri": None})
    cfg = load_job_config(path)
    res = run_compress_job(cfg, progress=False)
    assert res.failed == [] and len(res.rows) == N_NEURONS
    assert res.tracking_uri == cfg.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    from farm.cli import main

    assert main(["ui", "--config", str(path)]) == 0
    assert f"--backend-store-uri {res.tracking_uri} " in capsys.readouterr().out
    caches = list((Path(cfg.out_dir) / "shared").glob("*/shared.json"))
    assert len(caches) == 1
    info = json.loads(caches[0].read_text())
    shared = load_compact(caches[0].parent / "model")
    assert shared.spec.readout == "factorized" and list(shared.spec.neuron_ids) == info["neuron_ids"]

    prepared = prepare_job(cfg)  # cached: the same shared student, not a second one
    assert len(list((Path(cfg.out_dir) / "shared").glob("*/shared.json"))) == 1
    inp = prepared.inputs
    from farm.data.simulate import load_ground_truth

    flipped = np.ascontiguousarray(inp.bank_images[:, :, ::-1])
    truth = load_ground_truth(tiny_base / "data").subset(list(inp.neuron_ids))
    np.testing.assert_allclose(inp.bank_mirror_targets, truth.predict(flipped),
                               rtol=1e-5, atol=1e-5)
    assert len(list((Path(cfg.out_dir) / "responses").glob("*mirrored*"))) == 1
    tracker = Tracker.open(cfg.tracking_uri(), "tiny")
    parent = tracker.client.get_run(res.parent_run_id).data.metrics
    assert parent["shared_cpu_seconds"] == pytest.approx(info["cpu_seconds"])
    assert parent["shared_median_r2_teacher_heldout"] == pytest.approx(float(np.median(info["r2_teacher_heldout"])))
    for run in neuron_children(tracker, res.parent_run_id):
        nid, m = run.data.tags[TAG_NEURON], run.data.metrics
        assert run.info.status == "FINISHED" and run.data.params["recipe"] == "shared"
        col = inp.neuron_ids.index(nid)
        slice_r2 = squared_pearson(inp.heldout_targets[:, col], predict(output_slice(shared, nid), inp.heldout_images))
        assert m["r2_teacher_distilled"] == pytest.approx(slice_r2, rel=1e-3, abs=1e-5)
        assert "teacher_r2_er" in m and "r2_er" in m
        # the neuron's cost: its start (the slice here) and its process CPU time, start included
        assert m["start_seconds"] >= 0 and m["cpu_seconds"] > 0


# -- failures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_inputs(tiny_base):
    from farm.pipeline import prepare_job

    cfg = load_job_config(write_config(tiny_base / "inputs", tiny_base))
    return prepare_job(cfg).inputs, cfg, tiny_base


@pytest.mark.parametrize("pack", [1, 2])
def test_a_neuron_with_nan_teacher_responses_fails_alone(tiny_inputs, local_ray, tmp_path, pack):
    """Also when it is packed into one task with a good neuron (pack=2)."""
    inputs, cfg, base = tiny_inputs
    good, bad = inputs.neuron_ids[0], inputs.neuron_ids[1]
    targets = inputs.bank_targets.copy()
    targets[::7, 1] = np.nan  # a teacher that returns NaN for some images of one neuron
    broken = NeuronInputs(list(inputs.neuron_ids), inputs.bank_images, targets, inputs.heldout_images,
                          inputs.heldout_targets, inputs.real, inputs.ground_truth_heldout)
    tracker = Tracker.open(f"sqlite:///{_store(tmp_path, base)}", "nan")
    parent = tracker.start_job("nan-job")

    rows = run_neurons([good, bad], broken, cfg.compress, 0, tracker, parent, progress=False, pack=pack)

    by_id = {r["neuron_id"]: r for r in rows}
    assert by_id[good]["status"] == "FINISHED" and by_id[bad]["status"] == "FAILED"
    assert "NaN" in by_id[bad]["error"]
    runs = {r.data.tags[TAG_NEURON]: r for r in neuron_children(tracker, parent)}
    assert len(neuron_children(tracker, parent)) == 2
    assert runs[good].info.status == "FINISHED"
    assert runs[bad].info.status == "FAILED"
    err = runs[bad].data.tags[TAG_ERROR]
    assert err.startswith("ValueError") and "targets" in err and "NaN" in err
    assert runs[bad].data.params["neuron_id"] == bad  # the failed run says what it was


def test_packed_tasks_log_one_finished_run_per_neuron(tiny_inputs, local_ray, tmp_path):
    """farm.pack=3 over 4 neurons: tasks of 3 and 1 neurons (one packed distillation each); every
    neuron gets its own FINISHED run whose logged model scores what its metrics say."""
    from farm.distill import predict, squared_pearson
    from farm.models.compact import load_compact

    inputs, cfg, base = tiny_inputs
    tracker = Tracker.open(f"sqlite:///{_store(tmp_path, base)}", "packed")
    parent = tracker.start_job("packed-job")
    neurons = list(inputs.neuron_ids)
    rows = run_neurons(neurons, inputs, cfg.compress, 0, tracker, parent, progress=False, pack=3)
    assert sorted(r["neuron_id"] for r in rows) == sorted(neurons)
    assert all(r["status"] == "FINISHED" for r in rows), rows
    children = neuron_children(tracker, parent, "FINISHED")
    assert sorted(r.data.tags[TAG_NEURON] for r in children) == sorted(neurons)
    for run in children:
        nid = run.data.tags[TAG_NEURON]
        model = load_compact(tracker.download(run.info.run_id, "model", tmp_path / nid.replace(":", "_")))
        assert model.spec.neuron_ids == (nid,)
        pred = predict(model, inputs.heldout_images)
        assert squared_pearson(inputs.heldout_targets[:, neurons.index(nid)], pred) == pytest.approx(
            run.data.metrics["r2_teacher_heldout"], rel=1e-3, abs=1e-5)
    with pytest.raises(ValueError, match="farm.pack"):
        run_neurons(neurons, inputs, cfg.compress, 0, tracker, parent, progress=False, pack=0)


def test_memory_gb_makes_ray_run_no_more_tasks_than_a_node_holds(tiny_inputs, local_ray, tmp_path):
    """farm.memory_gb reserves Ray memory per neuron task: two neurons each asking for 60% of the
    node's memory run one after the other although 2 CPUs are free; a request larger than any node
    fails before any work (on local Ray no bigger node can join)."""
    inputs, cfg, base = tiny_inputs
    tracker = Tracker.open(f"sqlite:///{_store(tmp_path, base)}", "memory")
    parent = tracker.start_job("memory-job")
    node_gb = max(n["Resources"].get("memory", 0) for n in local_ray.nodes() if n["Alive"]) / 2**30
    neurons = list(inputs.neuron_ids)[:2]

    with pytest.raises(ValueError, match=r"farm.memory_gb = .* GiB per task, but the largest Ray node"):
        run_neurons(neurons, inputs, cfg.compress, 0, tracker, parent, progress=False, memory_gb=2 * node_gb)
    assert neuron_children(tracker, parent) == []

    rows = run_neurons(neurons, inputs, cfg.compress, 0, tracker, parent, progress=False,
                       memory_gb=0.6 * node_gb)
    assert all(r["status"] == "FINISHED" for r in rows), rows
    # a child run is logged when its task ends; the row's seconds say when the task's work began
    seconds = {r["neuron_id"]: r["seconds"] for r in rows}
    spans = sorted((r.info.end_time / 1e3 - seconds[r.data.tags[TAG_NEURON]], r.info.end_time / 1e3)
                   for r in neuron_children(tracker, parent, "FINISHED"))
    (_, first_end), (second_start, _) = spans
    assert second_start >= first_end - 0.5, f"the two tasks overlapped: {spans}"


def test_a_task_leaves_other_neurons_in_flight_runs_alone(tiny_inputs, tmp_path):
    """A task checks only its own neuron's earlier runs: another neuron's run that is still being
    logged (RUNNING) must not be marked KILLED under it."""
    inputs, cfg, base = tiny_inputs
    bad = inputs.neuron_ids[1]
    targets = inputs.bank_targets.copy()
    targets[:, 1] = np.nan  # fails at once: no training needed to reach the check
    broken = NeuronInputs(list(inputs.neuron_ids), inputs.bank_images, targets, inputs.heldout_images,
                          inputs.heldout_targets)
    tracker = Tracker.open(f"sqlite:///{_store(tmp_path, base)}", "inflight")
    parent = tracker.start_job("inflight-job")
    in_flight = tracker.client.create_run(tracker.experiment_id, tags={
        "mlflow.parentRunId": parent, TAG_KIND: "neuron", TAG_NEURON: inputs.neuron_ids[0]}).info.run_id
    own_stale = tracker.client.create_run(tracker.experiment_id, tags={
        "mlflow.parentRunId": parent, TAG_KIND: "neuron", TAG_NEURON: bad}).info.run_id

    row = compress_and_log(bad, broken, cfg.compress, 0, tracker, parent, device="cpu")

    assert row["status"] == "FAILED"
    assert tracker.client.get_run(in_flight).info.status == "RUNNING"
    assert tracker.client.get_run(own_stale).info.status == "KILLED"  # its own earlier attempt


def _store(tmp_path: Path, base: Path) -> Path:
    """This test's own store: a copy of the module's empty, migrated one."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(base / "template.db", db)
    return db


# -- processes, from /proc (Linux; psutil is not a dependency) --------------------------------------
def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent's wait() counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout: float) -> list[int]:
    """The pids still alive after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def _ray_workers_running(task: str, root_pid: int) -> list[int]:
    """Ray worker processes under ``root_pid`` executing ``task`` now (process title ray::<task>)."""
    return [p for p in descendants(root_pid) if cmdline(p).startswith(f"ray::{task}")]


def test_a_killed_worker_still_ends_with_one_finished_run_per_neuron(tiny_inputs, local_ray, tmp_path):
    inputs, cfg, base = tiny_inputs
    neurons = list(inputs.neuron_ids[:3])
    tracker = Tracker.open(f"sqlite:///{_store(tmp_path, base)}", "kill")
    parent = tracker.start_job("kill-job")
    out: dict = {}

    def job():
        try:
            out["rows"] = run_neurons(neurons, inputs, cfg.compress, 0, tracker, parent, max_retries=3,
                                      progress=False)
        except BaseException as e:  # surfaced by the assertions below
            out["error"] = e

    th = threading.Thread(target=job, daemon=True)
    th.start()
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and th.is_alive():
        workers = _ray_workers_running("compress_neuron", os.getpid())
        if workers:
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)  # a system failure: Ray retries the task
        else:
            time.sleep(0.05)
    th.join(timeout=400)
    assert victim is not None, "never saw a worker running compress_neuron"
    assert not th.is_alive(), "run_neurons did not return"
    assert "error" not in out, out.get("error")
    assert not wait_gone([victim], 30), "the killed worker is still alive"

    rows = out["rows"]
    assert sorted(r["neuron_id"] for r in rows) == sorted(neurons)
    assert all(r["status"] in ("FINISHED", "SKIPPED") for r in rows), rows
    finished = [r.data.tags[TAG_NEURON] for r in neuron_children(tracker, parent, "FINISHED")]
    assert sorted(finished) == sorted(neurons)  # exactly one FINISHED run per neuron
    assert not neuron_children(tracker, parent, "RUNNING")


# -- a killed driver (slow: two CLI processes, each starting Ray) ------------------------------------
def _driver(tmp_path: Path, base: Path, ray_tmp: str, **overrides):
    """A `farm compress` command line for a tiny job of sim1, its environment and its store's client."""
    from mlflow import MlflowClient

    cfg_path = write_config(tmp_path, base, neurons="sim1", **overrides)
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "farm.cli", "compress", "--config", str(cfg_path)]
    return cmd, env, MlflowClient(load_job_config(cfg_path).tracking.uri)


@pytest.mark.slow
def test_killing_the_driver_and_rerunning_completes_without_duplicates(tiny_base, ray_tmp, tmp_path):
    # one neuron task at a time (2 CPUs each on the 2-CPU local Ray): the kill lands while the next
    # neuron is still running (with two at a time, all 4 tiny neurons sometimes finished first)
    cmd, env, client = _driver(tmp_path, tiny_base, ray_tmp, farm={"num_cpus": 2})

    def finished_children() -> dict[str, str]:
        exp = client.get_experiment_by_name("tiny")
        if exp is None:
            return {}
        runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = 'neuron'", max_results=1000)
        return {r.data.tags[TAG_NEURON]: r.info.run_id for r in runs if r.info.status == "FINISHED"}

    with open(tmp_path / "first.log", "wb") as log1:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    ray_procs: list[int] = []
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and first.poll() is None and not finished_children():
            ray_procs = descendants(first.pid) or ray_procs
            time.sleep(0.5)
        assert first.poll() is None, f"the driver ended before it was killed: {_tail(tmp_path / 'first.log')}"
        assert finished_children(), "no neuron finished in time"
        ray_procs = descendants(first.pid) or ray_procs
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # A local driver's Ray (GCS, raylet, workers) shares its fate: all of it is gone.
    assert ray_procs, "the driver started no processes"
    left = wait_gone(ray_procs, 60)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"Ray processes outlived their driver: {[(p, cmdline(p)) for p in left]}"

    before = finished_children()
    assert 1 <= len(before) < N_NEURONS
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"{len(before)} already finished, {N_NEURONS - len(before)} to compress" in second.stderr

    after = finished_children()
    assert sorted(after) == [f"sim1:{i}" for i in range(N_NEURONS)]
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = 'neuron'", max_results=1000)
    assert sum(r.info.status == "FINISHED" for r in runs) == N_NEURONS  # no duplicates
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for nid, rid in before.items():
        assert after[nid] == rid  # finished before the kill: skipped, not recomputed
    parents = client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = 'job'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


# -- the sweep (slow: Tune) -------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_trials_pareto_chosen_cache_and_resume(tiny_base, local_ray, tmp_path, capfd):
    """First run: sim1:1's cached distilled model is unreadable, so its trials error (sim1:0's
    finish). Second run, cache repaired: Tune resumes the experiment (Tuner.restore), re-runs only
    the errored trials, and sim1:0 is neither distilled nor tried again. Tune's own console (its
    experiment box, a TensorBoard hint) stays out of farm's output."""
    import torch
    from ray import tune

    from farm.models.compact import CompactSpec, build_compact, save_compact
    from farm.pipeline import prepare_job, run_sweep_job
    from farm.sweep import choose_model, pareto_front

    cfg = load_job_config(write_config(tmp_path, tiny_base, sweep={"max_failures": 0}))
    job_id = cfg.resolved_job_id() + "-sweep"
    exp_dir = Path(cfg.out_dir).resolve() / "tune" / job_id
    broken = exp_dir / "distilled" / "sim1_1"
    save_compact(build_compact(CompactSpec(filters=(6,) * 5, image_size=16, neuron_ids=("sim1:1",))), broken)
    (broken / "state_dict.pt").write_bytes(b"not a state dict")
    (broken / "distilled.json").write_text(
        '{"neuron_id": "sim1:1", "r2_teacher_distilled": 0.5, "seconds": 0, "dir": "%s"}' % broken)
    prepared = prepare_job(cfg)

    first = run_sweep_job(cfg, progress=False, prepared=prepared)
    console = capfd.readouterr()
    assert "Configuration for experiment" not in console.out + console.err
    assert "tensorboard" not in (console.out + console.err).lower()
    tracker = Tracker.open(cfg.tracking.uri, "tiny")
    parents = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG_KIND}` = 'sweep'")
    assert len(parents) == 1 and parents[0].data.tags[TAG_JOB] == job_id
    parent = parents[0].info.run_id
    assert [r.neuron_id for r in first] == ["sim1:0", "sim1:1"]
    assert len(first[0].trials) == len(cfg.sweep.taus) and first[1].trials == [] and first[1].chosen is None
    runs0 = {r.info.run_id for r in tracker.child_runs(parent, "trial")}
    assert len(runs0) == len(cfg.sweep.taus)
    assert tune.Tuner.can_restore(str(exp_dir))
    cached0 = exp_dir / "distilled" / "sim1_0"
    stamps = {p: p.stat().st_mtime_ns for p in cached0.iterdir()}
    assert {"distilled.json", "state_dict.pt", "spec.json"} <= {p.name for p in stamps}

    shutil.rmtree(broken)  # repaired: sim1:1 is distilled for real on the next run
    results = run_sweep_job(cfg, progress=False, prepared=prepared)
    assert {p: p.stat().st_mtime_ns for p in cached0.iterdir()} == stamps  # sim1:0 not distilled again
    assert torch.load(broken / "state_dict.pt", weights_only=True)  # sim1:1 now is
    assert tracker.client.get_run(parent).info.status == "FINISHED"

    trials = tracker.child_runs(parent, "trial")
    assert len(trials) == 2 * len(cfg.sweep.taus)  # one run per (neuron, tau, criterion): no re-runs
    assert runs0 <= {r.info.run_id for r in trials}
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert [r.neuron_id for r in results] == ["sim1:0", "sim1:1"]
    assert results[0].r2_teacher_distilled == first[0].r2_teacher_distilled
    for res in results:
        runs = [r for r in trials if r.data.tags[TAG_NEURON] == res.neuron_id]
        assert sorted(float(r.data.params["tau"]) for r in runs) == sorted(cfg.sweep.taus)
        by_id = {r.info.run_id: r for r in runs}
        assert {t["run_id"] for t in res.trials} == set(by_id)
        p = [by_id[t["run_id"]].data.metrics["param_count"] for t in res.trials]
        r2 = [by_id[t["run_id"]].data.metrics["r2_teacher_heldout"] for t in res.trials]
        assert res.front == pareto_front(p, r2) and len(res.front) >= 1
        assert res.chosen == choose_model(p, r2, res.r2_teacher_distilled, cfg.sweep.eps)
        for i, t in enumerate(res.trials):
            assert by_id[t["run_id"]].data.tags["farm.pareto"] == str(i in res.front).lower()
        chosen = [r for r in runs if r.data.tags["farm.chosen"] == "true"]
        if res.chosen is None:  # no trial within eps of the distilled model
            assert chosen == [] and all(v < (1 - cfg.sweep.eps) * res.r2_teacher_distilled for v in r2)
        else:
            assert [c.info.run_id for c in chosen] == [res.chosen_trial["run_id"]]
    assert {"sweep/pareto_sim1_0.png", "sweep/pareto_sim1_1.png"} <= artifact_paths(tracker, parent, "sweep")


# -- job-level analyses -----------------------------------------------------------------------------
TINY_ANALYSIS = {
    "synth": {"n_steps": 10, "n_restarts": 2},
    "natural": {"top_k": 4, "n_random": 60},
    "saliency": {"patch_radius": 4, "stride": 8, "n_patches": 2, "n_controls": 2},
    "dots": {"radii": [1, 2, 3, 5, 8], "counts": [1, 2, 4], "n_per_count": 2},
    "n_base_images": 3, "n_shown": 4, "ablation_layers": [1, 6], "cumulative_layer": 3, "cka_images": 100,
}


def test_analyze_job_logs_each_model_and_the_population_then_skips(tiny_base, local_ray, tmp_path):
    from farm.analysis.common import predict
    from farm.analyze_job import TAG_ANALYZED, run_analyze_job
    from farm.data.images import ImageBank
    from farm.models.compact import load_compact
    from farm.pipeline import run_compress_job

    cfg = load_job_config(write_config(tmp_path, tiny_base,
                                       analysis={"images": 200, "top_k": 4, "config": TINY_ANALYSIS}))
    with pytest.raises(ValueError, match="no compress job"):
        run_analyze_job(cfg, progress=False)
    job = run_compress_job(cfg, progress=False)
    res = run_analyze_job(cfg, progress=False)
    tracker = Tracker.open(cfg.tracking.uri, "tiny")
    assert res.parent_run_id == job.parent_run_id and res.failed == [] and res.skipped == []
    children = neuron_children(tracker, job.parent_run_id, "FINISHED")
    assert sorted(r["neuron_id"] for r in res.rows) == sorted(r.data.tags[TAG_NEURON] for r in children)
    assert len(children) == N_NEURONS

    _, bank_images, _ = ImageBank(tiny_base / "bank").load_all()
    for run in children:
        nid, m = run.data.tags[TAG_NEURON], run.data.metrics
        assert run.data.tags[TAG_ANALYZED] == "true" and run.info.status == "FINISHED"
        arts = artifact_paths(tracker, run.info.run_id, "analysis")
        assert {"analysis/metrics.json", "analysis/natural.npz", "analysis/synth_max.png", "analysis/dots.png",
                "analysis/saliency.png", "analysis/adversarial.png", "analysis/dsi_layer1.png"} <= arts, nid
        # The maximizing natural image was searched over the whole bank, not only the sample.
        model = load_compact(tracker.download(run.info.run_id, "model", tmp_path / "dl" / nid.replace(":", "_")))
        whole_bank = predict(model, bank_images)
        assert m["analysis.natural_top1"] == pytest.approx(float(whole_bank.max()), rel=1e-4, abs=1e-5)
        # Adversarial+ raises the response and adversarial- lowers it.
        assert m["analysis.adversarial_plus_mean_change"] > 0 > m["analysis.adversarial_minus_mean_change"]

    parent = tracker.client.get_run(job.parent_run_id)
    assert {"analysis/population/cka.png", "analysis/population/gallery.png",
            "analysis/population/gallery_natural.png", "analysis/population/kernel_similarity.png",
            "analysis/population/metrics.json"} <= artifact_paths(tracker, job.parent_run_id, "analysis")
    assert parent.data.metrics["analysis.models"] == N_NEURONS and "analysis.cka_layer0" in parent.data.metrics
    assert (Path(cfg.out_dir) / "analysis" / "summary.json").is_file()

    # Re-running analyses nothing again (population figures are refreshed); --force would redo them.
    again = run_analyze_job(cfg, progress=False)
    assert again.rows == [] and sorted(again.skipped) == sorted(r["neuron_id"] for r in res.rows)


# -- the demo ---------------------------------------------------------------------------------------
def test_the_demo_config_end_to_end(tiny_base, local_ray, tmp_path, capsys):
    """configs/demo.yaml as `farm demo` runs it (simulate -> ensemble teacher -> compress the test
    session on Ray -> sweep), shrunk by overrides; the summary table and the MLflow UI command."""
    from farm.pipeline import run_demo

    shutil.copyfile(tiny_base / "template.db", tmp_path / "mlflow.db")
    overrides = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "neurons=sim2",
                 "data.simulate={n_sessions: 3, n_neurons: 3, n_images: 240, image_size: 32, filters: [3, 4]}",
                 "bank.bank.n_images=600", "bank.heldout=150", "compress.student_filters=[6,6,6,6,6]",
                 "compress.distill.passes=1", "compress.retrain.passes=1", "sweep.taus=[0.8,0.95]",
                 "sweep.neurons=sim2:0", "farm.local_num_cpus=2"]
    result = run_demo(str(tmp_path / "demo"), overrides)
    out = capsys.readouterr().out
    assert result.failed == [] and [s["neuron_id"] for s in result.summary] == ["sim2:0", "sim2:1", "sim2:2"]
    for s in result.summary:
        assert 0 <= s["r2_teacher_heldout"] <= 1 and "r2_ground_truth" in s and s["param_count"] > 0
    assert "R² truth" in out and "sim2:2" in out and "sweep (per neuron" in out
    assert f"--backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in out and "--host 127.0.0.1" in out
    assert f"farm analyze --config demo out_dir={tmp_path / 'demo'}" in out

    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "farm-demo")
    sweep_parent = tracker.find_job(result.job_id + "-sweep", kind="sweep")
    trials = tracker.child_runs(sweep_parent)
    assert sorted(float(r.data.params["tau"]) for r in trials) == [0.8, 0.95]
    # the chosen trial (if any reached (1 - eps) x the distilled R²) is the rule's choice
    from farm.sweep import choose_model

    m = [r.data.metrics for r in trials]
    want = choose_model([x["param_count"] for x in m], [x["r2_teacher_heldout"] for x in m],
                        m[0]["r2_teacher_distilled"], 0.02)
    assert [r.data.tags.get("farm.chosen") == "true" for r in trials] == [i == want for i in range(len(trials))]
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written["job_id"] == result.job_id and len(written["neurons"]) == 3


def test_own_recordings_written_as_sessions_are_a_job(tiny_base, local_ray, tmp_path):
    """README "Your own recordings": a lab's arrays made into Sessions and written with write_session
    (here the arrays of a simulated population, under the lab's own session ids); a job with
    ``data.kind: sessions`` then trains the ensemble teacher on them and compresses the test session's
    neurons, scored with r2_er on its second half. Without a test session it stops before training,
    naming the fix."""
    from farm.data.sessions import Session, write_session
    from farm.data.simulate import SimulationConfig, simulate_population
    from farm.pipeline import run_compress_job

    pop = simulate_population(SimulationConfig(n_sessions=3, n_neurons=3, n_images=240, image_size=32,
                                               filters=(3, 4)))
    mine = tmp_path / "recordings"
    mine.mkdir()
    for i, s in enumerate(pop.sessions):
        write_session(Session(session_id=f"m{i}", images=s.images, responses=s.responses,
                              image_kinds=s.image_kinds, role=s.role, animal="monkey-a"), mine / f"m{i}.parquet")
    shutil.copyfile(tiny_base / "template.db", tmp_path / "mlflow.db")

    def job(data_dir: Path, *extra: str):
        return load_job_config("demo", [
            f"out_dir={tmp_path / 'out'}", "data.kind=sessions", f"data.dir={data_dir}", "neurons=all",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "bank.bank.n_images=600", "bank.heldout=150",
            "compress.student_filters=[6,6,6,6,6]", "compress.distill.passes=1", "compress.retrain.passes=1", *extra])

    result = run_compress_job(job(mine), progress=False)
    assert result.failed == []
    assert [s["neuron_id"] for s in result.summary] == ["m2:0", "m2:1", "m2:2"]  # the test session's
    for s in result.summary:
        assert s["param_count"] > 0 and 0 <= s["r2_teacher_heldout"] <= 1 and np.isfinite(s["r2_er"])
    assert sorted(run_compress_job(job(mine), progress=False).skipped) == ["m2:0", "m2:1", "m2:2"]  # resumed
    with pytest.raises(ValueError, match=r"trained from a teacher config that differs in test_session \(None -> 'm1'\)"):
        run_compress_job(job(mine, "teacher.session=m1"), progress=False)

    # other recordings in the same out_dir: the teacher stored there is stale, refused before any work
    changed = tmp_path / "changed"
    changed.mkdir()
    for i, s in enumerate(pop.sessions):
        write_session(Session(session_id=f"m{i}", images=s.images[:200], responses=s.responses[:, :200],
                              image_kinds=s.image_kinds[:200], role=s.role), changed / f"m{i}.parquet")
    with pytest.raises(ValueError, match=r"out/teacher: this job's teacher was trained from sessions \['m0', 'm1', "
                                         r"'m2'\] .*240.*now holds .*200.*Remove .*teacher.kind: saved"):
        run_compress_job(job(changed), progress=False)
    shutil.copytree(tmp_path / "out" / "teacher", tmp_path / "kept_teacher")  # reused on purpose: kind saved
    with pytest.raises(ValueError, match=r"bank: the image bank cached in .*out/bank was built from other source "
                                         r"images than this job's \(sessions \['m0', 'm1'\]"):  # the old images'
        run_compress_job(job(changed, "teacher.kind=saved", f"teacher.path={tmp_path / 'kept_teacher'}"),
                         progress=False)
    kept = run_compress_job(job(changed, "teacher.kind=saved", f"teacher.path={tmp_path / 'kept_teacher'}",
                                "neurons=m2:0", f"bank.dir={tmp_path / 'bank2'}"), progress=False)  # new sources
    assert kept.failed == [] and [s["neuron_id"] for s in kept.summary] == ["m2:0"]
    # no session with role "test" and no teacher.session: a clear error, before any teacher work
    other = tmp_path / "no_test"
    other.mkdir()
    write_session(Session(session_id="x0", images=pop.sessions[0].images, responses=pop.sessions[0].responses,
                          image_kinds=pop.sessions[0].image_kinds, role="train"), other / "x0.parquet")
    shutil.rmtree(tmp_path / "out" / "teacher")
    with pytest.raises(ValueError, match="no session has role 'test'; name one with teacher.session"):
        run_compress_job(job(other), progress=False)
    assert not (tmp_path / "out" / "teacher").exists()


# -- real V4 neurons through the farm ---------------------------------------------------------------
@pytest.mark.slow
def test_the_v4_190923_config_compresses_real_neurons(tiny_base, local_ray, tmp_path, v4_dir, published_dir):
    """configs/v4_190923.yaml (the paper's release -> Parquet sessions, the published shared compact
    teacher, a bank of training-session images only) shrunk by overrides: two real 190923 neurons
    compressed on Ray and logged, each scored against 190923's second half; the logged raw R² is
    the logged model's own on those images."""
    from farm.data.sessions import read_session
    from farm.distill import predict
    from farm.metrics import r2_raw
    from farm.models.compact import load_compact
    from farm.models.published import shared_compact_path
    from farm.pipeline import run_compress_job

    shutil.copyfile(tiny_base / "template.db", tmp_path / "mlflow.db")
    cfg = load_job_config(REPO / "configs" / "v4_190923.yaml", [
        f"out_dir={tmp_path / 'out'}", f"data.dir={tmp_path / 'sessions'}", f"data.source={v4_dir}",
        f"teacher.path={shared_compact_path(published_dir, 'from_ensemble_model', 200)}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "neurons=190923:0-1", "bank.heldout=100",
        "bank.bank.n_images=400", "compress.student_filters=[4,4,4,4,4]", "compress.distill.passes=1",
        "compress.distill.bn_recalibrate_images=256", "compress.retrain.bn_recalibrate_images=256",
        "compress.specialize.passes=3", "compress.specialize.tune_passes=1", "compress.retrain.passes=1",
        "farm.local_num_cpus=2", "farm.object_store_memory=300000000"])
    result = run_compress_job(cfg, progress=False)
    assert result.failed == [] and sorted(r["neuron_id"] for r in result.rows) == ["190923:0", "190923:1"]

    second = read_session(next((tmp_path / "sessions").glob("190923*.parquet"))).halves()[1]
    averaged = second.mean_responses()
    tracker = Tracker.open(cfg.tracking.uri, cfg.tracking.experiment)
    runs = neuron_children(tracker, result.parent_run_id, "FINISHED")
    assert sorted(r.data.tags[TAG_NEURON] for r in runs) == ["190923:0", "190923:1"]
    for run in runs:
        nid = run.data.tags[TAG_NEURON]
        m = run.data.metrics
        assert "r2_er" not in m  # 190923's raw repeats are not public: raw R² only
        model = load_compact(Path(tracker.download(run.info.run_id, "model", tmp_path / nid.replace(":", "_"))))
        assert model.spec.neuron_ids == (nid,) and model.spec.image_size == 112
        want = r2_raw(averaged[int(nid.split(":")[1])], predict(model, second.images))[0]
        assert m["r2_raw"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert m["param_count"] == model.param_count()
        # the config's recipe: each neuron specialized from the published 35-early-filter shared model,
        # in its factorized readout form, pruned once
        assert run.data.params["recipe"] == "shared" and all(k <= 35 for k in model.spec.filters[:3])
        assert model.spec.readout == "factorized" and model.spec.filters[3] <= 48 and model.spec.filters[4] <= 16
        assert "teacher_r2_raw" in m
    # the published model's layer-2 activations of the 300 bank images and their mirrors: computed
    # once for both neurons, in one file, their cost on the job run
    feats = list((tmp_path / "out" / "shared_features").glob("*/early.json"))
    assert len(feats) == 1 and json.loads(feats[0].read_text())["shape"] == [600, 28, 28, 35]
    # and its map of each neuron on them (layers 3-4 once for both), one file per neuron
    maps = sorted((tmp_path / "out" / "shared_features").glob("*/maps/*/*.npy"))
    assert [p.name for p in maps] == ["190923_0.npy", "190923_1.npy"]
    assert all(np.load(p, mmap_mode="r").shape == (600, 28, 28) for p in maps)
    assert tracker.client.get_run(result.parent_run_id).data.metrics["shared_features_cpu_seconds"] > 0


# -- teacher responses as Ray tasks over bank shards -------------------------------------------------
def test_teacher_responses_as_ray_tasks_equal_the_driver_pass(tiny_base, local_ray, tmp_path, caplog):
    """A bank of 4 shards: the teacher's responses computed by one Ray task per shard equal those of
    the driver's own pass, in image-id order, with progress up to the whole bank; a job whose bank
    reaches farm.teacher_tasks_min_images takes that path and gets the same distillation targets."""
    import logging

    from farm.data.images import BankConfig, build_bank
    from farm.data.simulate import load_ground_truth
    from farm.teacher_responses import compute_teacher_responses
    from farm.fanout import ray_shard_runner
    from farm.pipeline import prepare_job

    bank = build_bank(None, BankConfig(n_images=400, image_size=16, shard_size=100,
                                       proportions={"gaudy": 0.5, "synthetic": 0.5}, seed=3), tmp_path / "bank")
    assert len(bank.shards) == 4
    teacher = load_ground_truth(tiny_base / "data")
    serial = compute_teacher_responses(teacher, bank)
    seen = []
    parallel = compute_teacher_responses(teacher, bank, runner=ray_shard_runner(),
                                         progress=lambda done, total: seen.append((done, total)))
    assert np.array_equal(parallel.image_ids, np.arange(400)) and np.array_equal(serial.image_ids, np.arange(400))
    np.testing.assert_allclose(parallel.responses, serial.responses, rtol=1e-5, atol=1e-6)
    assert parallel.neuron_ids == serial.neuron_ids and seen[-1] == (400, 400) and len(seen) == 4
    with pytest.raises(ValueError, match="needs an image bank"):
        compute_teacher_responses(teacher, bank.load_all()[1], runner=ray_shard_runner())
    mirrored = compute_teacher_responses(teacher, bank, runner=ray_shard_runner(), mirror=True)
    np.testing.assert_allclose(mirrored.responses, compute_teacher_responses(teacher, bank, mirror=True).responses,
                               rtol=1e-5, atol=1e-6)
    assert mirrored.bank_id == bank.bank_id + "|mirrored"

    targets = {}
    for name, threshold in (("driver", 0), ("tasks", 1)):
        cfg_path = write_config(tmp_path / name, tiny_base,  # the bank above, by its own config
                                bank={"dir": str(tmp_path / "bank"), "bank": {
                                    "n_images": 400, "shard_size": 100, "seed": 3,
                                    "proportions": {"gaudy": 0.5, "synthetic": 0.5}}},
                                farm={"teacher_tasks_min_images": threshold})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="farm.pipeline"):
            prepared = prepare_job(load_job_config(cfg_path))
        assert ("4 Ray tasks, one per shard" in caplog.text) == (name == "tasks")
        targets[name] = (prepared.inputs.bank_targets, prepared.inputs.heldout_targets)
    for a, b in zip(targets["driver"], targets["tasks"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_summary_table_shows_the_teacher_on_real_data_next_to_the_compact_model(capsys):
    from farm.pipeline import print_summary

    row = {"neuron_id": "190923:0", "param_count": 5584, "total_filters": 26, "filters": [4, 4, 5, 3, 6],
           "r2_teacher_heldout": 0.335, "r2_raw": 0.109, "teacher_real_r2": 0.512}
    print_summary([row, {**row, "neuron_id": "190923:1", "r2_raw": 0.294, "teacher_real_r2": 0.43}], "job x")
    lines = capsys.readouterr().out.splitlines()
    head = next(l for l in lines if l.startswith("neuron"))
    assert "r2_raw (data)" in head and head.rstrip().endswith("teacher r2_raw")
    first = next(l for l in lines if l.startswith("190923:0")).split()
    assert first[-2:] == ["0.109", "0.512"]
    print_summary([{k: v for k, v in row.items() if k != "teacher_real_r2"}])
    assert "teacher r2_raw" not in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_prints_one_line_marks_the_runs_killed_and_a_rerun_resumes(tiny_base, ray_tmp, tmp_path):
    """SIGINT (Ctrl-C) to a running job: exit 130 with one sentence and no traceback, the job's run
    and its unfinished neuron runs KILLED; the rerun finishes the rest without duplicates."""
    cmd, env, client = _driver(tmp_path, tiny_base, ray_tmp)

    def runs(kind: str) -> list:
        exp = client.get_experiment_by_name("tiny")
        return [] if exp is None else client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = '{kind}'")

    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None and not runs("neuron"):
            time.sleep(0.5)
        assert first.poll() is None and runs("neuron"), "no neuron run started in time"
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "farm: interrupted; finished neurons are kept: rerun the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert [r.info.status for r in runs("job")] == ["KILLED"]
    assert not [r for r in runs("neuron") if r.info.status == "RUNNING"]
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    finished = [r for r in runs("neuron") if r.info.status == "FINISHED"]
    assert sorted(r.data.tags[TAG_NEURON] for r in finished) == [f"sim1:{i}" for i in range(N_NEURONS)]
    assert [r.info.status for r in runs("job")] == ["FINISHED"]

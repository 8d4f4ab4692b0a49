"""The compress job submitted to a real local Ray head through the Jobs API.

The head is `ray start --head --block` run as this test's own subprocess, with:
- RAY_AUTH_MODE=disabled set explicitly: Ray 2.60 turns token auth on or off depending on whether
  a token file happens to exist (ecosystem.md §5f); a test must not depend on that. Real clusters
  use token mode (cluster.yaml).
- a private --temp-dir (so `ray_current_cluster` is written there: a later plain `ray.init()` of
  anyone on the machine does not join this head) and free ports for every fixed default port
  (GCS 6379, dashboard 8265, client 10001, agents), so it can run beside other clusters.
- the dashboard (Jobs API) on 127.0.0.1 only.

Stopping: `ray stop` stops EVERY Ray process of the user on the machine (other sessions' clusters
included), so it is never used here. `--block` keeps the head's processes children of the `ray
start` process, which shuts them down on SIGTERM (and, through Linux fate sharing, they die with it
anyway); the test then checks that no process naming its temp dir is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = Path(sys.executable).with_name("ray")
DASHBOARD_TIMEOUT_S = 120
JOB_TIMEOUT_S = 480
EXCLUDES = [".venv", ".git", "farm_runs", "farm_data", "mlflow.db", "mlartifacts", "mlruns", "**/__pycache__",
            "*.egg-info"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def processes_naming(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (from /proc: Linux)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        out.append(int(d.name))
            except OSError:
                continue
    return out


@pytest.fixture
def ray_head(tmp_path):
    if not RAY_CLI.is_file() and shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed (ray[default] provides it)")
    ray_cli = str(RAY_CLI if RAY_CLI.is_file() else shutil.which("ray"))
    import ray

    if ray.is_initialized():  # this process must not hold another Ray while the head runs
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="frj", dir="/tmp")  # short: unix socket paths
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env = free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [ray_cli, "start", "--head", "--block", "--num-cpus", "2", "--object-store-memory", "300000000",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(rt_env), "--disable-usage-stats", "--temp-dir", temp_dir]
    log_path = tmp_path / "ray_start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + DASHBOARD_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            tail = log_path.read_text(errors="replace")[-3000:]
            assert head.poll() is None, f"ray start exited ({head.returncode}):\n{tail}"
            assert time.monotonic() < deadline, f"no Jobs API on {url} in {DASHBOARD_TIMEOUT_S} s:\n{tail}"
            time.sleep(0.5)
        yield url, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        deadline = time.monotonic() + 30
        while processes_naming(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = processes_naming(temp_dir)
        for pid in left:  # ours: they name this test's private temp dir
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of this head outlived it: {left}"


def tiny_config(tmp_path: Path) -> Path:
    cfg = {
        "name": "tiny-rayjob", "out_dir": str(tmp_path / "out"), "neurons": "sim1:0-1",
        "data": {"kind": "simulated", "dir": str(tmp_path / "data"),
                 "simulate": {"n_neurons": 2, "n_sessions": 2, "n_images": 200, "image_size": 16,
                              "filters": [3, 4], "n_calibration": 64}},
        "teacher": {"kind": "ground_truth"},
        "bank": {"heldout": 200, "bank": {"n_images": 1000, "shard_size": 1000}},
        "compress": {"student_filters": [6] * 5,
                     "distill": {"passes": 1, "log_every_steps": 5, "bn_recalibrate_images": 256},
                     "retrain": {"passes": 1, "log_every_steps": 5, "bn_recalibrate_images": 256}},
        # local_num_cpus / object_store_memory would be refused when joining a cluster: init_ray
        # drops them when RAY_ADDRESS is set (inside a Ray Job).
        "farm": {"num_cpus": 1, "local_num_cpus": 2, "object_store_memory": 300_000_000},
        "tracking": {"experiment": "tiny-rayjob", "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_compress_job_submitted_through_the_ray_jobs_api(ray_head, tmp_path):
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, env = ray_head
    cfg_path = tiny_config(tmp_path)
    client = JobSubmissionClient(url)
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/compress.py --config {cfg_path}",
        # env_vars the farm's driver sets too: a job's runtime env must merge with the driver's.
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES,
                     "env_vars": {"RAY_USAGE_STATS_ENABLED": "0",
                                  "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} still {status} after {JOB_TIMEOUT_S} s:\n{client.get_job_logs(job)[-3000:]}")
        time.sleep(1)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    # (The relative entrypoint jobs/compress.py only exists in the uploaded working_dir.)
    assert "2 to compress" in logs

    mlf = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlf.get_experiment_by_name("tiny-rayjob")
    parents = mlf.search_runs([exp.experiment_id], "tags.`farm.kind` = 'job'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = mlf.search_runs([exp.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(r.data.tags["farm.neuron_id"] for r in children) == ["sim1:0", "sim1:1"]
    for r in children:
        assert r.info.status == "FINISHED"
        assert {"param_count", "r2_teacher_heldout", "r2_ground_truth"} <= set(r.data.metrics)


def test_farm_submit_lands_runs_in_the_submitters_store_and_plain_relative_paths_refuse(ray_head, tmp_path):
    """`farm submit` of a config with RELATIVE paths: the job SUCCEEDS and its runs are in the store
    next to out_dir as the submitting side resolves it (not in Ray's working-dir copy). The same
    config submitted plainly (`ray job submit` style) fails at start, saying what to set."""
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, env = ray_head
    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg.update(name="tiny-submit", out_dir="farm_runs/tiny", tracking={"experiment": "tiny-submit"})
    cfg["data"]["dir"] = "farm_data/tiny"
    cfg_path = tmp_path / "relative.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "farm.cli", "submit", "--config", str(cfg_path), "--address", url],
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=JOB_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    store = f"sqlite:///{tmp_path.resolve()}/farm_runs/mlflow.db"
    assert f": SUCCEEDED; its runs: MLflow store {store}" in run.stdout
    mlf = MlflowClient(store)
    exp = mlf.get_experiment_by_name("tiny-submit")
    parent = mlf.search_runs([exp.experiment_id], "tags.`farm.kind` = 'job'")[0]
    children = mlf.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((r.data.tags["farm.neuron_id"], r.info.status) for r in children) == [
        ("sim1:0", "FINISHED"), ("sim1:1", "FINISHED")]
    assert (tmp_path / "farm_data" / "tiny" / "population.json").is_file()  # cached stages stay here too
    listed = subprocess.run([sys.executable, "-m", "farm.cli", "jobs", "--address", url], env={**env, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=120)
    assert "SUCCEEDED" in listed.stdout and store in listed.stdout

    client = JobSubmissionClient(url)  # a plain submission of the same relative config
    job = client.submit_job(entrypoint=f"{sys.executable} jobs/compress.py --config {cfg_path}",
                            runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.FAILED, logs[-3000:]
    assert "this Ray Job runs in Ray's temporary copy of the working dir" in logs and "farm submit" in logs
    assert "out_dir='farm_runs/tiny'" in logs

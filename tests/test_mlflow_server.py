"""A tiny job tracked through a real `mlflow server` (HTTP, proxied artifacts), read back over REST.

The server runs the small-machine settings of ecosystem.md §5e/§7.7 (one worker, no job runner,
127.0.0.1). It is a plain Popen whose own PID gets the SIGTERM at the end (it takes its uvicorn
child down with it); the whole process group is SIGKILLed only if that fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HEALTH_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    art = tmp_path / "art"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(art)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            tail = log_path.read_text(errors="replace")[-2000:]
            assert proc.poll() is None, f"mlflow server exited ({proc.returncode}):\n{tail}"
            assert time.monotonic() < deadline, f"mlflow server not healthy in {HEALTH_TIMEOUT_S} s:\n{tail}"
            time.sleep(0.5)
        yield url, art
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def tiny_config(tmp_path: Path, uri: str) -> Path:
    cfg = {
        "name": "tiny-http", "out_dir": str(tmp_path / "out"), "neurons": "sim1:0-1",
        "data": {"kind": "simulated", "dir": str(tmp_path / "data"),
                 "simulate": {"n_neurons": 2, "n_sessions": 2, "n_images": 200, "image_size": 16,
                              "filters": [3, 4], "n_calibration": 64}},
        "teacher": {"kind": "ground_truth"},
        "bank": {"heldout": 200, "bank": {"n_images": 1000, "shard_size": 1000}},
        "compress": {"student_filters": [6] * 5,
                     "distill": {"passes": 1, "log_every_steps": 5, "bn_recalibrate_images": 256},
                     "retrain": {"passes": 1, "log_every_steps": 5, "bn_recalibrate_images": 256}},
        "farm": {"num_cpus": 1, "local_num_cpus": 2, "object_store_memory": 300_000_000},
        "tracking": {"experiment": "tiny-http", "uri": uri},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_job_tracked_through_mlflow_server_is_listed_by_its_rest_api(mlflow_server, local_ray, tmp_path):
    from farm.config import load_job_config
    from farm.pipeline import run_compress_job

    url, art = mlflow_server
    res = run_compress_job(load_job_config(tiny_config(tmp_path, url)), progress=False)
    assert res.failed == [] and len(res.rows) == 2

    exp = http_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny-http")["experiment"]
    found = http_json(f"{url}/api/2.0/mlflow/runs/search", {
        "experiment_ids": [exp["experiment_id"]],
        "filter": f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'", "max_results": 100})
    runs = found.get("runs", [])
    assert len(runs) == 2
    assert sorted(t["value"] for r in runs for t in r["data"]["tags"] if t["key"] == "farm.neuron_id") == \
           ["sim1:0", "sim1:1"]
    for r in runs:
        assert r["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
        assert metrics["param_count"] > 0 and metrics["trainable_params"] < metrics["param_count"]
        for key in ("r2_teacher_heldout", "r2_ground_truth"):
            assert 0.0 <= metrics[key] <= 1.0
        assert "r2_er" in metrics  # noise-corrected, so not bounded by [0, 1]
        listing = http_json(f"{url}/api/2.0/mlflow/artifacts/list?run_id={r['info']['run_id']}&path=model")
        assert {f["path"] for f in listing["files"]} >= {"model/spec.json", "model/state_dict.pt"}

    # The artifacts went through the server's proxy into --artifacts-destination.
    assert len(list(art.rglob("state_dict.pt"))) == 2
    parent = http_json(f"{url}/api/2.0/mlflow/runs/get?run_id={res.parent_run_id}")["run"]
    assert parent["info"]["status"] == "FINISHED"
    assert parent["info"]["artifact_uri"].startswith("mlflow-artifacts:")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000", "--virtual-time-budget=20000"]


def rendered(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran, in a real headless Chromium (fresh profile)."""
    base = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                          check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_url_farm_ui_prints_opens_the_experiment_on_its_runs(mlflow_server, local_ray, tmp_path, capsys):
    """Issue #13 item 7, in a real browser: MLflow 3.17's UI opens an experiment on a GenAI traces
    overview unless it is in "Model training" mode; the URL that `farm ui` prints opens the job's
    experiment on its runs, with the job's run listed."""
    from farm.cli import main
    from farm.config import load_job_config
    from farm.pipeline import run_compress_job

    url, _ = mlflow_server
    cfg_path = tiny_config(tmp_path, url)
    res = run_compress_job(load_job_config(cfg_path), progress=False)
    assert res.failed == []
    capsys.readouterr()
    assert main(["ui", "--config", str(cfg_path)]) == 0
    page = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("then open ")
    exp = http_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny-http")["experiment"]
    assert page == f"{url}/#/experiments/{exp['experiment_id']}/runs?workflowType=machine_learning"

    dom = rendered(page, tmp_path / "profile", screenshot=tmp_path / "runs.png")
    job_run = http_json(f"{url}/api/2.0/mlflow/runs/get?run_id={res.parent_run_id}")["run"]["info"]["run_name"]
    assert ">Runs<" in dom and job_run in dom and ">Overview<" not in dom
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    # the control: the experiment's plain address opens the GenAI overview (what a user saw before)
    plain = rendered(f"{url}/#/experiments/{exp['experiment_id']}", tmp_path / "profile2")
    assert ">Overview<" in plain and ">Runs<" not in plain

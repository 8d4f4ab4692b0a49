"""``farm submit`` / ``farm jobs``: a job config run as a Ray Job (the Jobs API of a Ray head), its
results where the user looks.

A Ray Job runs its entrypoint inside Ray's per-session copy of the uploaded working dir, which Ray
deletes with the session: relative paths (``out_dir``, the default sqlite store next to it, the
sessions) would land there and be lost. ``submit`` therefore resolves every path of the config to an
absolute one on the submitting side (valid on a single-machine head, or on a cluster whose nodes
share that filesystem) and passes the MLflow store explicitly; ``check_not_in_ray_job_copy`` makes a
plain ``ray job submit`` with relative paths refuse to start instead of losing its results.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from farm.config import JobConfig, REPO, load_job_config, resolve_config_path

#: What is never uploaded with the working dir (caches, stores, environments).
EXCLUDES = [".venv", ".git", "farm_runs", "farm_data", "*.db", "mlartifacts", "mlruns", "**/__pycache__",
            "*.egg-info", ".pytest_cache"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a submitted job's entrypoint


def _abs(p: str | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


def resolved_overrides(cfg: JobConfig) -> list[str]:
    """Overrides that pin every path of ``cfg`` (and its MLflow store) to absolute ones, as the
    submitting side sees them."""
    out = [f"out_dir={_abs(cfg.out_dir)}", f"data.dir={_abs(cfg.data.dir)}",
           f"tracking.uri={cfg.tracking_uri()}"]
    if cfg.data.source:
        out.append(f"data.source={_abs(cfg.data.source)}")
    if cfg.bank.dir:
        out.append(f"bank.dir={_abs(cfg.bank.dir)}")
    if cfg.teacher.path:
        out.append(f"teacher.path={_abs(cfg.teacher.path)}")
    shared = cfg.compress.shared
    if shared is not None and shared.path:
        out.append(f"compress.shared.path={_abs(shared.path)}")
    if shared is not None and shared.init_from:
        out.append(f"compress.shared.init_from={_abs(shared.init_from)}")
    return out


def _in_ray_job_copy() -> bool:
    """True inside a Ray Job whose working dir was uploaded (it runs in Ray's temporary copy of it)."""
    raw = os.environ.get(RAY_JOB_ENV)
    if not raw:
        return False
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        runtime_env = {}
    return bool(runtime_env.get("working_dir"))


def _lost_in_copy(path: str | Path) -> bool:
    """A path that is relative, or resolves inside the current directory (Ray's copy)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        return True
    return p.resolve().is_relative_to(Path.cwd().resolve())


def check_paths_not_in_ray_job_copy(paths: dict[str, str | None], uri: str | None, uri_default: str,
                                    uri_name: str = "tracking.uri") -> None:
    """Inside a Ray Job with an uploaded working dir, refuse result paths (``paths``: option name ->
    value) and an MLflow store (``uri``, or ``uri_default`` when unset) that would be written into
    Ray's temporary copy of the working dir and deleted with it. Outside such a job: nothing."""
    if not _in_ray_job_copy():
        return
    bad = [f"{name}={value!r}" for name, value in paths.items() if value and _lost_in_copy(value)]
    store = uri or uri_default
    if store.startswith("sqlite:///") and _lost_in_copy(store[len("sqlite:///"):]):  # sqlite:////abs or ///rel
        bad.append(f"{uri_name}={uri!r}" if uri else f"{uri_name} (unset: the default store {store})")
    if bad:
        raise ValueError(
            f"this Ray Job runs in Ray's temporary copy of the working dir ({os.getcwd()}), which Ray deletes "
            f"with the session: {', '.join(bad)} would be written there and lost. Give absolute paths outside it "
            f"(on a shared filesystem for a cluster) and an MLflow server (or an absolute sqlite:////... path) as "
            f"the store, or submit a job config with `farm submit --config FILE`, which resolves them on the "
            f"submitting side")


def check_not_in_ray_job_copy(cfg: JobConfig) -> None:
    """Inside a Ray Job with an uploaded working dir, refuse a job config whose ``out_dir`` or store
    would be written into Ray's temporary copy of the working dir (and deleted with it)."""
    check_paths_not_in_ray_job_copy({"out_dir": cfg.out_dir}, cfg.tracking.uri, cfg.tracking_uri())


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_API_SERVER_ADDRESS") or
                               os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


def submit(config: str, overrides: list[str], address: str | None = None, wait: bool = True,
           python: str | None = None, command: str = "compress", out=sys.stdout) -> tuple[str, str]:
    """Submit ``farm <command> --config config overrides`` as a Ray Job; with ``wait``, follow its
    logs to the end. Returns (submission id, final or current status)."""
    cfg = load_job_config(config, overrides)  # a bad config fails here, before anything is uploaded
    pinned = resolved_overrides(cfg)
    path = resolve_config_path(config).resolve()
    try:
        cfg_arg = str(path.relative_to(REPO))  # uploaded with the working dir
    except ValueError:
        cfg_arg = str(path)  # outside the repo: read there (single-machine head / shared FS)
    python = python or sys.executable
    args = [python, "-m", "farm.cli", command, "--config", cfg_arg, *overrides, *pinned]
    entrypoint = shlex.join(args)
    env_vars = {"MLFLOW_TRACKING_URI": cfg.tracking_uri(),
                "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}
    client = _client(address)
    sid = client.submit_job(entrypoint=entrypoint,
                            runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env_vars},
                            metadata={"farm": "1", "farm_job": cfg.resolved_job_id(), "config": cfg_arg,
                                      "tracking_uri": cfg.tracking_uri()})
    print(f"submitted {sid}: farm {command} --config {cfg_arg} (job {cfg.resolved_job_id()})", file=out, flush=True)
    status = str(client.get_job_status(sid))
    if wait:
        status = _follow(client, sid, out)
    print(f"{sid}: {status}; its runs: MLflow store {cfg.tracking_uri()} (open it with: farm ui --uri "
          f"{cfg.tracking_uri()})", file=out, flush=True)
    return sid, status


def _follow(client, sid: str, out) -> str:
    from ray.job_submission import JobStatus

    seen, t0 = 0, time.monotonic()
    while True:
        status = client.get_job_status(sid)
        logs = client.get_job_logs(sid)
        if len(logs) > seen:
            out.write(logs[seen:])
            out.flush()
            seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status)
        time.sleep(2 if time.monotonic() - t0 > 10 else 0.5)


def list_jobs(address: str | None = None, out=sys.stdout) -> list[dict]:
    """The farm jobs submitted to the head (newest first): submission id, status, farm job, store."""
    rows = []
    for j in _client(address).list_jobs():
        meta = j.metadata or {}
        if meta.get("farm") != "1":
            continue
        rows.append({"submission_id": j.submission_id, "status": str(j.status), "job": meta.get("farm_job"),
                     "config": meta.get("config"), "tracking_uri": meta.get("tracking_uri"),
                     "start_time": j.start_time})
    rows.sort(key=lambda r: r["start_time"] or 0, reverse=True)
    for r in rows:
        print(f"{r['submission_id']:<28} {r['status']:<10} {r['job'] or '':<28} {r['tracking_uri']}", file=out)
    return rows

"""MLflow at the edge: one experiment per project, a parent run per job, a child run per neuron.

Every process (driver, Ray worker, Tune trial) talks to MLflow through an explicit tracking URI
(never the per-working-directory default: ecosystem.md §7.1) with the client API, which keeps no
global state. Models are logged as ``spec.json`` + ``state_dict.pt`` artifacts, loadable with
``torch.load(weights_only=True)``; never as pickled MLflow models.

Idempotence: a job is identified by its ``job_id`` tag. Re-running a job finds its parent run,
skips neurons that already have a FINISHED child run and redoes FAILED or missing ones. Child runs
are created only once a neuron's computation is over, so a killed worker leaves at most a RUNNING
run behind, which the next run of the job marks KILLED.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

TAG_JOB = "farm.job_id"
TAG_KIND = "farm.kind"  # "job" | "neuron" | "sweep" | "trial" | "teacher" | "analysis"
TAG_NEURON = "farm.neuron_id"
TAG_ERROR = "farm.error"
TAG_PARENT = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def default_tracking_uri(base_dir: str | os.PathLike) -> str:
    """An absolute sqlite URI: ``sqlite:///<base_dir>/mlflow.db``. Which ``base_dir`` a command uses
    is ``farm.config.JobConfig.tracking_uri``'s call (one default for every command)."""
    return f"sqlite:///{Path(base_dir).resolve() / 'mlflow.db'}"


def ui_command(uri: str, port: int = 5000) -> str:
    """The command that opens the MLflow UI for ``uri`` on 127.0.0.1 (small-machine settings)."""
    if uri.startswith("http"):
        return f"open {uri} in a browser (through an SSH tunnel on clusters)"
    art = ""
    if uri.startswith("sqlite:///"):
        art = f" --artifacts-destination {Path(uri[len('sqlite:///'):]).parent / 'mlartifacts'}"
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host 127.0.0.1 --port {port} "
            f"--workers 1 --backend-store-uri {uri}{art}")


def ui_url(uri: str, experiment: str | None = None, port: int = 5000) -> str:
    """The page to open in the UI that ``ui_command`` serves: ``experiment``'s runs, when the store
    already holds it, else the experiment list. ``workflowType=machine_learning`` puts MLflow 3.17's
    UI in its "Model training" mode (runs, models), which it then keeps (localStorage
    ``mlflow.workflowType``): in its default GenAI mode an experiment opens on a traces overview,
    whatever the experiment's ``mlflow.experimentKind`` tag says (checked in headless Chromium,
    tests/test_mlflow_server.py). The experiment is looked up in a sqlite file that exists or at an
    http server (one request, 3 s at most); other stores, and a store not there yet, get the list."""
    base = uri.rstrip("/") if uri.startswith("http") else f"http://127.0.0.1:{port}"
    exp_id = None
    try:
        if experiment and uri.startswith("http"):  # one quick request (MLflow's client retries for minutes)
            import urllib.parse
            import urllib.request

            q = urllib.parse.urlencode({"experiment_name": experiment})
            with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?{q}", timeout=3) as r:
                exp_id = json.loads(r.read())["experiment"]["experiment_id"]
        elif experiment and uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).is_file():
            found = _client(uri).get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found is not None else None
    except Exception:  # unreachable, unreadable, no such experiment: the experiment list is the page
        exp_id = None
    page = f"experiments/{exp_id}/runs" if exp_id is not None else "experiments"
    return f"{base}/#/{page}?workflowType=machine_learning"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _flat(prefix: str, d: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(key + ".", v))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def check_server(uri: str, timeout: float = 5.0) -> None:
    """ValueError within ``timeout`` seconds when no MLflow server answers at ``uri`` (MLflow's own
    client would retry for minutes before a traceback)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read(64)
    except urllib.error.HTTPError:
        return  # something answers: a server behind a proxy may not serve /health; MLflow decides
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"tracking.uri {uri}: no MLflow server answers ({reason}); start one (`farm ui` "
                         f"prints the command) or use a local store (tracking.uri=null: sqlite next to "
                         f"out_dir)") from None


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def uri_from_node(uri: str, home_ip: str | None, node_ip: str | None) -> str:
    """The tracking URI a process on node ``node_ip`` uses to reach the store that ``uri`` names on
    node ``home_ip`` (the driver's). Unchanged on the driver's node (or when either address is
    unknown). On another node, an http(s) server on the driver's loopback (e.g. the head's
    ``tracking.uri=http://127.0.0.1:5000``) is reached at ``home_ip`` instead, port and path kept; a
    remote server's URI is unchanged. A file store (sqlite, a folder) lives on the driver's disk:
    ValueError, since logging to that path on another node would make a new store there and lose
    the run."""
    from urllib.parse import urlsplit, urlunsplit

    if not home_ip or not node_ip or home_ip == node_ip:
        return uri
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        if parts.hostname not in _LOOPBACK:
            return uri
        host = f"[{home_ip}]" if ":" in home_ip else home_ip
        netloc = host + (f":{parts.port}" if parts.port else "")
        if "@" in parts.netloc:
            netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
        return urlunsplit(parts._replace(netloc=netloc))
    raise ValueError(f"tracking store {uri} is on the driver's node ({home_ip}); a task on node {node_ip} "
                     f"cannot log to it: set tracking.uri to an MLflow server every node reaches (e.g. "
                     f"cluster.yaml's, http://127.0.0.1:5000 on the head)")


@dataclass
class Tracker:
    """A picklable handle (URI + experiment id) that any process can log through. ``home_ip`` is the
    driver's node address, set by the fan-out (``at_home``) so that a task on another node logs to
    the same store (``from_node``)."""

    uri: str
    experiment_id: str
    experiment_name: str
    home_ip: str | None = None

    def at_home(self, ip: str) -> "Tracker":
        """This tracker, with ``ip`` as the driver's node address."""
        return dataclasses.replace(self, home_ip=ip)

    def from_node(self, node_ip: str) -> "Tracker":
        """This tracker as a task on node ``node_ip`` reaches it (``uri_from_node``); ValueError at once
        when a server it must reach at another address does not answer there."""
        uri = uri_from_node(self.uri, self.home_ip, node_ip)
        if uri == self.uri:
            return self
        try:  # before the task's work, not after it: a run that cannot be logged is lost
            check_server(uri)
        except ValueError as e:
            raise ValueError(f"{e}. That is the driver's {self.uri} as a task on node {node_ip} reaches "
                             f"it: the server must listen on the driver node's network interface "
                             f"(cluster.yaml: mlflow server --host 0.0.0.0)") from None
        return dataclasses.replace(self, uri=uri)

    @classmethod
    def open(cls, uri: str, experiment: str = "farm") -> "Tracker":
        """Create the store and experiment from the driver (schema migration once, ecosystem §7.5)."""
        if not uri:
            raise ValueError("Tracker.open: no tracking URI (farm.config.JobConfig.tracking_uri gives the default)")
        if uri.startswith(("http://", "https://")):
            check_server(uri)
        if uri.startswith("sqlite:///"):  # two drivers on a fresh store: one migrates, the other waits
            from farm.files import exclusive

            db = Path(uri[len("sqlite:///"):])
            with exclusive(db.with_name(db.name + ".lock"), f"the store {db}", wait=True):
                return cls._open(uri, experiment)
        return cls._open(uri, experiment)

    @classmethod
    def _open(cls, uri: str, experiment: str) -> "Tracker":
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):
                # Resolved here, not in whichever worker first logs (ecosystem.md §7.3).
                artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
            try:
                exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # created concurrently by another driver
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        if (exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND):
            # MLflow 3's UI opens an untagged experiment on its GenAI "Overview" (traces); tagged as
            # model development it opens on the runs
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return cls(uri=uri, experiment_id=exp_id, experiment_name=experiment)

    @property
    def client(self):
        return _client(self.uri)

    # -- job (parent) runs ------------------------------------------------------------------------
    def start_job(self, job_id: str, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, kind: str = "job") -> str:
        """The parent run of ``job_id``: reused when the job ran before, else created. Returns its id."""
        client = self.client
        run_id = self.find_job(job_id, kind)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return run_id
        run = client.create_run(self.experiment_id, run_name=f"{kind}-{job_id}",
                                tags={TAG_JOB: job_id, TAG_KIND: kind, **(tags or {})})
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def find_job(self, job_id: str, kind: str = "job") -> str | None:
        """The parent run id of ``job_id`` (the first one started), or None."""
        found = self.client.search_runs([self.experiment_id],
                                        filter_string=f"tags.`{TAG_JOB}` = '{job_id}' and tags.`{TAG_KIND}` = '{kind}'",
                                        max_results=1, order_by=["attributes.start_time ASC"])
        return found[0].info.run_id if found else None

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flat("", params)
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v[:6000]) for k, v in flat.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i:i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items()
              if v is not None and math.isfinite(float(v))]
        if ms:
            self.client.log_batch(run_id, metrics=ms)

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None):
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_table(self, run_id: str, rows: list[dict], name: str) -> None:
        """A table artifact ``name`` (.json) the MLflow UI shows as a table: one dict per row."""
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self.client.log_table(run_id, {c: [r.get(c) for r in rows] for c in columns}, name)

    def log_figure(self, run_id: str, fig, name: str) -> None:
        """Save a matplotlib figure as a PNG artifact ``name`` (e.g. "figures/history.png")."""
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(name).name
            fig.savefig(path, dpi=110, bbox_inches="tight")
            parent = str(Path(name).parent) if str(Path(name).parent) != "." else None
            self.client.log_artifact(run_id, str(path), parent)

    # -- child runs -----------------------------------------------------------------------------
    def child_runs(self, parent_run_id: str, kind: str | None = None) -> list:
        filt = f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
        if kind:
            filt += f" and tags.`{TAG_KIND}` = '{kind}'"
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filt,
                                           max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def finished_neurons(self, parent_run_id: str, kind: str = "neuron",
                         neuron_id: str | None = None) -> dict[str, str]:
        """neuron id -> run id of its FINISHED child run. Stale RUNNING children are marked KILLED.

        ``neuron_id``: look at this neuron's runs only. A task checking for its own earlier attempt
        must pass it: other neurons' RUNNING runs may be in the middle of being logged.
        """
        done = {}
        for run in self.child_runs(parent_run_id, kind):
            nid = run.data.tags.get(TAG_NEURON)
            if neuron_id is not None and nid != neuron_id:
                continue
            if run.info.status == "FINISHED" and nid:
                done[nid] = run.info.run_id
            elif run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")
        return done

    def log_child(self, parent_run_id: str, neuron_id: str, params: Mapping[str, Any],
                  metrics: Mapping[str, float], artifacts: Iterable[tuple[str | os.PathLike, str]] = (),
                  figures: Iterable[tuple[Any, str]] = (), kind: str = "neuron",
                  run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        """One complete child run (params, metrics, artifact folders, figures), then FINISHED.

        ``artifacts``: (local_dir, artifact_path) pairs. Returns the run id. On any logging error
        the run is marked FAILED and the error re-raised.
        """
        parent = self.client.get_run(parent_run_id)
        job_id = parent.data.tags.get(TAG_JOB, "")
        run = self.client.create_run(
            self.experiment_id, run_name=run_name or f"{kind}-{neuron_id}",
            tags={TAG_PARENT: parent_run_id, TAG_KIND: kind, TAG_NEURON: neuron_id, TAG_JOB: job_id,
                  **(tags or {})})
        rid = run.info.run_id
        try:
            self.log_params(rid, params)
            self.log_metrics(rid, metrics)
            for local_dir, path in artifacts:
                self.log_artifacts(rid, local_dir, path)
            for fig, name in figures:
                self.log_figure(rid, fig, name)
        except BaseException:
            self.client.set_terminated(rid, status="FAILED")
            raise
        self.client.set_terminated(rid, status="FINISHED")
        return rid

    def log_failed_child(self, parent_run_id: str, neuron_id: str, error: str,
                         params: Mapping[str, Any] | None = None, kind: str = "neuron") -> str:
        """A FAILED child run carrying the error as a tag (the job goes on)."""
        parent = self.client.get_run(parent_run_id)
        run = self.client.create_run(
            self.experiment_id, run_name=f"{kind}-{neuron_id}",
            tags={TAG_PARENT: parent_run_id, TAG_KIND: kind, TAG_NEURON: neuron_id,
                  TAG_JOB: parent.data.tags.get(TAG_JOB, ""), TAG_ERROR: error[:4900]})
        if params:
            self.log_params(run.info.run_id, params)
        self.client.set_terminated(run.info.run_id, status="FAILED")
        return run.info.run_id

    def register_model(self, run_id: str, name: str, artifact_path: str = "model") -> str:
        """Register a logged spec + state_dict folder as a model version (optional)."""
        client = self.client
        try:
            client.create_registered_model(name)
        except Exception:  # already registered
            pass
        mv = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id)
        return mv.version

    def download(self, run_id: str, artifact_path: str, dst: str | os.PathLike) -> Path:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny folder
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))

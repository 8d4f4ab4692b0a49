"""MLflow tracking with a real sqlite store: parent/child runs, idempotence, failures, artifacts."""

import pytest
import torch

from farm.models.compact import CompactSpec, build_compact, load_compact, save_compact
from farm.tracking import TAG_ERROR, Tracker, default_tracking_uri, ui_command


def test_job_parent_is_reused_and_children_are_tracked(tmp_path):
    tr = Tracker.open(default_tracking_uri(tmp_path), "t")
    assert tr.uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    parent = tr.start_job("job-1", params={"a": 1, "nested": {"b": [1, 2]}})
    assert tr.start_job("job-1") == parent  # a re-run finds its parent run
    assert tr.start_job("job-2") != parent
    assert tr.client.get_run(parent).data.params == {"a": "1", "nested.b": "[1, 2]"}

    m = build_compact(CompactSpec(filters=(3,) * 5, image_size=16, neuron_ids=("s:0",)), seed=0)
    save_compact(m, tmp_path / "m")
    rid = tr.log_child(parent, "s:0", {"tau": 0.9}, {"param_count": m.param_count(), "bad": float("nan")},
                       artifacts=[(tmp_path / "m", "model")])
    tr.log_failed_child(parent, "s:1", "ValueError: boom")
    # A RUNNING child left by a killed worker is not finished, and gets marked KILLED.
    stale = tr.client.create_run(tr.experiment_id, tags={"mlflow.parentRunId": parent,
                                                         "farm.kind": "neuron", "farm.neuron_id": "s:2"})
    assert tr.finished_neurons(parent) == {"s:0": rid}
    assert tr.client.get_run(stale.info.run_id).info.status == "KILLED"

    runs = {r.data.tags["farm.neuron_id"]: r for r in tr.child_runs(parent)}
    assert runs["s:1"].info.status == "FAILED" and "boom" in runs["s:1"].data.tags[TAG_ERROR]
    assert runs["s:0"].data.metrics["param_count"] == m.param_count()
    assert "bad" not in runs["s:0"].data.metrics  # non-finite metrics are not logged

    local = tr.download(rid, "model", tmp_path / "dl")
    loaded = load_compact(local)  # spec.json + state_dict.pt, weights_only=True
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), m.eval()(x))


def test_ui_command_names_loopback_and_store(tmp_path):
    uri = default_tracking_uri(tmp_path)
    cmd = ui_command(uri)
    assert "--host 127.0.0.1" in cmd and uri in cmd and "mlartifacts" in cmd


def test_an_unreachable_tracking_server_is_a_clear_error_at_once(tmp_path, capsys):
    import time

    from farm.cli import main

    t0 = time.monotonic()
    rc = main(["compress", "--config", "demo", f"out_dir={tmp_path}/out", f"data.dir={tmp_path}/data",
               "tracking.uri=http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert rc == 2 and "tracking.uri http://127.0.0.1:9: no MLflow server answers" in err, err
    assert time.monotonic() - t0 < 60  # not MLflow's minutes of retries (the check itself waits <= 5 s)
    assert not (tmp_path / "data").exists()


def test_two_drivers_creating_one_fresh_store_at_once_both_succeed(tmp_path):
    """Both drivers used to race MLflow's schema migration ("table _alembic_tmp_tags already
    exists") and leave the store half-migrated; the store is now created under a lock."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"from farm.tracking import Tracker; t = Tracker.open({uri!r}, 'race'); print(t.experiment_id)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1  # one experiment, seen by both
    tr = Tracker.open(uri, "race")
    parent = tr.start_job("after-the-race")
    assert tr.client.get_run(parent).info.status == "RUNNING"


def test_a_task_on_another_node_reaches_the_drivers_loopback_server_at_the_drivers_address():
    from farm.tracking import uri_from_node

    # the head's server as the head's driver names it, seen from a GPU worker
    assert uri_from_node("http://127.0.0.1:5000", "10.0.1.5", "10.0.1.9") == "http://10.0.1.5:5000"
    assert uri_from_node("http://localhost:5000/prefix", "10.0.1.5", "10.0.1.9") == "http://10.0.1.5:5000/prefix"
    assert uri_from_node("https://user@[::1]:443", "fd00::5", "fd00::9") == "https://user@[fd00::5]:443"
    # on the driver's own node, or a server named by an address every node can use: unchanged
    assert uri_from_node("http://127.0.0.1:5000", "10.0.1.5", "10.0.1.5") == "http://127.0.0.1:5000"
    assert uri_from_node("http://mlflow.lab:5000", "10.0.1.5", "10.0.1.9") == "http://mlflow.lab:5000"
    assert uri_from_node("sqlite:////x/mlflow.db", None, "10.0.1.9") == "sqlite:////x/mlflow.db"


def test_a_file_store_on_the_drivers_disk_is_refused_on_another_node_instead_of_a_new_store_there(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker.open(uri, "t").at_home("10.0.1.5")
    assert tracker.from_node("10.0.1.5") == tracker
    with pytest.raises(ValueError, match=r"on the driver's node \(10.0.1.5\).*10.0.1.9.*tracking.uri"):
        tracker.from_node("10.0.1.9")


def test_a_task_on_another_node_fails_before_its_work_when_the_drivers_server_is_not_reachable():
    import http.server
    import socket
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        # the driver names the server "localhost"; from "another node" it is the driver's address
        tracker = Tracker(f"http://localhost:{port}", "1", "t").at_home("127.0.0.1")
        assert tracker.from_node("10.0.1.9").uri == f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    tracker = Tracker(f"http://localhost:{free}", "1", "t").at_home("127.0.0.1")
    with pytest.raises(ValueError, match=r"no MLflow server answers.*driver's http://localhost:\d+ as a task "
                                         r"on node 10.0.1.9.*--host 0.0.0.0"):
        tracker.from_node("10.0.1.9")

"""The embedded local Ray keeps foreign drivers out (issue #13, item 2).

Ray 2.60 cannot bind its GCS, raylet and worker ports to loopback, so farm's local Ray runs with
token auth and a random per-process token. A driver that can reach the ports but has no token or
a wrong one (or auth off) is refused by the cluster (each refusal takes Ray ~20 s of retries); the
same driver with the token connects (the control that shows the refusals are the auth's doing).
"""

from __future__ import annotations

import os
import subprocess
import sys

FOREIGN = ("import ray\n"
           "ray.init(address={addr!r}, log_to_driver=False)\n"
           "print('FOREIGN CONNECTED', ray.get(ray.remote(lambda: 41 + 1).remote()))\n")


def _foreign_driver(addr: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run([sys.executable, "-c", FOREIGN.format(addr=addr)], env={**base, **env},
                          capture_output=True, text=True, timeout=120)


def test_the_local_ray_refuses_a_driver_without_its_token(local_ray):
    from farm.fanout import local_auth_vars

    addr = local_ray.get_runtime_context().gcs_address
    token = local_auth_vars()["RAY_AUTH_TOKEN"]
    assert len(token) == 64
    # the token went to the Ray processes only: the driver's environment is as it was
    assert "RAY_AUTH_TOKEN" not in os.environ and os.environ["RAY_AUTH_MODE"] == "disabled"
    # a task runs as usual: farm's own workers have the token
    assert local_ray.get(local_ray.remote(lambda: 6 * 7).remote()) == 42

    for env in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        refused = _foreign_driver(addr, **env)
        assert refused.returncode != 0 and "FOREIGN CONNECTED" not in refused.stdout, refused.stdout
        assert "InvalidAuthToken" in refused.stderr, refused.stderr[-2000:]  # the cluster said no

    allowed = _foreign_driver(addr, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    assert allowed.returncode == 0 and "FOREIGN CONNECTED 42" in allowed.stdout, allowed.stderr[-2000:]


def test_a_token_of_the_users_own_is_kept_and_farms_is_made_once(monkeypatch, tmp_path):
    from farm.fanout import local_auth_vars

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    mine = local_auth_vars()  # token mode but no token anywhere: farm's own
    assert mine["RAY_AUTH_MODE"] == "token" and mine == local_auth_vars()  # one token per process
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert local_auth_vars() == mine  # auth off for clusters: the local Ray still gets a token

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 64)
    assert local_auth_vars() == {}  # the user's RAY_AUTH_TOKEN
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert local_auth_vars() == {}  # ... or RAY_AUTH_TOKEN_PATH
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("b" * 64)
    assert local_auth_vars() == {}  # ... or ~/.ray/auth_token

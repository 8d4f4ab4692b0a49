"""The embedded local Ray keeps foreign drivers out (issue #13, item 2).

Ray 2.60 cannot bind its GCS, raylet and worker ports to loopback, so farm's local Ray runs with
token auth and a random per-process token. A driver that can reach the ports but has no token (or
a wrong one, or auth off) is refused (each refusal takes Ray ~20 s of retries); the same driver with the token connects (the control that
shows the refusals are the auth's doing).
"""

from __future__ import annotations

import os
import subprocess
import sys

FOREIGN = ("import ray\n"
           "ray.init(address={addr!r}, log_to_driver=False)\n"
           "print('FOREIGN CONNECTED', ray.get(ray.remote(lambda: 41 + 1).remote()))\n")


def _foreign_driver(addr: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FOREIGN.format(addr=addr)], env=env, capture_output=True,
                          text=True, timeout=120)


def _env_without_auth(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, **extra}


def test_the_local_ray_refuses_a_driver_without_its_token(local_ray):
    addr = local_ray.get_runtime_context().gcs_address
    token = os.environ["RAY_AUTH_TOKEN"]
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(token) == 64
    # a task runs as usual: farm's own workers have the token
    assert local_ray.get(local_ray.remote(lambda: 6 * 7).remote()) == 42

    for env in (_env_without_auth(RAY_AUTH_MODE="disabled"),
                _env_without_auth(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
                _env_without_auth(RAY_AUTH_MODE="token", HOME=os.environ.get("RAY_TMPDIR", "/tmp"))):
        refused = _foreign_driver(addr, env)
        assert refused.returncode != 0 and "FOREIGN CONNECTED" not in refused.stdout, refused.stdout

    allowed = _foreign_driver(addr, _env_without_auth(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
    assert allowed.returncode == 0 and "FOREIGN CONNECTED 42" in allowed.stdout, allowed.stderr[-2000:]


def test_a_token_of_the_users_own_is_kept(monkeypatch):
    from farm.fanout import local_auth_env

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 64)
    local_auth_env()
    assert os.environ["RAY_AUTH_TOKEN"] == "a" * 64

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    local_auth_env()
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64

"""Shared fixtures. Real data lives in ../shared (read-only, never committed); FARM_SHARED overrides."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FARM_SHARED", REPO.parent / "shared")).resolve()
V4_DIR = SHARED / "data" / "v4"
PUBLISHED_DIR = SHARED / "models" / "published"


def pytest_configure(config):
    # One torch thread: test models are tiny (a second thread costs more than it gives, measured
    # 2.5 ms -> 56 ms per forward under load), and Ray workers in the same run need the other core.
    torch.set_num_threads(int(os.environ.get("FARM_TEST_THREADS", "1")))


def _shared(path: Path, what: str) -> Path:
    """The reference tests need ../shared (present in CI): missing, they FAIL, naming the path, unless
    FARM_SKIP_SHARED=1 says this machine has no copy."""
    if not path.is_dir():
        msg = f"{what} not found at {path} (set FARM_SHARED to the shared folder"
        if os.environ.get("FARM_SKIP_SHARED") == "1":
            pytest.skip(msg + ")")
        pytest.fail(msg + ", or FARM_SKIP_SHARED=1 to skip the tests that need it)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def v4_dir() -> Path:
    return _shared(V4_DIR, "real V4 data")


@pytest.fixture(scope="session")
def published_dir() -> Path:
    return _shared(PUBLISHED_DIR, "published models")


RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_tmp():
    """Ray's environment for the module: RAY_AUTH_MODE explicit (off for the clusters a test starts
    itself; farm's embedded local Ray turns token auth on anyway, farm.fanout.local_auth_vars), no
    telemetry, a private (short: unix sockets) temp dir, no inherited RAY_ADDRESS."""
    tmp = tempfile.mkdtemp(prefix="frt", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in RAY_ENV.items():
            mp.setenv(k, v)
        mp.setenv("RAY_TMPDIR", tmp)
        mp.delenv("RAY_ADDRESS", raising=False)
        yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_ray(ray_tmp):
    """A local Ray (2 CPUs) in this process for the module's tests (the one fixture for it)."""
    import ray

    from farm.fanout import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2, object_store_memory=300_000_000)
    yield ray
    ray.shutdown()

"""Shared fixtures. Real data lives in ../shared (read-only, never committed); FARM_SHARED overrides."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def v4_dir() -> Path:
    if not V4_DIR.is_dir():
        pytest.skip(f"real V4 data not found at {V4_DIR} (set FARM_SHARED)")
    return V4_DIR


@pytest.fixture(scope="session")
def published_dir() -> Path:
    if not PUBLISHED_DIR.is_dir():
        pytest.skip(f"published models not found at {PUBLISHED_DIR} (set FARM_SHARED)")
    return PUBLISHED_DIR

"""What a Ray task runs on: torch threads (Ray sets OMP_NUM_THREADS to the task's CPUs) and its device."""

from __future__ import annotations

import os


def task_threads() -> int:
    """Threads for torch in this task: Ray sets OMP_NUM_THREADS to the task's num_cpus."""
    return max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1"))))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


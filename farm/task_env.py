"""What a Ray task runs on: torch threads (Ray sets OMP_NUM_THREADS to the task's CPUs), its device, and
an allocator that keeps freed memory (``keep_freed_memory``) until a stage ends (``release_freed_memory``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_kept = False


def _glibc(name: str, argtypes: list):
    """glibc's function ``name`` (None off Linux or where the C library lacks it: musl and others)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory torch frees, for the next tensor, instead of giving it back to
    the OS. By default every tensor over the mmap threshold (at most 32 MiB; a wide batch's activations
    at 112 px are larger) is a fresh mmap, and each of its 4 KiB pages faults and is zeroed by the
    kernel when first written: a job's driver spent 698 s in the kernel against 246 s in torch on the
    teacher's responses (benchmarks/README.md "Where the CPU time goes": the teacher's forward
    38.4 -> 9.8 CPU-s, a K=25 training step at batch 64 12.0 -> 8.4). With mmap off and no trimming,
    freed blocks stay in the heap and are reused; the process keeps its peak memory until it exits.
    Process-wide and idempotent; a no-op (False) off glibc."""
    global _kept
    if _kept:
        return True
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:  # keep the default
        return False
    _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept


def release_freed_memory() -> bool:
    """Give the heap's free memory back to the OS (glibc ``malloc_trim(0)``), at the end of a stage
    whose peak the next stage does not reach: with ``keep_freed_memory`` a process otherwise holds its
    peak until it exits. On a 2-core VM running configs/v4_190923.yaml, the driver held 6.2 GB after
    preparing the job (the teacher's responses to 24,000 images) and a neuron task 9.8 GB after its
    specialization, and Ray's memory monitor killed a neuron task at 95% of 23.5 GB. What is in use is
    untouched; the next allocation grows the heap again (page faults once per stage, not per batch).
    True when memory was released; False off glibc or when there was none to release."""
    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    return trim is not None and bool(trim(0))


def task_threads() -> int:
    """Threads for torch in this task: Ray sets OMP_NUM_THREADS to the task's num_cpus."""
    return max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1"))))


def init_task() -> int:
    """What every torch-heavy task does first: ``keep_freed_memory`` and torch's thread pool sized to
    ``task_threads`` (Ray reuses workers, so it is set per task: ecosystem.md §5a). Returns the threads."""
    import torch

    keep_freed_memory()
    threads = task_threads()
    torch.set_num_threads(threads)
    return threads


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device

"""farm.task_env: what a task runs on (threads, allocator)."""

import json
import subprocess
import sys
import textwrap

import pytest

# a batch-sized tensor (64 MiB) made and freed repeatedly, as a training loop does; minor page faults
# counted over 20 repeats after 10 of warm-up (kept, the first few still grow the heap)
_PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from farm.task_env import init_task, keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    threads = init_task() if sys.argv[1] == "keep" else None
    def step():
        x = torch.empty(16 * 2**20)  # 64 MiB of float32
        x.fill_(1.0)
        return float(x[-1])
    for _ in range(10):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total = sum(step() for _ in range(20))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"kept": kept, "threads": threads, "faults": faults, "total": total,
                      "torch_threads": torch.get_num_threads()}))
""")


def _probe(mode: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env=env, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_the_page_faults_of_every_new_batch():
    default, kept = _probe("default"), _probe("keep")
    assert default["total"] == kept["total"] == 20.0  # the same computation either way
    # by default each 64 MiB tensor is a fresh mmap: ~16k faults (4 KiB pages) per allocation
    assert default["faults"] > 20 * 8_000, default
    # kept: the freed block is reused, no page is faulted again
    assert kept["kept"] is True
    assert kept["faults"] < default["faults"] / 50, (default, kept)


def test_init_task_sizes_torch_threads_from_ray_omp_num_threads():
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = _probe("keep", env)
    assert r["threads"] == 2 and r["torch_threads"] == 2


_RELEASE = textwrap.dedent("""
    import json, os, torch
    from farm.task_env import keep_freed_memory, release_freed_memory
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    keep_freed_memory()
    base = rss()
    x = torch.empty(64 * 2**20)  # 256 MiB of float32, written: a stage's peak
    x.fill_(1.0)
    peak = rss()
    del x
    kept = rss()
    released = release_freed_memory()
    after = rss()
    y = torch.ones(16 * 2**20)  # the heap serves the next stage as before
    print(json.dumps({"base": base, "peak": peak, "kept": kept, "after": after, "released": released,
                      "sum": float(y.sum())}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_release_freed_memory_gives_a_stage_peak_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, check=True, timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    assert r["peak"] - r["base"] > 200 * mib, r
    assert r["kept"] - r["base"] > 200 * mib, r  # keep_freed_memory: freed, still held
    assert r["released"] is True and r["kept"] - r["after"] > 200 * mib, r
    assert r["sum"] == 16 * 2**20

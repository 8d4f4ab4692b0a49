"""Where the CPU time goes: the kernel's share of a task's CPU time under glibc's default malloc and
with ``farm.task_env.keep_freed_memory`` (no mmap per tensor, no trimming).

Each case runs in a fresh process with 1 torch thread: a training step of a K=25 (64, 16) compact
model in factorized form on a batch of 64 images at 112 px (channels-last, as ``farm.specialize``
and the retrains run it), and a forward of the 200-filter shared compact teacher on 32 images (as
``farm.teacher_responses`` does). Reports user / system CPU-seconds and minor page faults.

    python benchmarks/allocator.py [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT.parent / "shared/models/published/shared_compact_models/from_ensemble_model/shared_compact_model_200filters.keras"

_CASE = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from farm.task_env import keep_freed_memory
kept = keep_freed_memory() if {keep} else False
torch.set_num_threads(1)
if {case!r} == "teacher":
    from farm.models.published import load_shared_compact
    m = load_shared_compact({teacher!r}).eval()
    x = torch.rand(32, 3, 112, 112)
    def step():
        with torch.no_grad():
            m(x)
else:
    from farm.models.compact import CompactSpec, build_compact
    m = build_compact(CompactSpec(filters=(25, 25, 25, 64, 16), readout="factorized", n_outputs=1), seed=0)
    m = m.train().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x = torch.rand(64, 3, 112, 112).contiguous(memory_format=torch.channels_last)
    def step():
        opt.zero_grad(); m(x).pow(2).mean().backward(); opt.step()
for _ in range(3):
    step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range({steps}):
    step()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(kept=kept, user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime,
                      faults=r1.ru_minflt - r0.ru_minflt, wall=time.perf_counter() - t0)))
"""


def run_case(case: str, keep: bool, steps: int) -> dict:
    code = _CASE.format(root=str(ROOT), keep=keep, case=case, teacher=str(TEACHER), steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    cases = [("train", "K=25 (64, 16) training step, batch 64")]
    if TEACHER.is_file():
        cases.append(("teacher", "200-filter teacher forward, batch 32"))
    print(f"| case ({args.steps} steps, 1 thread) | malloc | user CPU-s | system CPU-s | minor faults | wall s |")
    print("|---|---|---|---|---|---|")
    for case, name in cases:
        for keep in (False, True):
            r = run_case(case, keep, args.steps)
            print(f"| {name} | {'keep_freed_memory' if keep else 'glibc default'} | {r['user']:.2f} | "
                  f"{r['sys']:.2f} | {r['faults']:,} | {r['wall']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

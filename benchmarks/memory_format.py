"""One training step of a real-V4-sized compact model on CPU under each memory format / precision.

    python benchmarks/memory_format.py [--filters 35,35,35,42,14] [--threads 1] [--steps 8]

ms per image (batch 32, 112 px by default, Adam, MSE; factorized readout as the farm's per-neuron models) for
NCHW fp32 (what farm.distill ran on CPU before 2026-12-06; the tune step of farm.specialize already trained in channels_last), channels_last (NHWC), bf16 autocast, and both; with
the farm tasks' allocator setting (farm.task_env.keep_freed_memory), without which every format is
~2x slower. NCHW fp32 is run first and last to show the machine did not drift.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    import torch

    from farm.models.compact import CompactSpec, build_compact
    from farm.task_env import keep_freed_memory

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--filters", default="35,35,35,42,14")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=112, help="image side (the demo: 32)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    spec = CompactSpec(filters=tuple(int(k) for k in a.filters.split(",")), readout="factorized", n_outputs=1,
                       image_size=a.size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=gen) * 60
    y = torch.randn(a.batch, 1, generator=gen)

    def step_ms(nhwc: bool, bf16: bool) -> float:
        net = build_compact(spec, seed=0)
        xx = x
        if nhwc:
            net.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        for i in range(a.steps + 2):  # 2 warm-up steps
            if i == 2:
                t0 = time.perf_counter()
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = net(xx)
            ((out.float() - y) ** 2).mean().backward()
            opt.step()
        return (time.perf_counter() - t0) / a.steps / a.batch * 1000

    print(f"filters {spec.filters}, {spec.param_count():,} params, batch {a.batch}, {a.size} px, {a.threads} thread(s)")
    for name, nhwc, bf16 in [("NCHW fp32", False, False), ("channels_last fp32", True, False),
                             ("NCHW bf16 autocast", False, True), ("channels_last bf16 autocast", True, True),
                             ("NCHW fp32 (again)", False, False)]:
        print(f"{name}: {step_ms(nhwc, bf16):.2f} ms/image", flush=True)


if __name__ == "__main__":
    main()

"""Does torch.compile (inductor, CPU) make a compact model's training step cheaper?

    python benchmarks/compile_step.py [--filters 35,35,35,42,14] [--frozen 1] [--steps 40] [--mode default]

One training step of the real-V4 retrain (batch 32, 112 px, channels_last, factorized readout, Adam,
MSE, layers 0 .. frozen-1 without gradients, BatchNorm in training mode) eager and compiled, in CPU
seconds of this process per training image (``time.process_time`` with 1 torch thread, so the number
holds on a busy machine and under ``nice``), eager measured before and after the compiled model to
show drift; plus the compile's own cost (CPU seconds of this process and of its compile workers, and
wall seconds) and the largest difference between the eager and compiled outputs on the same batch.
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None):
    import torch

    from farm.models.compact import CompactSpec, build_compact
    from farm.task_env import keep_freed_memory

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--filters", default="35,35,35,42,14")
    p.add_argument("--frozen", type=int, default=1, help="layers 0 .. frozen-1 get no gradient")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()
    spec = CompactSpec(filters=tuple(int(k) for k in a.filters.split(",")), readout="factorized", n_outputs=1,
                       image_size=a.size)
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.rand(a.batch, 3, a.size, a.size, generator=gen) * 255 - 128).contiguous(
        memory_format=torch.channels_last) for _ in range(4)]
    ys = [torch.randn(a.batch, 1, generator=gen) for _ in range(4)]

    def make():
        net = build_compact(spec, seed=0).to(memory_format=torch.channels_last)
        for name, prm in net.named_parameters():
            if name.startswith("layer") and int(name[5]) < a.frozen:
                prm.requires_grad_(False)
        net.train()
        return net

    def run(net, fwd, steps):
        opt = torch.optim.Adam([q for q in net.parameters() if q.requires_grad], 1e-3)
        t0 = time.process_time()
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = ((fwd(xs[i % 4]) - ys[i % 4]) ** 2).mean()
            loss.backward()
            opt.step()
        return (time.process_time() - t0) / steps / a.batch * 1000

    print(f"filters {spec.filters}, {spec.param_count():,} params, batch {a.batch}, {a.size} px, "
          f"layers 0..{a.frozen - 1} frozen, 1 thread, torch {torch.__version__}", flush=True)
    eager = make()
    run(eager, eager, 3)
    print(f"eager: {run(eager, eager, a.steps):.2f} CPU-ms/image", flush=True)

    net = make()
    compiled = torch.compile(net, mode=a.mode, dynamic=False)
    c0, k0, w0 = time.process_time(), children_cpu(), time.perf_counter()
    run(net, compiled, 2)  # compiles forward and backward
    print(f"compile: {time.process_time() - c0:.1f} CPU-s here + {children_cpu() - k0:.1f} in workers, "
          f"{time.perf_counter() - w0:.1f} s wall (2 steps included)", flush=True)
    run(net, compiled, 3)
    print(f"compiled ({a.mode}): {run(net, compiled, a.steps):.2f} CPU-ms/image", flush=True)
    print(f"eager (again): {run(eager, eager, a.steps):.2f} CPU-ms/image", flush=True)

    check = make()
    check.load_state_dict(net.state_dict())
    with torch.no_grad():
        net.eval(), check.eval()
        diff = (compiled(xs[0]) - check(xs[0])).abs().max().item()
    print(f"max |compiled - eager| on one batch (eval mode, the same weights): {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()

"""Throughput of the distillation train step, in neuron-images per second.

Times ``farm.distill.distill`` itself (batch indexing, recentering, forward, MSE, backward, Adam; the
smoothing and BN recalibration are switched off: they run once per 1/24 of a run and once at its
end) on random uint8 images, after a short warm-up, for a few model sizes:

    paper   112 px, 100 filters per layer (method.md §4)
    real    112 px, 16 filters (the CPU-sized real-data test)
    demo    32 px, 12 filters (configs/demo.yaml)
    test    16 px, 12 filters (tests/test_compress.py)

Usage (repo root):
    python benchmarks/distill_throughput.py --threads 2
    python benchmarks/distill_throughput.py --threads 2 --pack 1 8 --readme benchmarks/README.md
    python benchmarks/distill_throughput.py --device cuda --scales paper   # bf16 + channels_last

Prints a markdown table with the machine, date and load; ``--readme`` also replaces (or appends)
the "## Distillation throughput" section of that file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.distill import DistillConfig, distill, distill_many  # noqa: E402
from farm.models.compact import CompactSpec, build_compact  # noqa: E402

SCALES = {  # name: (image size, filters per layer, timed steps on CPU)
    "paper": (112, 100, 4),
    "real": (112, 16, 20),
    "demo": (32, 12, 100),
    "test": (16, 12, 200),
}
SECTION = "## Distillation throughput"


def measure(size: int, filters: int, steps: int, batch_size: int, device: str, threads: int | None,
            pack: int = 1) -> dict:
    """Time ``steps`` train steps; pack > 1 trains that many neurons at once (``distill_many``)."""
    rng = np.random.default_rng(0)
    n = max(4 * batch_size, 256)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    targets = rng.standard_normal((n, pack)).astype(np.float32)
    cfg = dict(batch_size=batch_size, lr=1e-4, smooth_sigma=0.0, bn_recalibrate_images=0,
               log_every_steps=10 ** 9)
    students = [build_compact(CompactSpec(filters=(filters,) * 5, image_size=size), seed=j) for j in range(pack)]

    def train(n_images):
        c = DistillConfig(n_images=n_images, **cfg)
        if pack == 1:
            return distill(students[0], images, targets[:, 0], c, device=device, threads=threads)
        return distill_many(students, images, targets, c, device=device, threads=threads)

    train(2 * batch_size)  # warm-up: allocator, kernels, thread pool
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = train(steps * batch_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images": res.images_seen * pack, "seconds": seconds, "rate": res.images_seen * pack / seconds}


def machine(device: str, threads: int | None) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads, torch {torch.__version__}"


def table(rows: list[dict], device: str, threads: int | None, command: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"Machine: {machine(device, threads)}. Date: {datetime.date.today().isoformat()}. "
        f"Load average (1 min) at the end: {load:.1f}.",
        f"Command: `{command}`",
        "",
        "| scale | image px | filters/layer | neurons per network | batch | device | neuron-images timed | seconds "
        "| neuron-images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['scale']} | {r['size']} | {r['filters']} | {r['pack']} | {r['batch']} | {r['device']} | "
                     f"{r['images']} | {r['seconds']:.1f} | {r['rate']:.1f} |")
    return "\n".join(lines)


def write_section(readme: Path, body: str, note: str) -> None:
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{note}\n\n{body}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = readme.with_suffix(readme.suffix + ".tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(readme)


NOTE = ("Train step of `farm.distill.distill` (batch indexing, recentering, forward, MSE, backward, Adam; "
        "smoothing and BN recalibration off), random uint8 images, after a 2-step warm-up. One neuron per "
        "network unless packed (`distill_many`: several neurons as one network of grouped convs). Paper "
        "scale is 2 x 12 M images per neuron (method.md §4): a GPU job; CPU runs need small students. "
        "Produced by `benchmarks/distill_throughput.py`. The load average says how busy the machine was "
        "(2 torch threads on 2 busy cores lose to 1).")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps-factor", type=float, default=1.0, help="scale the timed steps (x20 on a GPU)")
    p.add_argument("--pack", type=int, nargs="+", default=[1],
                   help="neurons trained at once (distill_many); e.g. --pack 1 8")
    p.add_argument("--pack-scales", nargs="+", default=["demo", "test"], choices=list(SCALES),
                   help="the scales that also get the packed (pack > 1) measurements")
    p.add_argument("--readme", type=Path, default=None, help="write the table into this README's section")
    args = p.parse_args(argv)
    rows = []
    for name in args.scales:
        size, filters, steps = SCALES[name]
        for pack in args.pack:
            if pack > 1 and name not in args.pack_scales:
                continue
            n_steps = max(2, int(round(steps * args.steps_factor / pack)))
            r = measure(size, filters, n_steps, args.batch_size, args.device, args.threads, pack)
            rows.append({"scale": name, "size": size, "filters": filters, "pack": pack, "batch": args.batch_size,
                         "device": args.device, **r})
            print(f"{name} x{pack}: {r['rate']:.1f} neuron-images/s", file=sys.stderr, flush=True)
    command = "python benchmarks/distill_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = table(rows, args.device, args.threads, command.strip())
    print(body)
    if args.readme is not None:
        write_section(args.readme, body, NOTE)


if __name__ == "__main__":
    main()

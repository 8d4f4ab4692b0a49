"""Wall time of one compress job on local Ray with 1 worker vs 2 workers (farm.fanout.run_neurons).

The job: a simulated population (teacher = its true rates, so no teacher training), N neurons
(default 8), 24 px images, 8-filter students distilled for one pass over 2,000 bank images, pruned
and retrained. Data, bank and teacher responses are prepared once, outside the timings. For each
worker count a fresh local Ray (``num_cpus`` = workers, one CPU per neuron task) and a fresh MLflow
sqlite store are used, so every run compresses and logs every neuron from cold workers, as a job does.

    python benchmarks/farm_scaling.py [--neurons 8] [--workers 1 2] [--pack 1 4] [--out DIR]

Prints the machine, date, load average and command, then a markdown table: Ray start, compress
phase (tasks + MLflow logging), job total, speed-up of the compress phase over the first row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray settings of every farm entry point (explicit auth mode, no telemetry), before ray is imported.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def job_config(out: Path, n_neurons: int) -> dict:
    return {
        "name": "scaling", "out_dir": str(out / "prep"), "neurons": "sim1",
        "data": {"kind": "simulated", "dir": str(out / "data"),
                 "simulate": {"n_neurons": n_neurons, "n_sessions": 2, "n_images": 300, "image_size": 24,
                              "filters": [3, 6], "n_calibration": 64}},
        "teacher": {"kind": "ground_truth"},
        "bank": {"heldout": 300, "bank": {"n_images": 2300, "shard_size": 2300}},
        "compress": {"student_filters": [8] * 5,
                     "distill": {"passes": 1, "log_every_steps": 10, "bn_recalibrate_images": 512},
                     "retrain": {"passes": 1, "log_every_steps": 10, "bn_recalibrate_images": 512}},
        "tracking": {"experiment": "scaling"},
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_once(workers: int, prepared, cfg, store: Path, pack: int = 1) -> dict:
    import ray

    from farm.fanout import init_ray, run_neurons
    from farm.selection import parse_neuron_selection
    from farm.tracking import Tracker

    tracker = Tracker.open(f"sqlite:///{store}", "scaling")
    parent = tracker.start_job(f"scaling-{workers}w-pack{pack}")
    neurons = parse_neuron_selection(cfg.neurons, prepared.neuron_ids)
    t0 = time.perf_counter()
    init_ray(num_cpus=workers, object_store_memory=300_000_000)
    t1 = time.perf_counter()
    rows = run_neurons(neurons, prepared.inputs, cfg.compress, cfg.seed, tracker, parent, num_cpus=1,
                       progress=False, pack=pack)
    t2 = time.perf_counter()
    ray.shutdown()
    tracker.end_run(parent)
    failed = [r for r in rows if r["status"] != "FINISHED"]
    if failed:
        raise RuntimeError(f"{len(failed)} neurons did not finish: {failed[:2]}")
    task_s = [r["distill_seconds"] + r["prune_seconds"] + r["retrain_seconds"] for r in rows]
    return {"workers": workers, "pack": pack, "neurons": len(rows), "ray_start": t1 - t0, "compress": t2 - t1,
            "total": t2 - t0, "task_median": statistics.median(task_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pack", type=int, nargs="+", default=[1],
                    help="neurons per task (farm.pack: one packed distillation per task); e.g. --pack 1 4")
    ap.add_argument("--out", help="working folder (default: a temporary one, removed at the end)")
    args = ap.parse_args()

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="farm_scaling_"))
    ray_tmp = tempfile.mkdtemp(prefix="frs", dir="/tmp")  # private + short (unix socket paths)
    os.environ["RAY_TMPDIR"] = ray_tmp
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    import torch
    import yaml

    from farm.config import load_job_config
    from farm.pipeline import prepare_job

    cfg_path = out / "job.yaml"
    out.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(job_config(out, args.neurons), sort_keys=False))
    cfg = load_job_config(cfg_path)
    prepared = prepare_job(cfg)

    load_before = os.getloadavg()
    results = []
    try:
        for w in args.workers:
            for pk in args.pack:
                results.append(run_once(w, prepared, cfg, out / f"mlflow-{w}w-pack{pk}.db", pk))
                print(f"{w} worker(s), {pk} neuron(s) per task: compress {results[-1]['compress']:.1f} s",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    load_after = os.getloadavg()

    base = results[0]["compress"]
    print(f"- machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu_model()}), {platform.platform()}")
    print(f"- date: {dt.datetime.now().isoformat(timespec='minutes')}")
    print(f"- versions: python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")
    print(f"- load average (1/5/15 min) before: {'/'.join(f'{x:.1f}' for x in load_before)}, "
          f"after: {'/'.join(f'{x:.1f}' for x in load_after)}")
    print(f"- command: `python benchmarks/farm_scaling.py {' '.join(sys.argv[1:])}`")
    print(f"- job: {args.neurons} neurons, 24 px, 8-filter students, 1 distill + 1 retrain pass over "
          f"{len(prepared.inputs.bank_images)} images, one CPU per task\n")
    print("| workers | neurons per task | neurons | Ray start (s) | compress phase (s) | job total (s) "
          "| median compute per neuron (s) | speed-up (compress) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['pack']} | {r['neurons']} | {r['ray_start']:.1f} | {r['compress']:.1f} | "
              f"{r['total']:.1f} | {r['task_median']:.1f} | {base / r['compress']:.2f}x |")


if __name__ == "__main__":
    main()

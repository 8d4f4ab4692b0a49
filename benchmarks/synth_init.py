"""Synthesized maximizing images: the paper's grey init vs full-range noise, on a job's compact models.

For every FINISHED compact model of a compress job (default: the demo's, after `make demo`), the
model's responses to the whole image bank give its mean and best natural-image response; gradient
ascent (``farm.analysis.synth.synthesize``, the paper's recipe) then starts from each init and we
count the models whose best synthesized image stays BELOW their mean natural response ("stuck":
the ascent never got the model's units on) and those whose best synthesized image BEATS their best
bank image (what a maximizing image is for).

Usage (repo root, after `make demo`):
    python benchmarks/synth_init.py --config demo --steps 100 --restarts 9
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INITS = {"paper grey (128, 50)": (128.0, 50.0), "full-range noise (0, 255)": (0.0, 255.0)}


def run(config: str, overrides: list[str], steps: int, restarts: int, log=print) -> list[dict]:
    from farm.analysis.synth import SynthParams, synthesize
    from farm.analyze_job import job_models
    from farm.config import load_job_config
    from farm.data.images import ImageBank
    from farm.distill import predict
    from farm.models.compact import load_compact
    from farm.pipeline import _tracker

    cfg = load_job_config(config, overrides)
    bank_dir = Path(cfg.bank.dir) if cfg.bank.dir else Path(cfg.out_dir) / "bank"
    _, images, _ = ImageBank(bank_dir).load_all()
    with tempfile.TemporaryDirectory() as tmp:
        models = [(nid, load_compact(path)) for nid, _, path in
                  job_models(_tracker(cfg), cfg.resolved_job_id(), Path(tmp))]
    if not models:
        raise SystemExit(f"job {cfg.resolved_job_id()} has no finished compact models: run it first")
    rows = []
    for nid, model in models:
        natural = predict(model, images).astype(np.float64)
        row = {"neuron": nid, "params": model.param_count(), "natural_mean": float(natural.mean()),
               "natural_max": float(natural.max())}
        for name, (low, span) in INITS.items():
            res = synthesize(model, SynthParams(n_steps=steps, n_restarts=restarts, init_low=low,
                                                init_range=span, seed=0))
            row[name] = float(res.responses.max())
        rows.append(row)
        log(f"{nid}: natural mean {row['natural_mean']:.3f} max {row['natural_max']:.3f}, "
            + ", ".join(f"{name} {row[name]:.3f}" for name in INITS))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| init | models | best synthesized < mean natural (stuck) | best synthesized > best bank image | "
             "median (best synthesized / best bank image) |", "|---|---|---|---|---|"]
    for name in INITS:
        stuck = sum(r[name] < r["natural_mean"] for r in rows)
        beat = sum(r[name] > r["natural_max"] for r in rows)
        ratio = np.median([r[name] / r["natural_max"] for r in rows if r["natural_max"] > 0])
        lines.append(f"| {name} | {len(rows)} | {stuck} | {beat} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="the compress job's config (default: the demo's)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for farm compress")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args.config, args.overrides, args.steps, args.restarts,
               log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"{datetime.date.today().isoformat()}, {time.perf_counter() - t0:.0f} s, {args.threads} torch threads, "
          f"{args.steps} steps x {args.restarts} restarts")
    print(table(rows))


if __name__ == "__main__":
    main()

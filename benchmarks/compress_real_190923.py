"""Compress real V4 neurons of test session 190923 from the published shared compact teacher.

Teacher: ``shared_compact_models/from_ensemble_model/shared_compact_model_200filters.keras`` (the
best teacher we have: the paper's ensemble is not published), restricted to 190923's 33 outputs.
Bank: crops of TRAINING-session images only (190925, 190927, 190928, 190929, 210305, 210322,
210621; never 190923's), built with ``farm.data.images.build_bank``; a random part is held out for
pruning and the student-vs-teacher R². Evaluation: raw R² (squared Pearson r) and r against the
repeat-averaged responses of 190923's second half (images 601-1200, method.md §1.6; its raw repeats
are not public, so no r²_ER), next to the published per-neuron compact models of the same neurons.

Usage (repo root; the bank and the teacher's responses are cached under --work-dir):
    python benchmarks/compress_real_190923.py --n-bank 6000 --n-heldout 600 --filters 8 \\
        --distill-passes 4 --retrain-passes 1 --threads 1

tests/test_compress.py runs ``run`` at a smaller size (marked slow).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAINING_SESSIONS = ("190925", "190927", "190928", "190929", "210305", "210322", "210621")
NEURONS = ("190923:0", "190923:1", "190923:2")


def run(v4_dir, published_dir, work_dir, n_bank: int = 1500, n_heldout: int = 300, filters: int = 8,
        distill_passes: float = 10, retrain_passes: float = 2, lr: float = 1e-3, batch_size: int = 32,
        neurons=NEURONS, seed: int = 0, log=None, start: str = "distill") -> list[dict]:
    """One row per neuron: our compressed model's filters, params, raw R², r, R² to the teacher on
    the held-out bank images, and the published compact model's filters, params and raw R².

    start: "distill" (the paper: a fresh ``filters``-wide student distilled from the teacher) or
    "slice" (no distillation: the teacher's own output for the neuron, ``output_slice`` of the shared
    model, is pruned and retrained)."""
    if start not in ("distill", "slice"):
        raise ValueError(f"start must be 'distill' or 'slice', got {start!r}")
    from farm.compress import CompressConfig, RealData, compress_neuron
    from farm.data.images import BankConfig, build_bank
    from farm.data.v4release import load_v4_session
    from farm.distill import DistillConfig, predict
    from farm.teacher_responses import compute_teacher_responses, split_heldout
    from farm.metrics import r2_raw
    from farm.models.compact import output_slice
    from farm.models.published import (load_published_compact, load_shared_compact, shared_compact_path,
                                        shared_compact_teacher)

    log = log or (lambda msg: None)
    v4_dir, published_dir, work_dir = Path(v4_dir), Path(published_dir), Path(work_dir)
    t0 = time.perf_counter()
    sources = [load_v4_session(v4_dir, s, require_images=True).images for s in TRAINING_SESSIONS]
    bank = build_bank(sources, BankConfig(n_images=n_bank, image_size=112, proportions={"natural": 1.0}, seed=seed,
                                          shard_size=500), work_dir / f"bank-{n_bank}-seed{seed}")
    log(f"bank {bank.bank_id}: {len(bank)} images ({time.perf_counter() - t0:.0f} s)")
    shared_path = shared_compact_path(published_dir, "from_ensemble_model", 200)
    teacher = shared_compact_teacher(shared_path, sessions="190923")
    shared = load_shared_compact(shared_path) if start == "slice" else None
    responses = compute_teacher_responses(
        teacher, bank, cache_dir=work_dir / "responses",
        progress=lambda done, total: log(f"teacher: {done}/{total} images ({time.perf_counter() - t0:.0f} s)"))
    ids, images, _ = bank.load_all()
    if not np.array_equal(ids, responses.image_ids):
        raise RuntimeError("bank and teacher responses disagree on the image ids")
    train, held = split_heldout(len(images), n_heldout, seed=seed)

    session = load_v4_session(v4_dir, "190923", require_images=True)
    second = session.halves()[1]
    averaged = second.mean_responses()  # (neurons, 600)
    cfg = CompressConfig(
        student_filters=(filters,) * 5, seed=seed,
        distill=DistillConfig(passes=distill_passes, batch_size=batch_size, lr=lr, eval_every_images=10 ** 12),
        retrain=DistillConfig(passes=retrain_passes, batch_size=batch_size, lr=lr, eval_every_images=10 ** 12))
    rows = []
    for nid in neurons:
        i = int(nid.split(":")[1])
        col = responses.neuron_ids.index(nid)
        t = time.perf_counter()
        result = compress_neuron(nid, images[train], responses.responses[train, col], images[held],
                                 responses.responses[held, col], cfg,
                                 real=RealData(second.images, averaged[i], has_repeats=False),
                                 distilled=None if shared is None else output_slice(shared, nid),
                                 progress=_progress_log(nid, log, t))
        published = load_published_compact(
            published_dir / "compact_models" / "models_torch" / f"compact_model_190923_neuron{i}.pt")
        pred = predict(published, second.images)
        rows.append({"neuron": nid, "start": start, "filters": list(result.filters), "total_filters": result.total_filters,
                     "params": result.param_count, "r2_raw": result.r2_raw, "r": result.r_real,
                     "r2_teacher_heldout": result.r2_teacher_heldout,
                     "r2_teacher_distilled": result.r2_teacher_distilled,
                     "published_filters": list(published.spec.filters),
                     "published_total_filters": published.filter_count(),
                     "published_params": published.param_count(),
                     "published_r2_raw": float(r2_raw(averaged[i], pred)[0]),
                     "seconds": time.perf_counter() - t})
        log(json.dumps(rows[-1]))
    return rows


def _progress_log(nid: str, log, t0: float):
    """compress_neuron's progress as log lines: every pruned layer and every training log point."""
    def progress(stage: str, info: dict) -> None:
        if stage == "prune" and info.get("stage") == "layer":
            log(f"{nid} pruned layer {info.get('layer')}: {info.get('filters_before')} -> "
                f"{info.get('filters_after')} filters, "
                f"R² to teacher {info.get('r2_teacher')} ({time.perf_counter() - t0:.0f} s)")
        elif stage in ("distill", "retrain"):
            log(f"{nid} {stage} step {info.get('step')}: loss {info.get('loss')} ({time.perf_counter() - t0:.0f} s)")
    return progress


def table(rows: list[dict]) -> str:
    lines = ["| neuron | ours: K0..K4 | ours: filters | ours: params | ours: raw R² | ours: r | "
             "ours: R² to teacher (held-out bank) | published: K0..K4 | published: filters | "
             "published: params | published: raw R² |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['neuron']} | {tuple(r['filters'])} | {r['total_filters']} | {r['params']:,} | "
                     f"{r['r2_raw']:.3f} | {r['r']:.3f} | {r['r2_teacher_heldout']:.3f} | "
                     f"{tuple(r['published_filters'])} | {r['published_total_filters']} | "
                     f"{r['published_params']:,} | {r['published_r2_raw']:.3f} |")
    med = lambda k: float(np.median([r[k] for r in rows]))  # noqa: E731
    lines.append(f"| **median** | | {med('total_filters'):.0f} | {med('params'):,.0f} | {med('r2_raw'):.3f} | "
                 f"{med('r'):.3f} | {med('r2_teacher_heldout'):.3f} | | {med('published_total_filters'):.0f} | "
                 f"{med('published_params'):,.0f} | {med('published_r2_raw'):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    repo = Path(__file__).resolve().parents[1]
    shared = Path(os.environ.get("FARM_SHARED", repo.parent / "shared"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--v4-dir", type=Path, default=shared / "data" / "v4")
    p.add_argument("--published-dir", type=Path, default=shared / "models" / "published")
    p.add_argument("--work-dir", type=Path, default=Path("farm_runs") / "real_190923")
    p.add_argument("--n-bank", type=int, default=6000)
    p.add_argument("--n-heldout", type=int, default=600)
    p.add_argument("--filters", type=int, default=8)
    p.add_argument("--distill-passes", type=float, default=4)
    p.add_argument("--retrain-passes", type=float, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--start", choices=("distill", "slice"), default="distill",
                   help="distill a fresh student (the paper) or prune the shared teacher's own slice")
    p.add_argument("--neurons", nargs="+", default=list(NEURONS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args.v4_dir, args.published_dir, args.work_dir, args.n_bank, args.n_heldout, args.filters,
               args.distill_passes, args.retrain_passes, args.lr, neurons=args.neurons, start=args.start,
               log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"{datetime.date.today().isoformat()}, {time.perf_counter() - t0:.0f} s, "
          f"{torch.get_num_threads()} torch threads")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

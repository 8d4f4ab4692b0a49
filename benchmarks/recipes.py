"""Compression recipes side by side at equal compute, on a job's own data, bank and teacher.

For each recipe and each selected neuron: R² to the teacher on the held-out bank images (distilled /
pruned / final), the score on the recorded data (r2_ER with raw repeats, else raw R²) next to the
teacher's own, parameters, filters per layer, and CPU-seconds per neuron (process CPU time; a
shared stage-1 distillation is charged to the neurons it serves, divided evenly).

    python benchmarks/recipes.py --config demo --neurons sim7:0-7 --recipes paper fast shared
    python benchmarks/recipes.py --config v4_190923 --neurons 190923:0-7 --recipes paper shared

Recipes are ``farm.recipes`` presets applied to the job's ``compress`` section (the recipe's keys win
over the job config's, except the overrides given with ``--set``); the recipe ``config`` is the job's
own section as the farm job runs it (its ``recipe`` preset filled in under it), with ``--set`` over it:

    python benchmarks/recipes.py --config v4_190923 --neurons 190923:0-3 --recipes config \
        --set shared.path=<published>/shared_compact_model_35filters.keras \
        specialize.late_filters=[48,16] --label "K35 start"

Results are appended as JSON lines to ``--out`` (one line per neuron and recipe) and printed as a
markdown table. A rerun skips the neurons whose row (same label or recipe and ``--set``, same
``--override``) is already in ``--out``, so a comparison can run in pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _row(recipe: str, nid: str, res, cpu_s: float, teacher_r2: float | None, real_key: str) -> dict:
    return {"recipe": recipe, "neuron": nid, "r2_distilled": res.r2_teacher_distilled,
            "r2_pruned": res.r2_teacher_pruned, "r2_final": res.r2_teacher_heldout,
            "real": getattr(res, real_key), "teacher_real": teacher_r2, "params": res.param_count,
            "filters": list(res.filters), "cpu_s": cpu_s}


def run(args) -> list[dict]:
    import torch

    from farm.compress import CompressConfig, RealData, compress_neuron
    from farm.config import apply_overrides, load_job_config, read_yaml
    from farm.selection import parse_neuron_selection
    from farm.specialize import neuron_start
    from farm.task_env import release_freed_memory
    from farm.pipeline import prepare_job
    from farm.recipes import compress_section, resolve_recipe
    from farm.shared_start import SharedStartConfig, distill_shared

    torch.set_num_threads(args.threads)
    cfg = load_job_config(args.config, args.override)
    # the job's compress section as written (a recipe is put over what the job says, not over the
    # job's resolved recipe)
    job_section = apply_overrides(read_yaml(args.config), args.override).get("compress", {})
    prepared = prepare_job(cfg)
    inp = prepared.inputs
    neurons = parse_neuron_selection(args.neurons, inp.neuron_ids)
    rows = []
    done = _done(args.out) if args.out else set()
    for recipe in args.recipes:
        key = (_name({"recipe": recipe, "sets": args.set, "label": args.label}), tuple(args.override))
        todo = [n for n in neurons if (*key, n) not in done]
        if len(todo) < len(neurons):
            print(f"[{key[0]}] already in {args.out}: {[n for n in neurons if n not in todo]}", flush=True)
        if not todo:
            continue
        section = (apply_overrides(resolve_recipe(job_section), args.set) if recipe == "config"
                   else compress_section(job_section, recipe, args.set))
        shared = section.get("shared")
        ccfg = CompressConfig.for_seed(section, cfg.seed)  # as the farm task builds it
        starts, shared_cpu = {}, 0.0
        if shared is not None and shared.get("path"):
            from farm.shared_start import load_shared_start

            model = load_shared_start(shared["path"], neurons)
            starts = {n: model for n in todo}
        elif shared is not None:
            scfg = SharedStartConfig.from_dict(shared)
            # the shared student serves every neuron of the teacher (its cost is split over them all)
            ids = list(inp.neuron_ids) if args.shared_all else todo
            cols = [inp.neuron_ids.index(n) for n in ids]
            t = time.process_time()
            res = distill_shared(ids, inp.bank_images, inp.bank_targets[:, cols], scfg, seed=cfg.seed,
                                 eval_images=inp.heldout_images, eval_targets=inp.heldout_targets[:, cols])
            shared_cpu = (time.process_time() - t) / len(ids)
            print(f"[{recipe}] shared student {scfg.filters}: {res.cpu_seconds:.0f} CPU-s, "
                  f"{shared_cpu:.0f} per neuron; eval R2 median "
                  f"{np.median(res.history[-1]['eval_r2']):.3f}", flush=True)
            starts = {n: res.model for n in todo}
        for nid in todo:
            col = inp.neuron_ids.index(nid)
            sess = nid.split(":", 1)[0]
            real = None
            if sess in inp.real:
                r = inp.real[sess]
                i = r["neuron_ids"].index(nid)
                real = RealData(r["images"], r["responses"][i] if r["has_repeats"] else
                                np.nanmean(r["responses"][i], axis=-1), r["has_repeats"])
            t = time.process_time()
            start = (neuron_start(starts[nid], nid, inp.bank_images, ccfg.specialize,
                                  targets=inp.bank_targets[:, col]) if nid in starts else None)
            release_freed_memory()  # as farm's neuron tasks do after the specialization
            res = compress_neuron(nid, inp.bank_images, inp.bank_targets[:, col], inp.heldout_images,
                                  inp.heldout_targets[:, col], ccfg, real=real, distilled=start)
            cpu = time.process_time() - t + shared_cpu
            key = "r2_er" if (real is not None and real.has_repeats) else "r2_raw"
            row = _row(recipe, nid, res, cpu, prepared.teacher_real_r2.get(nid), key)
            row.update(config=args.config, threads=args.threads, date=time.strftime("%Y-%m-%dT%H:%M"),
                       machine=f"{platform.node()} {os.cpu_count()} cpus", sets=args.set, overrides=args.override,
                       label=args.label)
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if k not in ("config", "machine", "date", "sets", "overrides")}), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


def _name(row: dict) -> str:
    """A row's recipe as the table names it: its label, else the recipe and its ``--set``."""
    return row.get("label") or " ".join([row["recipe"], *row.get("sets", [])])


def _done(out: str) -> set:
    """(name, overrides, neuron) of the rows already in ``out`` (a rerun skips them)."""
    if not os.path.isfile(out):
        return set()
    rows = [json.loads(line) for line in open(out) if line.strip()]
    return {(_name(r), tuple(r.get("overrides") or ()), r["neuron"]) for r in rows}


def table(rows: list[dict]) -> str:
    """Median per recipe, as markdown."""
    out = ["| recipe | neurons | R² to teacher: distilled / pruned / final | real | teacher real | Δ real "
           "| params | filters K0..K4 (median) | CPU-s per neuron |", "|---|---|---|---|---|---|---|---|---|"]
    name = _name
    for recipe in dict.fromkeys(name(r) for r in rows):
        rs = [r for r in rows if name(r) == recipe]
        med = lambda k: float(np.median([r[k] for r in rs if r[k] is not None]))  # noqa: E731
        delta = [r["real"] - r["teacher_real"] for r in rs if r["real"] is not None and r["teacher_real"] is not None]
        k = np.median(np.array([r["filters"] for r in rs]), axis=0)
        out.append(f"| {recipe} | {len(rs)} | {med('r2_distilled'):.3f} / {med('r2_pruned'):.3f} / "
                   f"{med('r2_final'):.3f} | {med('real'):.3f} | {med('teacher_real'):.3f} | "
                   f"{np.median(delta):+.3f} | {med('params'):,.0f} | {tuple(int(x) for x in k)} | "
                   f"{med('cpu_s'):.0f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="demo")
    p.add_argument("--neurons", default="sim7:0-3")
    p.add_argument("--recipes", nargs="+", default=["paper", "fast", "shared"],
                   help="farm.recipes presets put over the job's compress section, or 'config': the "
                        "job's own section as its farm job runs it")
    p.add_argument("--set", nargs="*", default=[], help="dotted overrides of the compress section, after the recipe")
    p.add_argument("--override", nargs="*", default=[], help="job-config overrides (out_dir=..., bank...)")
    p.add_argument("--shared-all", action="store_true",
                   help="train the shared student on every neuron of the teacher (cost split over all)")
    p.add_argument("--label", default=None, help="the row's name in the table (default: recipe + --set)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None, help="only print the table of an --out file")
    args = p.parse_args(argv)
    from farm.task_env import keep_freed_memory

    keep_freed_memory()  # as farm's tasks run
    if args.table:
        rows = [json.loads(line) for line in open(args.table)]
    else:
        rows = run(args)
    print(table(rows))


if __name__ == "__main__":
    main()

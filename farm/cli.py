"""The ``farm`` command.

    farm demo                                   the embedded default, end to end (local Ray + MLflow)
    farm compress --config configs/demo.yaml [key=value ...]
    farm sweep    --config configs/demo.yaml [key=value ...]
    farm data import-v4 SRC --out DIR
    farm data simulate --neurons 20 --sessions 3 --images 1000 --size 64 --out DIR
    farm teacher train|import|evaluate|predict ...
    farm analyze MODEL_DIR --out DIR            every analysis of one compact model
    farm analyze --config configs/demo.yaml     ... of every compact model of a job (Ray tasks)
    farm submit --config FILE [key=value ...]   a job config as a Ray Job on a head (--sweep: a sweep)
    farm jobs                                   the farm jobs of a head, their status and store
    farm ui                                     print the command that opens the MLflow UI
"""

from __future__ import annotations

import argparse
import logging
import sys


# -- data -------------------------------------------------------------------------------------------
def cmd_data_import_v4(args) -> int:
    from farm.data.v4release import import_v4_release
    from farm.pipeline import progress_bar

    paths = import_v4_release(args.src, args.out, sessions=args.sessions or None,
                              progress=progress_bar("sessions"))
    for p in paths:
        print(p)
    return 0


def cmd_data_simulate(args) -> int:
    from farm.data.simulate import SimulationConfig, simulate_population, write_population

    cfg = SimulationConfig(n_neurons=args.neurons, n_sessions=args.sessions, n_images=args.images,
                           image_size=args.size, seed=args.seed)
    pop = simulate_population(cfg)
    out = write_population(pop, args.out)
    print(f"simulated {args.sessions} sessions x {args.neurons} neurons x {args.images} images "
          f"({args.size} px) -> {out}")
    _print_population_report(pop)
    return 0


def _print_population_report(pop) -> None:
    import numpy as np

    from farm.metrics import r2_er

    print(f"{'session':>8} {'role':>10} {'neurons':>7} {'images':>6} {'repeats':>7} "
          f"{'mean rate':>9} {'median r2_er(truth)':>19}")
    truth = pop.ground_truth if hasattr(pop, "ground_truth") else None
    for s in pop.sessions:
        r2 = float("nan")
        if truth is not None and hasattr(truth, "predict"):
            rates = truth.predict(s.images)
            cols = [list(truth.neuron_ids).index(n) for n in s.neuron_ids]
            r2 = float(np.nanmedian(r2_er(s.responses, rates[:, cols].T)))
        print(f"{s.session_id:>8} {s.role:>10} {s.n_neurons:>7} {s.n_images:>6} "
              f"{np.median(s.repeat_counts()):>7.0f} {np.nanmean(s.responses):>9.2f} {r2:>19.3f}")


# -- jobs -------------------------------------------------------------------------------------------
def cmd_compress(args) -> int:
    from farm.config import load_job_config
    from farm.pipeline import run_compress_job

    cfg = load_job_config(args.config, args.overrides)
    res = run_compress_job(cfg)
    if res.failed:
        print(f"farm: {len(res.failed)} neuron(s) FAILED (errors in their MLflow runs' farm.error tag): "
              + ", ".join(r["neuron_id"] for r in res.failed), file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args) -> int:
    from farm.config import load_job_config
    from farm.pipeline import run_sweep_job

    cfg = load_job_config(args.config, args.overrides)
    run_sweep_job(cfg)
    return 0


def cmd_submit(args) -> int:
    from farm.submit import submit

    _, status = submit(args.config, args.overrides, address=args.address, wait=not args.no_wait,
                       python=args.python, command="sweep" if args.sweep else "compress")
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def cmd_jobs(args) -> int:
    from farm.submit import list_jobs

    list_jobs(args.address)
    return 0


def cmd_demo(args) -> int:
    from farm.pipeline import run_demo

    run_demo(out_dir=args.out, overrides=args.overrides)
    return 0


def cmd_ui(args) -> int:
    from farm.config import load_job_config
    from farm.tracking import ui_command, ui_url

    # no --config: the demo's job (its store is the default one, farm_runs/mlflow.db under the cwd)
    cfg = load_job_config(args.config or "demo", args.overrides)
    uri = args.uri or cfg.tracking_uri()
    print(ui_command(uri, args.port))
    print(f"then open {ui_url(uri, cfg.tracking.experiment, args.port)}")
    return 0


# -- teacher ----------------------------------------------------------------------------------------
def cmd_teacher(args) -> int:
    from farm.teacher_cli import teacher_command

    return teacher_command(args)


# -- analysis ---------------------------------------------------------------------------------------
def cmd_analyze(args) -> int:
    if args.config:  # a whole compress job: every positional argument is a config override
        from farm.analyze_job import run_analyze_job
        from farm.config import load_job_config

        res = run_analyze_job(load_job_config(args.config, args.targets), force=args.force)
        if res.failed:
            print(f"farm: the analysis of {len(res.failed)} model(s) FAILED (errors in their MLflow runs' "
                  "farm.analysis_error tag): " + ", ".join(r["neuron_id"] for r in res.failed), file=sys.stderr)
            return 1
        return 0
    if len(args.targets) != 1 or not args.out:
        raise ValueError("analyze: give one MODEL and --out DIR, or --config JOB_CONFIG [overrides]")
    args.model = args.targets[0]
    from farm.analyze_job import analyze_command

    return analyze_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="simulated population -> teacher -> compress -> sweep, on local Ray")
    d.add_argument("--out", default="farm_runs/demo", help="output folder (default farm_runs/demo)")
    d.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    d.set_defaults(func=cmd_demo)

    for name, func, helptext in (("compress", cmd_compress, "compress neurons of a teacher (Ray job)"),
                                 ("sweep", cmd_sweep, "Ray Tune sweep of pruning thresholds")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--config", required=True, help="YAML job config (path or name in configs/)")
        c.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
        c.set_defaults(func=func)

    data = sub.add_parser("data", help="import or simulate sessions").add_subparsers(dest="data_cmd", required=True)
    imp = data.add_parser("import-v4", help="import the published V4 release into Parquet sessions")
    imp.add_argument("src", help="release folder (responses_raw/, responses_repeat_averaged/, images/)")
    imp.add_argument("--out", required=True)
    imp.add_argument("--sessions", nargs="*", help="session ids (default: all found)")
    imp.set_defaults(func=cmd_data_import_v4)
    sim = data.add_parser("simulate", help="simulate a V4 population (the embedded default data)")
    sim.add_argument("--neurons", type=int, default=20, help="neurons per session")
    sim.add_argument("--sessions", type=int, default=3)
    sim.add_argument("--images", type=int, default=1000, help="images per session")
    sim.add_argument("--size", type=int, default=64, help="image size in pixels")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", required=True)
    sim.set_defaults(func=cmd_data_simulate)

    t = sub.add_parser("teacher", help="train, import, evaluate or run a teacher")
    tsub = t.add_subparsers(dest="teacher_cmd", required=True)
    tt = tsub.add_parser("train", help="train the deep ensemble (e.g. --config configs/teacher_v4_real.yaml)")
    tt.add_argument("--config", required=True)
    tt.add_argument("--data", help="sessions folder or V4 release folder (default: from the config)")
    tt.add_argument("--out", required=True, help="where the trained teacher is saved")
    tt.add_argument("--tracking-uri", help="MLflow store (default: farm_runs/mlflow.db, the jobs' default store)")
    tt.add_argument("--experiment", default="farm-teacher")
    ti = tsub.add_parser("import", help="make a published model a farm teacher folder")
    ti.add_argument("kind", choices=["shared_compact", "published_compact"])
    ti.add_argument("path", help=".keras file (shared) or the published models folder")
    ti.add_argument("--session", default=None, help="restrict to one session's neurons")
    ti.add_argument("--out", required=True)
    te = tsub.add_parser("evaluate", help="median R² of a teacher on a session's second half")
    te.add_argument("teacher", help="teacher folder")
    te.add_argument("session", help="Parquet session file")
    tp = tsub.add_parser("predict", help="responses of a teacher to images (npy uint8 N,H,W,3)")
    tp.add_argument("teacher")
    tp.add_argument("images")
    tp.add_argument("--out", required=True, help="output .npy (images x neurons)")
    t.set_defaults(func=cmd_teacher)

    a = sub.add_parser(
        "analyze", help="analyses of a compact model, or of every model of a compress job (--config)",
        description="farm analyze MODEL --out DIR: every analysis of one compact model.\n"
                    "farm analyze --config JOB_CONFIG [key=value ...]: every model of that compress job, as Ray "
                    "tasks, logged to the neurons' MLflow runs, plus population analyses on the job's run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("targets", nargs="*", metavar="MODEL | OVERRIDE",
                   help="a compact model folder (spec.json + state_dict.pt) or published .pt; with --config: "
                        "config overrides key.sub=value")
    a.add_argument("--config", help="a compress job's YAML config (path or name in configs/): analyse its models")
    a.add_argument("--force", action="store_true", help="with --config: redo models analysed before")
    a.add_argument("--out", help="output folder (one model)")
    a.add_argument("--images", help="npy of natural images (uint8 N,H,W,3) for ranking/saliency")
    a.add_argument("--tracking-uri", help="MLflow store of --run-id (default: farm_runs/mlflow.db)")
    a.add_argument("--run-id", help="log figures and data to this MLflow run (e.g. the neuron's child run)")
    a.add_argument("--experiment", default="farm", help="MLflow experiment of --run-id")
    a.set_defaults(func=cmd_analyze)

    sj = sub.add_parser("submit", help="run a job config as a Ray Job on a head (results in the submitter's store)")
    sj.add_argument("--config", required=True, help="YAML job config (path or name in configs/)")
    sj.add_argument("overrides", nargs="*", help="key=value overrides")
    sj.add_argument("--address", help="the head's Jobs API (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, "
                    "else http://127.0.0.1:8265)")
    sj.add_argument("--no-wait", action="store_true", help="submit and return; `farm jobs` lists its status")
    sj.add_argument("--sweep", action="store_true", help="run `farm sweep` instead of `farm compress`")
    sj.add_argument("--python", help="the interpreter the head runs farm with (default: this one; on a "
                    "cluster, the farm install's, e.g. ~/venv/bin/python)")
    sj.set_defaults(func=cmd_submit)
    jl = sub.add_parser("jobs", help="the farm jobs submitted to a Ray head, with their status and store")
    jl.add_argument("--address")
    jl.set_defaults(func=cmd_jobs)

    u = sub.add_parser("ui", help="print the command that opens the MLflow UI on 127.0.0.1")
    u.add_argument("--uri", help="an MLflow store (default: the store of --config's job, else of the "
                   "default job: farm_runs/mlflow.db under the current directory)")
    u.add_argument("--config", help="a job config (path or name in configs/): open that job's store")
    u.add_argument("overrides", nargs="*", help="key=value overrides of --config (e.g. out_dir=...)")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from farm.task_env import keep_freed_memory

    keep_freed_memory()  # the driver computes teacher responses and banks too
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("farm: interrupted; finished neurons are kept: rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"farm: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"farm: error: cannot write {e.filename or ''}: {e.strerror} (choose a writable out_dir / "
              f"data.dir, e.g. out_dir=/tmp/farm_runs/job)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

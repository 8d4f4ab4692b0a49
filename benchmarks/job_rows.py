"""Per-neuron rows of a compress job from its MLflow store (for benchmarks/README.md tables), and
their medians: params, filters, R² to the teacher (start / final), real-data R² and the teacher's.

    python benchmarks/job_rows.py --config configs/v4_190923.yaml --job-id v4-190923-dc630d3e6e
    python benchmarks/job_rows.py --config configs/v4_190923.yaml --markdown     # a README table
    python benchmarks/job_rows.py --config configs/v4_190923.yaml --save benchmarks/results/x.jsonl
    python benchmarks/job_rows.py --rows benchmarks/results/x.jsonl --markdown   # saved rows, no store
    python benchmarks/job_rows.py --rows x.jsonl --markdown --compare y.jsonl    # with y's column and differences

``--save`` keeps the rows in a JSONL file (one object per neuron; a neuron already there is
replaced), so that a job run in pieces (a store does not outlive a fresh checkout) is tabled whole
from its committed rows with ``--rows``.
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def store_rows(config: str, job_id: str | None) -> list[dict]:
    """The FINISHED neuron runs of the job, as plain rows."""
    from farm.config import load_job_config
    from farm.tracking import Tracker

    cfg = load_job_config(config)
    job_id = job_id or cfg.resolved_job_id()
    tr = Tracker.open(cfg.tracking_uri(), cfg.tracking.experiment)
    parent = tr.find_job(job_id, "job")
    if parent is None:
        sys.exit(f"no job {job_id} in {cfg.tracking_uri()}")
    runs = [r for r in tr.child_runs(parent, "neuron") if r.info.status == "FINISHED"]
    real = "r2_er" if any("r2_er" in r.data.metrics for r in runs) else "r2_raw"
    rows = []
    for r in runs:
        m = r.data.metrics
        rows.append({"neuron": r.data.tags["farm.neuron_id"], "job_id": job_id, "config": config,
                     "filters": [int(m[f"filters_layer{i}"]) for i in range(5)],
                     "params": int(m["param_count"]), "r2_start": m.get("r2_teacher_distilled"),
                     "r2_final": m["r2_teacher_heldout"], "real_metric": real, "real": m.get(real),
                     "teacher_real": m.get(f"teacher_{real}"), "cpu_s": m.get("cpu_seconds"),
                     "finished": datetime.datetime.fromtimestamp(r.info.end_time / 1000, datetime.timezone.utc)
                     .strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": f"{platform.node()} ({_cpus()} CPUs)"})
    return rows


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def save(rows: list[dict], path: Path) -> None:
    old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    new = {r["neuron"] for r in rows}
    kept = [r for r in old if r["neuron"] not in new]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept + rows))


def table(rows: list[dict], markdown: bool, compare: list[dict] | None = None) -> str:
    """The rows as text or a markdown table with a median row; with ``compare`` (another job's rows),
    a column of that job's final R² to the teacher / real-data R² for the same neuron and, after the
    medians, the per-neuron median differences (these rows minus those)."""
    from farm.selection import neuron_sort_key

    rows = sorted(rows, key=lambda r: neuron_sort_key(r["neuron"]))
    other = {r["neuron"]: r for r in compare or []}
    real = rows[0]["real_metric"] if rows else "r2_raw"
    nan = float("nan")
    f3 = lambda v: nan if v is None else v  # noqa: E731
    lines = []
    if markdown:
        extra = " other: final / real |" if compare is not None else ""
        lines += [f"| neuron | K0..K4 | params | R² to teacher: start / final | {real} | teacher's {real} | CPU-s |"
                  + extra, "|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
    for r in rows:
        cpu = "" if r["cpu_s"] is None else f"{r['cpu_s']:.0f}"
        f = tuple(r["filters"])
        if markdown:
            o = other.get(r["neuron"])
            extra = "" if compare is None else (
                " - |" if o is None else f" {o['r2_final']:.3f} / {f3(o['real']):.3f} |")
            lines.append(f"| {r['neuron']} | {f} | {r['params']:,} | {f3(r['r2_start']):.3f} / {r['r2_final']:.3f} | "
                         f"{f3(r['real']):.3f} | {f3(r['teacher_real']):.3f} | {cpu} |" + extra)
        else:
            lines.append(f"{r['neuron']:<12} {f} {r['params']:>7,} R² to teacher {f3(r['r2_start']):.3f} / "
                         f"{r['r2_final']:.3f}  {real} {f3(r['real']):.3f} (teacher {f3(r['teacher_real']):.3f})"
                         + (f"  cpu {cpu} s" if cpu else ""))
    if rows:
        keys = ("params", "r2_final", "real", "teacher_real", "cpu_s", "r2_start")
        med = [statistics.median([r[k] for r in rows if r[k] is not None] or [nan]) for k in keys]
        if markdown:
            lines.append(f"| median ({len(rows)}) | | {med[0]:,.0f} | {med[5]:.3f} / {med[1]:.3f} | **{med[2]:.3f}** | "
                         f"{med[3]:.3f} | {med[4]:.0f} |" + ("" if compare is None else " |"))
        else:
            lines.append(f"{len(rows)} neurons: median params {med[0]:,.0f}, R² to teacher {med[1]:.3f}, {real} "
                         f"{med[2]:.3f} (teacher {med[3]:.3f}), {med[4]:.0f} CPU-s")
        lines += _summary(rows, other, real)
    return "\n".join(lines)


def _summary(rows: list[dict], other: dict, real: str) -> list[str]:
    """Counts and per-neuron median differences under the table."""
    def med(v):
        return statistics.median(v) if v else float("nan")

    out = [f"R² to the teacher >= 0.9: {sum(r['r2_final'] >= 0.9 for r in rows)} of {len(rows)}; "
           f"median {real} minus the teacher's: "
           f"{med([r['real'] - r['teacher_real'] for r in rows if r['real'] is not None and r['teacher_real'] is not None]):+.3f}"]
    pairs = [(r, other[r["neuron"]]) for r in rows if r["neuron"] in other]
    if pairs:
        d_final = [r["r2_final"] - o["r2_final"] for r, o in pairs]
        d_real = [r["real"] - o["real"] for r, o in pairs if r["real"] is not None and o["real"] is not None]
        out.append(f"against the other rows, neuron by neuron ({len(pairs)}): R² to the teacher "
                   f"{med(d_final):+.3f}, {real} {med(d_real):+.3f} (higher on {sum(d > 0 for d in d_real)} "
                   f"of {len(d_real)}) (medians)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="the job's config (its store and job id)")
    p.add_argument("--job-id", help="default: the config's job id")
    p.add_argument("--rows", nargs="+", type=Path, help="saved JSONL rows instead of a store")
    p.add_argument("--save", type=Path, help="also keep the store's rows in this JSONL file")
    p.add_argument("--markdown", action="store_true", help="print a markdown table with a median row")
    p.add_argument("--compare", type=Path, help="saved JSONL rows of another job: a column and median differences")
    a = p.parse_args(argv)
    if a.rows:
        rows = [json.loads(line) for f in a.rows for line in f.read_text().splitlines() if line.strip()]
    elif a.config:
        rows = store_rows(a.config, a.job_id)
        if a.save:
            save(rows, a.save)
    else:
        p.error("give --config (a job's store) or --rows (saved rows)")
    compare = None
    if a.compare:
        compare = [json.loads(line) for line in a.compare.read_text().splitlines() if line.strip()]
    print(table(rows, a.markdown, compare))


if __name__ == "__main__":
    main()

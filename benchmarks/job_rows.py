"""Per-neuron rows of a compress job from its MLflow store (for benchmarks/README.md tables), and
their medians: params, filters, R² to the teacher (start / final), real-data R² and the teacher's.

    python benchmarks/job_rows.py --config configs/v4_190923.yaml --job-id v4-190923-dc630d3e6e
    python benchmarks/job_rows.py --config configs/v4_190923.yaml --markdown     # a README table
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from farm.config import load_job_config
    from farm.selection import neuron_sort_key
    from farm.tracking import Tracker

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--job-id", help="default: the config's job id")
    p.add_argument("--markdown", action="store_true", help="print a markdown table with a median row")
    a = p.parse_args(argv)
    cfg = load_job_config(a.config)
    tr = Tracker.open(cfg.tracking_uri(), cfg.tracking.experiment)
    parent = tr.find_job(a.job_id or cfg.resolved_job_id(), "job")
    if parent is None:
        sys.exit(f"no job {a.job_id or cfg.resolved_job_id()} in {cfg.tracking_uri()}")
    rows = [r for r in tr.child_runs(parent, "neuron") if r.info.status == "FINISHED"]
    rows.sort(key=lambda r: neuron_sort_key(r.data.tags["farm.neuron_id"]))
    real = "r2_er" if any("r2_er" in r.data.metrics for r in rows) else "r2_raw"
    out, lines = [], []
    for r in rows:
        m = r.data.metrics
        f = tuple(int(m[f"filters_layer{i}"]) for i in range(5))
        nan = float("nan")
        out.append((m["param_count"], m["r2_teacher_heldout"], m.get(real), m.get(f"teacher_{real}"),
                    m.get("cpu_seconds")))
        cpu = f"{m['cpu_seconds']:.0f}" if "cpu_seconds" in m else ""
        if a.markdown:
            lines.append(f"| {r.data.tags['farm.neuron_id']} | {f} | {int(m['param_count']):,} | "
                         f"{m.get('r2_teacher_distilled', nan):.3f} / {m['r2_teacher_heldout']:.3f} | "
                         f"{m.get(real, nan):.3f} | {m.get(f'teacher_{real}', nan):.3f} | {cpu} |")
        else:
            lines.append(f"{r.data.tags['farm.neuron_id']:<12} {f} {int(m['param_count']):>7,} R² to teacher "
                         f"{m.get('r2_teacher_distilled', nan):.3f} / {m['r2_teacher_heldout']:.3f}  {real} "
                         f"{m.get(real, nan):.3f} (teacher {m.get(f'teacher_{real}', nan):.3f})"
                         + (f"  cpu {cpu} s" if cpu else ""))
    if a.markdown:
        print(f"| neuron | K0..K4 | params | R² to teacher: start / final | {real} | teacher's {real} | CPU-s |")
        print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if out:
        med = [statistics.median([x[i] for x in out if x[i] is not None] or [float("nan")]) for i in range(5)]
        if a.markdown:
            print(f"| median ({len(out)}) | | {med[0]:,.0f} | / {med[1]:.3f} | **{med[2]:.3f}** | {med[3]:.3f} | "
                  f"{med[4]:.0f} |")
        else:
            print(f"{len(out)} neurons: median params {med[0]:,.0f}, R² to teacher {med[1]:.3f}, {real} {med[2]:.3f} "
                  f"(teacher {med[3]:.3f})")


if __name__ == "__main__":
    main()

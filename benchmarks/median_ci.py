"""How sure is a 33-neuron median raw R² on 190923's second half? Bootstrap confidence intervals.

Reads the compact models of the farm runs named in one or more rows files (benchmarks/results/*.jsonl,
as benchmarks/job_rows.py writes them; the models come from the jobs' MLflow store), scores them, the
teacher (the 200-filter shared compact model) and the paper's published per-neuron models on 190923's
second half, and prints for each the median raw R² over the neurons they share with a 95% interval
from resampling (a) the test images, (b) the neurons, (c) both; the paired differences between them
(the same resample for both sides) and how often the median reaches the goal's 0.40.

    python benchmarks/median_ci.py --rows benchmarks/results/v4_190923_k35_retrain.jsonl
    python benchmarks/median_ci.py --rows A.jsonl --rows B.jsonl --boot 4000

(a) is the benchmark's own measurement noise (another draw of test images from the same session);
(b) the spread of the median over neurons like these (another session's 33 neurons); (c) both.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from farm.metrics import r2_raw  # noqa: E402  (squared Pearson r per neuron, as the jobs score)

TEST_SESSION = "190923"
TEACHER = "../shared/models/published/shared_compact_models/from_ensemble_model/shared_compact_model_200filters.keras"
PUBLISHED = "../shared/models/published"
GOAL = 0.40


def bootstrap_medians(responses: np.ndarray, preds: dict[str, np.ndarray], n_boot: int, mode: str,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """Median over neurons of the raw R² of every model set, for ``n_boot`` paired resamples.

    responses: (neurons, images); preds: name -> (neurons, images). mode: "images" resamples the test
    images, "neurons" the neurons, "both" both (the same draw for every model set, so differences are
    paired). Returns name -> (n_boot,) medians.
    """
    rng = np.random.default_rng(seed)
    n_neur, n_img = responses.shape
    out = {k: np.empty(n_boot) for k in preds}
    for b in range(n_boot):
        img = rng.integers(0, n_img, n_img) if mode in ("images", "both") else np.arange(n_img)
        neu = rng.integers(0, n_neur, n_neur) if mode in ("neurons", "both") else np.arange(n_neur)
        y = responses[np.ix_(neu, img)]
        for k, p in preds.items():
            out[k][b] = np.nanmedian(r2_raw(y, p[np.ix_(neu, img)]))
    return out


def load_rows_models(rows_path: Path, tracker, ids: list[str], images: np.ndarray) -> tuple[dict, dict]:
    """Predictions (neuron -> (images,)) of every model in a rows file, read from the jobs' MLflow runs,
    and the rows' own raw R² (neuron -> value) to check the scoring against."""
    from farm.distill import predict
    from farm.models.compact import load_compact

    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    want = {r["neuron"]: r for r in rows}
    preds = {}
    for job in sorted({r["job_id"] for r in rows}):
        parent = tracker.find_job(job, "job")
        if parent is None:
            sys.exit(f"{rows_path}: no job {job} in the MLflow store")
        for run in tracker.child_runs(parent, "neuron"):
            n = run.data.tags.get("farm.neuron_id")
            if run.info.status != "FINISHED" or n not in want or want[n]["job_id"] != job or n in preds:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                model = load_compact(tracker.download(run.info.run_id, "model", Path(tmp) / n))
            preds[n] = predict(model, images, batch_size=32)
    missing = sorted(set(want) - set(preds), key=lambda n: ids.index(n))
    if missing:
        sys.exit(f"{rows_path}: no finished model for {missing} in the MLflow store")
    return preds, {n: float(r["real"]) for n, r in want.items()}


def main(argv=None) -> None:
    import torch

    from farm.config import load_job_config
    from farm.data.sessions import read_session
    from farm.distill import predict
    from farm.models.published import load_published_session
    from farm.pipeline import prepare_sessions  # noqa: F401  (imports the release on a fresh checkout)
    from farm.shared_start import load_shared_start
    from farm.task_env import keep_freed_memory
    from farm.tracking import Tracker

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", action="append", required=True, type=Path,
                   help="a rows file of a farm run (repeat for several); its models are read from MLflow")
    p.add_argument("--config", default="configs/v4_190923.yaml", help="for the MLflow store and the sessions")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--per-neuron", action="store_true",
                   help="also each neuron's raw R² per model and each model's R² to the teacher on the test images")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()  # the predictions at 112 px otherwise spend most of their time in page faults
    cfg = load_job_config(a.config)
    path = Path(cfg.data.dir) / f"{TEST_SESSION}.parquet"
    if not path.is_file():
        prepare_sessions(cfg)
    second = read_session(path).halves()[1]
    ids, images = list(second.neuron_ids), second.images
    responses = second.mean_responses().astype(np.float64)
    tracker = Tracker.open(cfg.tracking_uri(), cfg.tracking.experiment)

    sets = {}
    for rp in a.rows:
        preds, claimed = load_rows_models(rp, tracker, ids, images)
        sets[f"farm: {rp.stem}"] = preds
        got = {n: r2_raw(responses[ids.index(n)], v)[0] for n, v in preds.items()}
        worst = max(abs(got[n] - claimed[n]) for n in got)
        print(f"{rp}: {len(preds)} models; raw R² as the rows file within {worst:.1e}", flush=True)
    neurons = sorted(set.intersection(*(set(s) for s in sets.values())), key=ids.index)
    cols = [ids.index(n) for n in neurons]
    teacher = predict(load_shared_start(TEACHER, ids), images, batch_size=16)
    published = load_published_session(PUBLISHED, TEST_SESSION)
    preds = {k: np.stack([s[n] for n in neurons]) for k, s in sets.items()}
    preds["teacher (K=200)"] = teacher[:, cols].T
    preds["published per-neuron models"] = np.stack([predict(published[c], images, batch_size=32) for c in cols])
    y = responses[cols]
    point = {k: float(np.nanmedian(r2_raw(y, v))) for k, v in preds.items()}
    if a.per_neuron:
        tk = "teacher (K=200)"
        others = [k for k in preds if k != tk]
        print("\n| neuron | teacher raw | " + " | ".join(f"{k}: raw / R² to teacher" for k in others) + " |")
        print("|---|---|" + "---|" * len(others))
        for i, n in enumerate(neurons):
            cells = [f"{r2_raw(y[i], preds[k][i])[0]:.3f} / "
                     f"{r2_raw(preds[tk][i], preds[k][i])[0]:.3f}" for k in others]
            print(f"| {n} | {r2_raw(y[i], preds[tk][i])[0]:.3f} | " + " | ".join(cells) + " |")
        # a model whose error is independent of the neuron keeps (teacher's raw R²) x (its R² to the teacher)
        t_raw = r2_raw(y, preds[tk])
        for k in others:
            ex = r2_raw(y, preds[k]) - t_raw * r2_raw(preds[tk], preds[k])
            print(f"{k}: raw R² minus the teacher's raw R² x its R² to the teacher: median {np.median(ex):+.3f}, "
                  f"above on {int(np.sum(ex > 0))} of {len(ex)} (> 0: more than a model whose error is independent of the neuron keeps)")
    print(f"\n{len(neurons)} neurons, {y.shape[1]} test images, {a.boot} paired resamples; 95% intervals\n")
    modes = ("images", "neurons", "both")
    boots = {m: bootstrap_medians(y, preds, a.boot, m) for m in modes}
    ci = lambda v: f"[{np.percentile(v, 2.5):.3f}, {np.percentile(v, 97.5):.3f}]"  # noqa: E731
    print("| model | median raw R² | resampling images | resampling neurons | both | P(median >= 0.40): images / both |")
    print("|---|---|---|---|---|---|")
    for k in preds:
        print(f"| {k} | {point[k]:.3f} | {ci(boots['images'][k])} | {ci(boots['neurons'][k])} | "
              f"{ci(boots['both'][k])} | {np.mean(boots['images'][k] >= GOAL):.2f} / "
              f"{np.mean(boots['both'][k] >= GOAL):.2f} |")
    print("\n| difference of medians (paired) | point | resampling images | resampling neurons | both "
          "| neuron by neuron: median difference, higher on |")
    print("|---|---|---|---|---|---|")
    names = list(preds)
    raw = {k: r2_raw(y, v) for k, v in preds.items()}
    for i, k in enumerate(names):
        for j in names[i + 1:]:
            d = {m: boots[m][k] - boots[m][j] for m in modes}
            per = raw[k] - raw[j]
            print(f"| {k} minus {j} | {point[k] - point[j]:+.3f} | {ci(d['images'])} | {ci(d['neurons'])} | "
                  f"{ci(d['both'])} | {np.median(per):+.3f}, {int(np.sum(per > 0))} of {len(per)} |")


if __name__ == "__main__":
    main()

"""Is a job's lower fidelity on 190923's test images a distribution shift? The bank's images are
augmented views (crops of 0.7-1.0 of the side, colour jitter, flips) of the training sessions' images;
the test images are whole images. Prints each compact model's R² to the teacher (the 200-filter shared
model) and the teacher's SD on: the job's held-out bank views, 1,000 unaugmented training-session
images, 190923's second half.

    python benchmarks/bank_shift.py <job id> [<job id> ...]   # jobs of configs/v4_190923_k35_retrain.yaml
    python benchmarks/bank_shift.py --config configs/v4_190923_k35.yaml <job id>
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TEST_SESSION = "190923"  # its second half: the test images; its neurons: the jobs' models
TEACHER = "../shared/models/published/shared_compact_models/from_ensemble_model/shared_compact_model_200filters.keras"


def main(argv=None) -> None:
    import torch

    from farm.config import load_job_config
    from farm.distill import predict, squared_pearson
    from farm.models.compact import load_compact
    from farm.pipeline import prepare_job, prepare_sessions
    from farm.shared_start import load_shared_start
    from farm.tracking import Tracker

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("job_ids", nargs="+", help="finished compress jobs whose models to read")
    p.add_argument("--config", default="configs/v4_190923_k35_retrain.yaml")
    p.add_argument("--n-source", type=int, default=1000, help="unaugmented training-session images to score")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # (not farm.task_env.keep_freed_memory: the sessions' arrays go back to the OS)
    cfg = load_job_config(a.config)
    sessions, _, _ = prepare_sessions(cfg)
    pool = np.concatenate([s.images for s in sessions if s.role in cfg.bank.source_roles
                           and s.session_id != TEST_SESSION and s.images_available and s.images.size])
    source = pool[np.random.default_rng(0).choice(len(pool), min(a.n_source, len(pool)), replace=False)]
    del sessions, pool
    inp = prepare_job(cfg).inputs
    rd = inp.real[TEST_SESSION]
    ids = rd["neuron_ids"]
    sets = {"held-out bank views": inp.heldout_images, "training-session images": source,
            "190923 test": rd["images"]}
    print("images: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()), flush=True)
    teacher = load_shared_start(TEACHER, ids)
    tp = {k: predict(teacher, v) for k, v in sets.items()}
    tr = Tracker.open(cfg.tracking_uri(), cfg.tracking.experiment)
    print("| neuron | " + " | ".join(f"{k}: R² to teacher (teacher SD)" for k in sets) + " |\n|---|---|---|---|")
    rows = []
    for jid in a.job_ids:
        parent = tr.find_job(jid, "job")
        if parent is None:
            sys.exit(f"no job {jid} in {cfg.tracking_uri()}")
        for r in tr.child_runs(parent, "neuron"):
            if r.info.status != "FINISHED":
                continue
            n = r.data.tags["farm.neuron_id"]
            with tempfile.TemporaryDirectory() as tmp:
                model = load_compact(tr.download(r.info.run_id, "model", Path(tmp) / n))
            c = ids.index(n)
            vals = [(squared_pearson(tp[k][:, c], predict(model, v)), float(np.std(tp[k][:, c])))
                    for k, v in sets.items()]
            print(f"| {n} | " + " | ".join(f"{r2:.3f} ({sd:.2f})" for r2, sd in vals) + " |", flush=True)
            rows.append([r2 for r2, _ in vals])
    med = np.median(np.array(rows), axis=0)
    print(f"| median ({len(rows)}) | " + " | ".join(f"{v:.3f}" for v in med) + " |")


if __name__ == "__main__":
    main()

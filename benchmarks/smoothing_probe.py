"""How much one Gaussian smoothing (sigma 0.5, method.md §4) of a TRAINED model costs: the published
shared compact model with 10 early filters, sliced to neuron 190923:0, smoothed 0-3 times, scored by
R² to the job's teacher on its held-out bank images (configs/v4_190923.yaml's cached stages).

    python benchmarks/smoothing_probe.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch

    from farm.config import load_job_config
    from farm.distill import predict, smooth_kernels_, squared_pearson
    from farm.models.compact import output_slice
    from farm.pipeline import prepare_job
    from farm.shared_start import load_shared_start

    torch.set_num_threads(2)
    inp = prepare_job(load_job_config("v4_190923")).inputs
    path = "../shared/models/published/shared_compact_models/from_ensemble_model/shared_compact_model_10filters.keras"
    nid = "190923:0"
    model = output_slice(load_shared_start(path, [nid]), nid)
    target = inp.heldout_targets[:, inp.neuron_ids.index(nid)]
    for k in range(4):
        print(f"smoothed {k} times: R² to the teacher {squared_pearson(target, predict(model, inp.heldout_images)):.3f}")
        smooth_kernels_(model, 0.5)


if __name__ == "__main__":
    main()

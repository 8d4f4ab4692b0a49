"""Changes made AFTER training, scored on 190923's second half (configs/v4_190923_k35_retrain.yaml's cached stages):

    python benchmarks/posthoc_probes.py smooth --run v4-190923-8aa7d77beb_prune.tau1.0 --neurons 30,18,3,10
        # finished probe models (farm_runs/probes/final_190923_<n>_<run>.pt, from slice_probes.py finish)
        # with their readout map or their depthwise kernels Gaussian-smoothed afterwards
    python benchmarks/posthoc_probes.py shift     # the teacher's responses averaged over small image shifts

Each prints R² to the teacher on the held-out bank images and raw R² (the teacher's: median over the
33 neurons, and neuron by neuron against the plain teacher).
"""

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    import torch

    from farm.config import load_job_config
    from farm.pipeline import prepare_job

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("probe", choices=["smooth", "shift"])
    p.add_argument("--config", default="v4_190923_k35_retrain")
    p.add_argument("--run", default="v4-190923-8aa7d77beb_prune.tau1.0",
                   help="smooth: the probe models' file suffix (start job id and variant)")
    p.add_argument("--neurons", default="30,18,3,10,9,32,17,4", help="smooth: 190923 neuron numbers")
    p.add_argument("--sigmas", default="0.5,1,2", help="smooth: Gaussian sigmas (pixels of the map or kernel)")
    p.add_argument("--shifts", default="1,2,3", help="shift: shift sizes s (pixels; 5 views: 0, +-s in y and x)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_job_config(a.config)
    inp = prepare_job(cfg).inputs
    if a.probe == "smooth":
        return smooth(inp, a.run, [int(n) for n in a.neurons.split(",")], [float(s) for s in a.sigmas.split(",")])
    return shift(inp, cfg, [int(s) for s in a.shifts.split(",")])


def smooth(inp, run: str, neurons: list[int], sigmas: list[float]) -> None:
    """Each finished model plain, with its spatial readout map smoothed (sigma in map pixels), and with
    the depthwise kernels of layers 1-4 smoothed (``farm.distill`` smoothing, as the paper's)."""
    import torch

    from farm.distill import _smooth_last_two_, predict, squared_pearson
    from farm.metrics import r2_raw
    from farm.neuron_runs import _real_data
    from slice_probes import _load_start

    print("| neuron | plain | " + " | ".join(f"map {s:g}" for s in sigmas) + " | "
          + " | ".join(f"kernels {s:g}" for s in sigmas) + " |  (R² to teacher / raw R²)", flush=True)
    for n in neurons:
        nid = f"190923:{n}"
        model, _ = _load_start(Path("farm_runs/probes") / f"final_190923_{n}_{run}.pt")
        col, real = inp.neuron_ids.index(nid), _real_data(inp, nid)
        cells = []
        for what, sigma in [("plain", 0.0)] + [("map", s) for s in sigmas] + [("kernels", s) for s in sigmas]:
            m = copy.deepcopy(model).eval()
            with torch.no_grad():
                if what == "map":
                    _smooth_last_two_(m.spatial if m.spec.readout == "factorized" else m.readout_maps().permute(2, 0, 1),
                                      sigma)
                elif what == "kernels":
                    for layer in range(1, 5):
                        _smooth_last_two_(m.depthwise(layer).weight, sigma)
            fid = squared_pearson(inp.heldout_targets[:, col], predict(m, inp.heldout_images))
            raw = float(np.ravel(r2_raw(real.responses, predict(m, real.images)))[0])
            cells.append(f"{fid:.3f} / {raw:.3f}")
        print(f"| {nid} | " + " | ".join(cells) + " |", flush=True)


def shift(inp, cfg, shifts: list[int]) -> None:
    """The teacher's raw R² with its responses averaged over the image and its 4 shifts by +-s pixels
    (edge-padded), against the plain teacher."""
    from farm.metrics import r2_raw
    from farm.pipeline import prepare_sessions, prepare_teacher

    sessions, truth, sdir = prepare_sessions(cfg)
    teacher, _ = prepare_teacher(cfg, sessions, truth, sdir, None)
    rd = inp.real["190923"]
    images, responses = rd["images"], rd["responses"]
    order = [list(teacher.neuron_ids).index(n) for n in rd["neuron_ids"]]

    def moved(x, dy, dx, pad=max(shifts)):
        xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        return xp[:, pad + dy:pad + dy + x.shape[1], pad + dx:pad + dx + x.shape[2]]

    def scores(pred):
        return np.array([float(np.ravel(r2_raw(responses[i], pred[:, i]))[0]) for i in range(len(order))])

    plain = teacher.predict(images)[:, order]
    r0 = scores(plain)
    print(f"the teacher: median raw R² {np.median(r0):.4f} ({len(order)} neurons)", flush=True)
    for s in shifts:
        views = [plain] + [teacher.predict(moved(images, dy, dx))[:, order] for dy, dx in [(s, 0), (-s, 0), (0, s), (0, -s)]]
        r = scores(np.mean(views, axis=0))
        print(f"averaged over shifts of +-{s} px: median raw R² {np.median(r):.4f}; neuron by neuron "
              f"{np.median(r - r0):+.4f} (higher on {int((r > r0).sum())} of {len(r)})", flush=True)


if __name__ == "__main__":
    main()

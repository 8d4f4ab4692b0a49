"""Does the teacher's feature MAP teach a neuron's retrain more per image than its scalar response?

The teacher here (configs/v4_190923_k35_retrain.yaml, whose retrain settings the probe copies) is the
paper's 200-filter shared compact model: neuron k's response is sum_xy s_k[x, y] * T_k[x, y] + b_k with
T_k = m_k . a4 its 28 x 28 map. The retrain fits the scalar alone (1 number per image). This probe adds
the map as a second target (784 numbers per image, as in hint / feature-map distillation): loss =
MSE(z-scored response) + lam x sum_xy w_xy (a * M[x, y] + c - zT[x, y])^2, with M the student's own map
(its mixing of its layer-4 maps), zT the teacher's map z-scored over the bank, w = s_k^2 / sum s_k^2 the
pixels the teacher reads, and (a, c) two learned scalars (the student's map is in its own units). lam 0
is the plain retrain, same loop.

    python benchmarks/map_probe.py --neuron 190923:30 --lam 1 --passes 2.4 --frozen 1 --threads 1

Starts from finish's cached start (``slice_probes.py finish --start-variant "specialize.late_filters=[42,14]"``),
trains on the bank's images and their mirrors with the config's retrain settings (Adam 1e-3 cosine,
batch 32, channels_last; farm.distill's own loop ``_fit``), prints R² to the teacher on the held-out
bank images and raw R² on 190923's second half. The teacher's maps of the bank and its mirrors are
computed once (float16; ``--maps-for``: other neurons' in the same pass, ``--maps-only``: then stop) and
cached under farm_runs/probes/ (1,075 s on 2 threads for 46,800 images).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def teacher_maps(teacher, indices: list[int], images: np.ndarray, paths: list[Path]) -> list[np.ndarray]:
    """Per neuron index, (2N, R*R) float16: the teacher's map T on the images, then on their mirrors
    (the teacher's layers run once for all the indices; each cached at its path)."""
    import torch

    from farm.models.input import recenter

    if all(p.is_file() for p in paths):
        return [np.load(p) for p in paths]
    teacher.eval()
    w, b = teacher.mixing.weight[indices], teacher.mixing.bias[indices]
    n, r = len(images), teacher.spec.readout_size
    out = np.empty((len(indices), 2 * n, r * r), dtype=np.float16)
    t0 = time.perf_counter()
    with torch.no_grad():
        for view in (0, 1):
            for s in range(0, n, 64):
                batch = images[s:s + 64]
                x = recenter(np.ascontiguousarray(batch[:, :, ::-1]) if view else batch, "cpu")
                for l in range(5):
                    x = teacher.layer_act(l, x)
                m = torch.nn.functional.conv2d(x, w, b).flatten(2).numpy()  # (B, k, R*R)
                out[:, view * n + s:view * n + s + len(batch)] = m.transpose(1, 0, 2)
    for p, o in zip(paths, out):
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, o)
    print(f"teacher maps of {2 * n} images for {len(indices)} neuron(s): {time.perf_counter() - t0:.0f} s", flush=True)
    return list(out)


def main(argv=None):
    import torch

    from farm.config import load_job_config
    from farm.distill import DistillConfig, _fit, _lr_scales, predict, squared_pearson
    from farm.metrics import r2_raw
    from farm.neuron_runs import _real_data
    from farm.pipeline import prepare_job
    from farm.shared_start import load_shared_start
    from farm.task_env import keep_freed_memory

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from slice_probes import _load_start, _mirror_responses

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--neuron", default="190923:30")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--passes", type=float, default=2.4)
    p.add_argument("--frozen", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--maps-for", default="",
                   help="comma-separated neurons whose teacher maps to compute (and cache) in the same pass")
    p.add_argument("--maps-only", action="store_true", help="compute (cache) the teacher maps, then stop")
    p.add_argument("--limit", type=int, default=0, help="smoke test: the bank's first LIMIT images only (no cache)")
    p.add_argument("--start-variant", default="specialize.late_filters=[42,14]")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    base = load_job_config("v4_190923_k35_retrain", [f"compress.{o}" for o in a.start_variant.split()])
    inp = prepare_job(base).inputs
    col = inp.neuron_ids.index(a.neuron)
    tag = a.neuron.replace(":", "_")
    start, _ = _load_start(Path("farm_runs/probes") / f"start_{tag}_{base.resolved_job_id()}.pt")
    teacher = load_shared_start(base.teacher.path, inp.neuron_ids)
    check = predict(teacher, inp.bank_images[:64])
    if not np.allclose(check[:, col], inp.bank_targets[:64, col], rtol=1e-3, atol=1e-3):
        raise SystemExit("the teacher model's responses differ from the bank's cached targets")
    bank, mirror_targets = inp.bank_images, _mirror_responses(inp, base)[:, col]
    bank_targets = inp.bank_targets[:, col]
    if a.limit:
        bank, bank_targets, mirror_targets = bank[:a.limit], bank_targets[:a.limit], mirror_targets[:a.limit]
    names = [a.neuron] + [m for m in a.maps_for.split(",") if m and m != a.neuron]
    suffix = f"_{a.limit}" if a.limit else ""
    tmaps = teacher_maps(teacher, [inp.neuron_ids.index(m) for m in names], bank,
                         [Path("farm_runs/probes") / f"tmap_{m.replace(':', '_')}{suffix}.npy" for m in names])[0]
    spatial = teacher.spatial[col].detach().float().flatten().numpy()
    recon = tmaps[:64].astype(np.float32) @ spatial + teacher.spatial_bias[col].item()
    if not np.allclose(recon, bank_targets[:64], rtol=1e-2, atol=2e-2):
        raise SystemExit(f"the teacher's maps do not reproduce its responses: {recon[:3]} vs {bank_targets[:3]}")
    if a.maps_only:
        return
    targets = np.concatenate([bank_targets, mirror_targets]).astype(np.float64)
    mu, sd = targets.mean(), targets.std()
    tm = tmaps.astype(np.float32)
    tmu, tsd = float(tm.mean()), float(tm.std())
    w = (teacher.spatial[col].detach().float().flatten() ** 2)
    w = (w / w.sum()).numpy()
    sw = np.sqrt(a.lam * w).astype(np.float32)
    cols = np.concatenate([((targets - mu) / sd).astype(np.float32)[:, None], ((tm - tmu) / tsd) * sw[None]], axis=1)
    del tm

    class WithMap(torch.nn.Module):
        def __init__(self, student):
            super().__init__()
            self.student = student
            self.a = torch.nn.Parameter(torch.ones(()))
            self.c = torch.nn.Parameter(torch.zeros(()))
            self.register_buffer("sw", torch.as_tensor(sw))

        def forward(self, x):
            s = self.student
            for l in range(5):
                x = s.layer_act(l, x)
            out = (s.head(x) - mu) / sd
            if a.lam == 0:
                return out
            m = s.mixing(x).flatten(1)
            return torch.cat([out, (self.a * m + self.c) * self.sw], dim=1)

    rc = base.compress.retrain
    cfg = DistillConfig(**{**rc.__dict__, "passes": a.passes, "frozen_layers": a.frozen, "mirrors": True,
                           "smooth_sigma": 0.0, "standardize_targets": False, "eval_every_images": None})
    net = WithMap(start)
    tgt = cols if a.lam else cols[:, :1]
    cpu0 = time.process_time()
    _fit(net, lambda: None, bank, tgt, cfg, "cpu", None, None, None, None, None,
         lr_scales=_lr_scales(start, cfg), mirrored=True)
    cpu = time.process_time() - cpu0
    model = net.student.eval().to(memory_format=torch.contiguous_format)
    real = _real_data(inp, a.neuron)
    held = squared_pearson(inp.heldout_targets[:, col], predict(model, inp.heldout_images))
    train = squared_pearson(inp.bank_targets[:2000, col], predict(model, inp.bank_images[:2000]))
    raw = float(np.ravel(r2_raw(real.responses, predict(model, real.images)))[0])
    print(f"| {a.neuron} | lam {a.lam:g} | {a.passes:g} passes, frozen {a.frozen} | {held:.3f} ({train:.3f}) | "
          f"{raw:.3f} | {cpu:.0f} | a {net.a.item():.3f}, c {net.c.item():.3f} |", flush=True)
    if a.limit:
        return
    torch.save({"spec": model.spec.to_dict(), "state_dict": model.state_dict(), "cpu_s": cpu},
               Path("farm_runs/probes") / f"mapfinal_{tag}_lam{a.lam:g}_p{a.passes:g}_f{a.frozen}.pt")


if __name__ == "__main__":
    main()

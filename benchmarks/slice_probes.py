"""Probes on one real neuron's start from a published shared compact model (by default
configs/v4_190923_k35_retrain.yaml's cached stages; R² to the teacher on its held-out bank images, raw R² on 190923's second half).

    python benchmarks/slice_probes.py prune --criterion reconstruction          # tau 0.9, then 1 retrain pass
    python benchmarks/slice_probes.py prune --criterion ablation --delta 0.02
    python benchmarks/slice_probes.py specialize --late 32,8 --passes 30        # then 2 retrain passes at 1e-4
    python benchmarks/slice_probes.py specialize --passes 5 --flip              # mirrors: twice the images
    python benchmarks/slice_probes.py specialize --passes 10 --map-from teacher # fit the teacher's own map
    python benchmarks/slice_probes.py specialize --k 25 --late 64,16 --passes 15 --flip --readout factorized --tune-passes 4
    python benchmarks/slice_probes.py ceilings --neurons 190923:0-7             # slices at K = 5..50, published models
    python benchmarks/slice_probes.py fidelity --config configs/v4_190923_k35.yaml  # a job's models on the test images
    python benchmarks/slice_probes.py headroom --goal 0.40  # per start: the fidelity the median neuron needs
    python benchmarks/slice_probes.py finish --neuron 190923:0 --variant "" --variant "prune.iterative=false retrain.passes=1"
                                      # the config's specialized start (cached), then its prune + retrain
                                      # under each variant (compress.* overrides): the farm task's own code
    python benchmarks/slice_probes.py finish --config configs/v4_190923_k35.yaml --neuron 190923:3 \
        --start-variant "specialize.tune_passes=0"     # another config's path, its start varied
    python benchmarks/slice_probes.py finish --neuron 190923:30 --start-only \
        --start-variant "specialize.tune_passes=6 specialize.tune_mirrors=true"  # the start's numbers only
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHARED = "../shared/models/published/shared_compact_models/from_ensemble_model/shared_compact_model_{k}filters.keras"


def main(argv=None):
    import torch

    from farm.config import load_job_config
    from farm.distill import DistillConfig, distill, predict, squared_pearson
    from farm.metrics import evaluate_predictions
    from farm.models.compact import output_slice
    from farm.pipeline import prepare_job
    from farm.prune import PruneConfig, prune
    from farm.shared_start import load_shared_start
    from farm.specialize import SpecializeConfig, specialize

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("probe", choices=["prune", "specialize", "ceilings", "finish", "fidelity", "headroom"])
    p.add_argument("--job-id", help="fidelity: the compress job whose models to read (default: the config's)")
    p.add_argument("--start-variant", default="",
                   help="finish: space-separated compress.* overrides for the start (e.g. specialize.tune_passes=8)")
    p.add_argument("--variant", action="append", default=[],
                   help="finish: space-separated compress.* overrides of the config (repeatable; '' = as configured)")
    p.add_argument("--pre-variant", default="",
                   help="finish: the start is first trained end to end, unpruned, under these compress.* "
                        "overrides of the retrain (e.g. 'retrain.passes=1 retrain.lr=0.001'), then pruned per variant")
    p.add_argument("--start-weight", type=float, default=0.0,
                   help="finish: the tune step and the retrains fit (1 - w) x the teacher's responses + w x the "
                        "shared model's own (its slice's) responses on the bank; 0: the teacher's alone")
    p.add_argument("--start-only", action="store_true",
                   help="finish: only the start (its R² to the teacher and raw R²), no pruning or retraining")
    p.add_argument("--mirror-bank", action="store_true",
                   help="finish: prune and retrain on the bank images AND their left-right mirrors, with the "
                        "teacher's responses to the mirrors (computed once for all neurons, cached under "
                        "farm_runs/probes/): twice the (image, response) pairs; passes count over both")
    p.add_argument("--gaudy-bank", type=float, default=0.0, metavar="FRACTION",
                   help="finish: prune and retrain on the bank images AND the gaudy transforms (method.md §1.5) "
                        "of their first FRACTION, with the teacher's responses to those (computed once for all "
                        "neurons, cached under farm_runs/probes/); passes count over all the pairs")
    p.add_argument("--neurons", default="190923:0-7", help="ceilings: the neurons (a selection)")
    p.add_argument("--goal", type=float, default=0.40, help="headroom: the median raw R² to reach")
    p.add_argument("--k", type=int, default=10, help="early filters of the published shared model")
    p.add_argument("--neuron", default="190923:0")
    p.add_argument("--config", default="v4_190923_k35_retrain",
                   help="the job config whose cached stages and compress section the probes use "
                        "(default: the 2026-12-05 default, whose settings the dated commands in benchmarks/README.md "
                        "ran with; e.g. configs/v4_190923_k35.yaml)")
    p.add_argument("--criterion", default="reconstruction")
    p.add_argument("--delta", type=float, default=0.01)
    p.add_argument("--late", default="32,8")
    p.add_argument("--passes", type=float, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--map-from", choices=["shared", "teacher"], default="shared",
                   help="specialize to the shared model's map or to the (shared-compact) teacher's")
    p.add_argument("--flip", action="store_true", help="specialize on the images and their mirror images")
    p.add_argument("--readout", choices=["dense", "factorized"], default="dense",
                   help="specialize: the neuron model's readout form")
    p.add_argument("--tune-passes", type=float, default=0.0,
                   help="specialize: then passes fitting layers 3-4 + readout to the teacher's responses")
    p.add_argument("--retrain-passes", type=float, default=2)
    p.add_argument("--retrain-lr", type=float, default=1e-4)
    a = p.parse_args(argv)
    from farm.task_env import keep_freed_memory

    keep_freed_memory()  # as farm's tasks run
    torch.set_num_threads(a.threads)
    inp = prepare_job(load_job_config(a.config)).inputs
    if a.probe == "ceilings":
        return ceilings(inp, a.neurons)
    if a.probe == "fidelity":
        return fidelity(inp, a.config, a.job_id)
    if a.probe == "headroom":
        return headroom(inp, a.goal)
    if a.probe == "finish":
        return finish(inp, a.neuron, [] if a.start_only else (a.variant or [""]), a.threads, a.start_variant, a.config, a.start_weight,
                      a.pre_variant, a.mirror_bank, a.gaudy_bank)
    col = inp.neuron_ids.index(a.neuron)
    x, y, hx, hy = inp.bank_images, inp.bank_targets[:, col], inp.heldout_images, inp.heldout_targets[:, col]
    rd = inp.real[a.neuron.split(":")[0]]
    resp = rd["responses"][rd["neuron_ids"].index(a.neuron)]
    resp = np.nanmean(resp, axis=-1) if resp.ndim == 2 else resp
    shared = load_shared_start(SHARED.format(k=a.k), [a.neuron])

    def report(what, model):
        raw = float(evaluate_predictions(resp[None], predict(model, rd["images"])[None], False)["r2_raw"][0])
        print(f"{what}: filters {model.spec.filters}, params {model.spec.param_count():,}, R² to the teacher "
              f"{squared_pearson(hy, predict(model, hx)):.3f}, raw R² {raw:.3f}", flush=True)

    retrain = DistillConfig(passes=1 if a.probe == "prune" else a.retrain_passes, batch_size=32,
                            lr=a.retrain_lr, lr_schedule="cosine",
                            standardize_targets=True, smooth_every_images=500_000, smooth_at_end=False)
    if a.probe == "prune":
        start = output_slice(shared, a.neuron)
        report("slice", start)
        model = prune(start, hx, hy, PruneConfig(tau=0.9, criterion=a.criterion, delta=a.delta)).model
        report(f"pruned ({a.criterion})", model)
    else:
        target = None
        if a.map_from == "teacher":
            target = load_shared_start(SHARED.format(k=200), [a.neuron])
        cfg = SpecializeConfig(late_filters=tuple(map(int, a.late.split(","))), passes=a.passes, flip=a.flip,
                               readout=a.readout, tune_passes=a.tune_passes)
        model, info = specialize(shared, a.neuron, x, cfg, target=target, targets=y)
        report(f"specialized (map R² {info['map_r2']:.3f})", model)
    report("retrained", distill(model, x, y, retrain, trained=True).model)


def finish(inp, neuron: str, variants: list[str], threads: int, start_variant: str = "",
           config: str = "v4_190923_k35_retrain", start_weight: float = 0.0, pre_variant: str = "",
           mirror_bank: bool = False, gaudy_bank: float = 0.0) -> None:
    """The farm task's own path for one neuron (``config``, default configs/v4_190923_k35_retrain.yaml): its specialized start
    (``neuron_start``, with the compress.* overrides ``start_variant``, from the shared model's layer-2
    activations of the bank computed once for all neurons as the farm job does; cached under
    farm_runs/probes/ by the job id they give), then ``compress_neuron`` from it under each variant of
    the compress section (with ``start_variant`` too); one markdown row per variant. ``start_weight``:
    the start's tune step and the retrains fit a blend of the teacher's responses and the shared
    model's own (its slice's, from the paper's ensemble on real data) instead of the teacher's alone.
    ``mirror_bank``: the pruning and retraining (not the start) see the bank and its mirrors, with the
    teacher's responses to the mirrors. ``gaudy_bank``: they also see the gaudy transforms of the bank's
    first ``gaudy_bank`` x N images, with the teacher's responses to those."""
    import time

    import torch

    from farm.compress import CompressConfig, compress_neuron
    from farm.config import load_job_config
    from farm.distill import predict, squared_pearson
    from farm.metrics import evaluate_predictions
    from farm.neuron_runs import _real_data
    from farm.specialize import neuron_start

    start_sets = [f"compress.{o}" for o in start_variant.split()]
    base = load_job_config(config, start_sets)
    cfg = CompressConfig.for_seed(base.compress, base.seed)
    col = inp.neuron_ids.index(neuron)
    targets = inp.bank_targets[:, col]
    if start_weight:
        from farm.models.compact import output_slice
        from farm.shared_start import load_shared_start

        rpath = Path("farm_runs/probes") / f"slice_resp_{neuron.replace(':', '_')}_{Path(cfg.shared.path).stem}.npy"
        if not rpath.is_file():
            rpath.parent.mkdir(parents=True, exist_ok=True)
            np.save(rpath, predict(output_slice(load_shared_start(cfg.shared.path, inp.neuron_ids), neuron),
                                   inp.bank_images))
        own = np.load(rpath).astype(np.float64)
        slope = np.polyfit(own, targets, 1)[0]
        print(f"blend: {1 - start_weight:g} x teacher + {start_weight:g} x the slice's responses (R² between them on the "
              f"bank {squared_pearson(own, targets):.3f}, slope {slope:.3f})", flush=True)
        targets = ((1 - start_weight) * targets + start_weight * own).astype(np.float32)
    wtag = f"_w{start_weight:g}" if start_weight else ""
    cache = Path("farm_runs/probes") / f"start_{neuron.replace(':', '_')}_{base.resolved_job_id()}{wtag}.pt"
    if cache.is_file():
        start, start_cpu = _load_start(cache)
    else:
        cpu0 = time.process_time()
        from farm.shared_start import load_shared_start

        shared = load_shared_start(cfg.shared.path, inp.neuron_ids)  # the config's, or the one start_variant names
        early = None
        if cfg.specialize is not None:  # as the farm job: the layer-2 activations once for all neurons
            from farm.shared_features import early_key, load_early_features, save_early_features

            flip = cfg.specialize.flip
            key = early_key(shared, inp.bank_images, flip)
            fpath = Path(base.out_dir) / "shared_features" / key / "early.npy"  # the job's, when it made them
            if not (fpath.parent / "early.json").is_file():
                fpath = Path("farm_runs/probes") / f"early_{key}.npy"
            if not fpath.is_file():
                finfo = save_early_features(shared, inp.bank_images, fpath, flip=flip)
                print(f"layer-2 activations of the bank, once for all {len(inp.neuron_ids)} neurons: "
                      f"{finfo['cpu_seconds']:.0f} CPU-s", flush=True)
            early = load_early_features(fpath, len(inp.bank_images), flip, shared)
        mirror_targets = None
        if cfg.specialize is not None and cfg.specialize.tune_mirrors:  # the teacher's responses to the mirrors
            mirror_targets = _mirror_responses(inp, base)[:, col].astype(targets.dtype)
        cpu0 = time.process_time()
        start = neuron_start(shared, neuron, inp.bank_images, cfg.specialize, targets=targets, early=early,
                             mirror_targets=mirror_targets)
        start_cpu = time.process_time() - cpu0
        del early
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"spec": start.spec.to_dict(), "state_dict": start.state_dict(), "cpu_s": start_cpu}, cache)
        from farm.task_env import release_freed_memory

        release_freed_memory()  # the specialization's activations, as the farm task does
    real = _real_data(inp, neuron)
    if pre_variant:  # the start trained on: everything, end to end, before any pruning
        pcache = cache.with_name(cache.stem + "_pre_" + "_".join(pre_variant.split()).replace("=", "") + ".pt")
        if pcache.is_file():
            start, start_cpu = _load_start(pcache)
        else:
            pcfg = load_job_config(config, start_sets + ["compress.prune.tau=1.0", "compress.prune.iterative=false"]
                                   + [f"compress.{o}" for o in pre_variant.split()])
            cpu0 = time.process_time()
            r = compress_neuron(neuron, inp.bank_images, targets, inp.heldout_images, inp.heldout_targets[:, col],
                                CompressConfig.for_seed(pcfg.compress, pcfg.seed), threads=threads, distilled=start)
            start, start_cpu = r.model(), start_cpu + time.process_time() - cpu0
            torch.save({"spec": start.spec.to_dict(), "state_dict": start.state_dict(), "cpu_s": start_cpu}, pcache)
        start_variant = f"{start_variant} then {pre_variant}".strip()
    start_raw = evaluate_predictions(real.responses[None], predict(start, real.images)[None], False)["r2_raw"][0]
    fit = slice(0, 2000)  # training images (the bank's first ones): fit against generalization

    def train_r2(model) -> float:
        return squared_pearson(targets[fit], predict(model, inp.bank_images[fit]))
    print(f"{neuron} start ({start_variant or 'as configured'}{wtag}): {start_cpu:.0f} CPU-s, params "
          f"{start.spec.param_count():,}, filters {'-'.join(map(str, start.spec.filters))}, R² to the teacher "
          f"{squared_pearson(inp.heldout_targets[:, col], predict(start, inp.heldout_images)):.3f} (on 2,000 of its "
          f"training images {train_r2(start):.3f}), raw R² {start_raw:.3f}\n"
          "| variant | R² to teacher distilled / pruned / final | raw R² | params | filters | CPU-s (prune+retrain) "
          "| wall s: prune (with its retrains) / retrain |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    images = inp.bank_images
    if not variants:  # --start-only
        _calibrated(start, images, targets, inp.heldout_images, inp.heldout_targets[:, col], real)
    if mirror_bank:
        images, targets = _mirror_bank(inp, base, col, targets)
        print(f"mirror bank: {len(images)} (image, response) pairs", flush=True)
    if gaudy_bank:
        extra, extra_targets = _gaudy_bank(inp, base, col, gaudy_bank)
        images, targets = np.concatenate([images, extra]), np.concatenate([targets, extra_targets.astype(targets.dtype)])
        print(f"gaudy bank: {len(extra)} gaudy images appended, {len(images)} (image, response) pairs", flush=True)
    for v in variants:
        vcfg = load_job_config(config, start_sets + [f"compress.{o}" for o in v.split()])
        vc = CompressConfig.for_seed(vcfg.compress, vcfg.seed)
        cpu0 = time.process_time()
        r = compress_neuron(neuron, images, targets, inp.heldout_images,
                            inp.heldout_targets[:, col], vc, real=real, threads=threads,
                            distilled=start)
        cpu = time.process_time() - cpu0
        pr = "-" if r.r2_teacher_pruned is None else f"{r.r2_teacher_pruned:.3f}"
        print(f"| {neuron} {v or 'as configured'} | {r.r2_teacher_distilled:.3f} / {pr} / {r.r2_teacher_heldout:.3f} | "
              f"{r.r2_raw:.3f} | {r.param_count:,} | {'-'.join(map(str, r.filters))} | {cpu:.0f} | "
              f"{r.timings['prune_s']:.0f} / {r.timings['retrain_s']:.0f} |", flush=True)
        model = r.model()
        print(f"  final R² to the teacher on 2,000 of its training images: {train_r2(model):.3f}", flush=True)
        _calibrated(model, images, targets, inp.heldout_images, inp.heldout_targets[:, col], real)
        final = cache.with_name(f"final_{cache.stem[len('start_'):]}_{'_'.join(v.split()).replace('=', '') or 'config'}.pt")
        torch.save({"spec": model.spec.to_dict(), "state_dict": model.state_dict(), "cpu_s": cpu}, final)


def _calibrated(model, images, targets, held_images, held_targets, real, n_fit: int = 5000) -> None:
    """An output nonlinearity fitted afterwards: a cubic of the model's output least-squares fitted to
    the teacher's responses on ``n_fit`` training images; R² to the teacher (held-out) and raw R² with it."""
    from farm.distill import predict, squared_pearson
    from farm.metrics import r2_raw

    coef = np.polyfit(predict(model, images[:n_fit]).astype(np.float64), targets[:n_fit].astype(np.float64), 3)
    held, test = predict(model, held_images).astype(np.float64), predict(model, real.images).astype(np.float64)
    print(f"  with a cubic output fitted on {n_fit:,} training images: R² to the teacher "
          f"{squared_pearson(held_targets, np.polyval(coef, held)):.3f} (plain {squared_pearson(held_targets, held):.3f}), "
          f"raw R² {np.ravel(r2_raw(real.responses, np.polyval(coef, test)))[0]:.3f} "
          f"(plain {np.ravel(r2_raw(real.responses, test))[0]:.3f}); cubic {np.round(coef, 4).tolist()}", flush=True)


def _mirror_bank(inp, cfg, col: int, targets: np.ndarray):
    """The bank images with their left-right mirrors appended, and ``targets`` with the teacher's
    responses to the mirrors (``_mirror_responses``)."""
    images = np.concatenate([inp.bank_images, inp.bank_images[:, :, ::-1]])
    return images, np.concatenate([targets, _mirror_responses(inp, cfg)[:, col].astype(targets.dtype)])


def _gaudy_bank(inp, cfg, col: int, fraction: float):
    """The gaudy transforms of the bank's first ``fraction`` x N images and the teacher's responses to them
    (neuron ``col``; all neurons' responses computed once and cached under farm_runs/probes/ by the
    images' fingerprint)."""
    from farm.data.images import gaudy

    if not 0 < fraction <= 1:
        raise SystemExit(f"--gaudy-bank must be in (0, 1], got {fraction}")
    n = int(round(fraction * len(inp.bank_images)))
    images = np.concatenate([gaudy(inp.bank_images[i:min(i + 1000, n)]) for i in range(0, n, 1000)])  # float64 inside
    return images, _teacher_responses(inp, cfg, images)[:, col]


def _mirror_responses(inp, cfg) -> np.ndarray:
    """The teacher's responses (N, neurons) to the bank images' left-right mirrors
    (``compute_teacher_responses(mirror=True)``, cached under farm_runs/probes/ by the images' fingerprint)."""
    return _teacher_responses(inp, cfg, inp.bank_images, mirror=True)


def _teacher_responses(inp, cfg, images: np.ndarray, mirror: bool = False) -> np.ndarray:
    """The job's teacher's responses (N, neurons) to ``images`` (or their mirrors), cached under
    farm_runs/probes/ by the images' fingerprint; checked first against the bank's cached targets."""
    from farm.pipeline import prepare_sessions, prepare_teacher
    from farm.teacher_responses import compute_teacher_responses, shard_responses

    sessions, truth, sdir = prepare_sessions(cfg)
    teacher, info = prepare_teacher(cfg, sessions, truth, sdir, None)
    check = shard_responses(teacher, inp.bank_images[:64], batch_size=32)
    if not np.allclose(check, inp.bank_targets[:64], rtol=1e-3, atol=1e-4):
        raise SystemExit("the teacher's responses to 64 bank images differ from the cached bank targets")
    return compute_teacher_responses(teacher, images, batch_size=32, cache_dir="farm_runs/probes",
                                     teacher_id=info["teacher_id"], mirror=mirror).responses


def _load_start(path: Path):
    """A start cached by ``finish``: (the model, the CPU-seconds it took)."""
    import torch

    from farm.models.compact import CompactModel, CompactSpec

    blob = torch.load(path, weights_only=True)
    start = CompactModel(CompactSpec.from_dict(blob["spec"]))
    start.load_state_dict(blob["state_dict"])
    return start, blob["cpu_s"]


def fidelity(inp, config: str, job_id: str | None) -> None:
    """A finished job's compact models on 190923's second half (the test images, not the bank): R² to
    the teacher, to the slice of the job's shared start and raw R², per neuron and their medians;
    then the same for the paper's published per-neuron models. Reads the models from the job's
    MLflow store."""
    import tempfile

    from farm.compress import CompressConfig
    from farm.distill import predict, squared_pearson
    from farm.metrics import evaluate_predictions
    from farm.models.compact import load_compact
    from farm.models.published import load_published_session
    from farm.shared_start import load_shared_start
    from farm.tracking import Tracker

    from farm.config import load_job_config

    cfg = load_job_config(config)
    tr = Tracker.open(cfg.tracking_uri(), cfg.tracking.experiment)
    parent = tr.find_job(job_id or cfg.resolved_job_id(), "job")
    if parent is None:
        sys.exit(f"no job {job_id or cfg.resolved_job_id()} in {cfg.tracking_uri()}")
    runs = [r for r in tr.child_runs(parent, "neuron") if r.info.status == "FINISHED"]
    rd = inp.real["190923"]
    ids = rd["neuron_ids"]
    teacher = predict(load_shared_start(SHARED.format(k=200), ids), rd["images"])
    shared = load_shared_start(CompressConfig.from_dict(cfg.compress).shared.path, ids)
    start = predict(shared, rd["images"])
    col = {n: shared.spec.neuron_ids.index(n) for n in ids}

    def row(n, pred):
        i = ids.index(n)
        raw = evaluate_predictions(rd["responses"][i:i + 1], pred[None], False)["r2_raw"][0]
        start_raw = evaluate_predictions(rd["responses"][i:i + 1], start[None, :, col[n]], False)["r2_raw"][0]
        return (squared_pearson(teacher[:, col[n]], pred), squared_pearson(start[:, col[n]], pred), raw,
                squared_pearson(teacher[:, col[n]], start[:, col[n]]), start_raw)

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            n = r.data.tags["farm.neuron_id"]
            rows[n] = row(n, predict(load_compact(tr.download(r.info.run_id, "model", Path(tmp) / n)), rd["images"]))
    pub = {f"190923:{i}": m for i, m in enumerate(load_published_session("../shared/models/published", "190923"))}
    prow = {n: row(n, predict(pub[n], rd["images"])) for n in rows}
    print("| neuron | compact: R² to teacher / to start slice / raw | published: R² to teacher / to start slice / raw "
          "| start slice: R² to teacher |\n|---|---|---|---|")
    for n in sorted(rows, key=lambda n: int(n.split(":")[1])):
        print(f"| {n} | {' / '.join(f'{v:.3f}' for v in rows[n][:3])} | {' / '.join(f'{v:.3f}' for v in prow[n][:3])} "
              f"| {rows[n][3]:.3f} |")
    med = lambda d, j: float(np.median([v[j] for v in d.values()]))  # noqa: E731
    print(f"| median ({len(rows)}) | {med(rows, 0):.3f} / {med(rows, 1):.3f} / {med(rows, 2):.3f} | "
          f"{med(prow, 0):.3f} / {med(prow, 1):.3f} / {med(prow, 2):.3f} | {med(rows, 3):.3f} |")
    # a student whose error is independent of the neuron keeps R²(student, start) of the start's raw R²
    est = np.array([v[4] * v[1] for v in rows.values()])
    act = np.array([v[2] for v in rows.values()])
    print(f"raw R² of the start x the compact model's R² to it: median {np.median(est):.3f} (measured "
          f"{np.median(act):.3f}; per neuron within {np.median(np.abs(est - act)):.3f} (median), r = "
          f"{np.corrcoef(est, act)[0, 1]:.3f})")


def headroom(inp, goal: float) -> None:
    """What a median raw R² of ``goal`` over all of 190923's neurons asks of a compact model, start by
    start (the published shared models' slices, the teacher, averages of them): a compact model
    whose error is independent of the neuron keeps its start's raw R² times its R² to the start
    (``fidelity``'s last line), so neuron i needs R²(model, start) >= goal / raw_start(i). Half the
    neurons must reach the goal: the row's "needed" is the median neuron's requirement (the
    ceil(n/2)-th smallest; "-" when fewer than half of the starts' neurons are at the goal at all)."""
    from farm.distill import predict
    from farm.metrics import evaluate_predictions
    from farm.models.published import load_published_session
    from farm.shared_start import load_shared_start

    rd = inp.real["190923"]
    ids = rd["neuron_ids"]
    resp = rd["responses"]
    pred = {}
    for k in (25, 35, 50, 75, 100, 200):
        shared = load_shared_start(SHARED.format(k=k), ids)
        cols = [shared.spec.neuron_ids.index(i) for i in ids]
        pred[f"K{k}" if k != 200 else "K200 (the teacher)"] = predict(shared, rd["images"])[:, cols]
    pub = load_published_session("../shared/models/published", "190923")
    pred["published per-neuron models"] = np.stack([predict(m, rd["images"]) for m in pub], 1)
    t = pred["K200 (the teacher)"]
    pred["mean of K35, teacher"] = (pred["K35"] + t) / 2
    pred["mean of K50, teacher"] = (pred["K50"] + t) / 2
    pred["mean of K25, K35, K50, teacher"] = (pred["K25"] + pred["K35"] + pred["K50"] + t) / 4
    pred["mean of K50, K75, K100, teacher"] = (pred["K50"] + pred["K75"] + pred["K100"] + t) / 4
    pred["mean of K25..K100, teacher (6 models)"] = sum(
        pred[f"K{k}"] for k in (25, 35, 50, 75, 100)) / 6 + t / 6
    n = len(ids)
    half = (n + 1) // 2
    print(f"| start | median raw R² ({n}) | neurons at >= {goal:g} | R² to it the median neuron needs | "
          f"per neuron: needed R² (sorted) |\n|---|---|---|---|---|")
    for name, p in pred.items():
        raw = evaluate_predictions(resp, p.T, False)["r2_raw"]
        need = np.sort(goal / np.maximum(raw, 1e-9))
        at = int((raw >= goal).sum())
        needed = f"{need[half - 1]:.3f}" if at >= half else "-"
        print(f"| {name} | {np.median(raw):.3f} | {at} | {needed} | "
              f"{' '.join(f'{v:.3f}' for v in need[:half + 3])} ... |", flush=True)


def ceilings(inp, selection: str) -> None:
    """R² to the teacher (held-out bank images) and raw R² on 190923's second half of the published
    shared models' slices at K = 5..50 early filters, of the teacher itself (K = 200) and of the
    paper's published per-neuron compact models (distilled from ITS ensemble, not from this teacher):
    what a start, and a model of the paper's size, can reach."""
    from farm.distill import predict, squared_pearson
    from farm.metrics import evaluate_predictions
    from farm.models.compact import output_slice
    from farm.models.published import load_published_session
    from farm.selection import parse_neuron_selection
    from farm.shared_start import load_shared_start

    neurons = parse_neuron_selection(selection, inp.neuron_ids)
    cols = [inp.neuron_ids.index(n) for n in neurons]
    rd = inp.real["190923"]
    resp = np.stack([rd["responses"][rd["neuron_ids"].index(n)] for n in neurons])  # averaged if raw

    def row(what, held, real, params):  # held (M, n) / real (R, n): predictions for ``neurons``
        r2 = [squared_pearson(inp.heldout_targets[:, c], held[:, j]) for j, c in enumerate(cols)]
        raw = evaluate_predictions(resp, real.T, False)["r2_raw"]
        print(f"| {what} | {np.median(r2):.3f} | {np.median(raw):.3f} | {' '.join(f'{v:.3f}' for v in raw)} | "
              f"{int(np.median(params)):,} |", flush=True)

    print(f"| start | median R² to teacher ({len(neurons)} neurons) | median raw R² | raw R² per neuron | "
          "median params |\n|---|---|---|---|---|")
    for k in (5, 10, 25, 35, 50, 200):
        shared = load_shared_start(SHARED.format(k=k), neurons)  # one pass: its outputs are all neurons'
        idx = [shared.spec.neuron_ids.index(n) for n in neurons]
        held, real = predict(shared, inp.heldout_images)[:, idx], predict(shared, rd["images"])[:, idx]
        row(f"slice of the published shared model, K={k}" + (" (the teacher)" if k == 200 else ""), held, real,
            [output_slice(shared, neurons[0]).spec.param_count()])
    published = {f"190923:{i}": m for i, m in enumerate(load_published_session("../shared/models/published", "190923"))}
    models = [published[n] for n in neurons]
    row("published per-neuron compact model", np.stack([predict(m, inp.heldout_images) for m in models], 1),
        np.stack([predict(m, rd["images"]) for m in models], 1), [m.spec.param_count() for m in models])


if __name__ == "__main__":
    main()

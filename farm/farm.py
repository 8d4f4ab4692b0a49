"""Ray at the edge: broadcast the teacher's responses once, one task per neuron, retries, resume.

The driver puts the bank images and the teacher's responses (images x neurons) into the object store
once; every task reads them zero-copy, compresses one neuron with ``farm.compress`` and logs one
MLflow child run. Results are handled as they finish (``ray.wait``) with a progress bar. A system
failure (a killed worker) is retried by Ray; an exception inside a neuron's compression ends that
neuron's run FAILED with the error as a tag, and the job goes on. Re-running a job skips neurons
that already have a FINISHED run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from farm.tracking import Tracker

if TYPE_CHECKING:
    from farm.compress import CompressConfig

log = logging.getLogger(__name__)


# -- Ray set-up -------------------------------------------------------------------------------------
def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = None, env_vars: dict | None = None) -> None:
    """Connect to a cluster (``address`` or RAY_ADDRESS, e.g. inside a Ray Job) or start local Ray."""
    import ray

    if ray.is_initialized():
        return
    env = {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"), **(env_vars or {})}
    env.pop("MLFLOW_RUN_ID", None)  # would override parent_run_id in workers (mlflow#15713)
    runtime_env = {"env_vars": env}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a Ray Job, Ray merges the job's runtime env with this one and refuses an env var
        # set in both: the job's own values win (they are in this driver's environment already).
        job_env = _job_env_vars()
        runtime_env = {"env_vars": {k: v for k, v in env.items() if k not in job_env}}
        # num_cpus/object_store_memory must not be given when joining a cluster (ecosystem §7.13).
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local": always a fresh local instance, never a cluster that an earlier
        # `ray start` left recorded in /tmp/ray (num_cpus would then be refused).
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                 include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=True)


def init_job_ray(cfg, tracker: Tracker) -> None:
    """Ray for a job config (``farm.*`` resources), its workers logging to the job's store."""
    init_ray(cfg.farm.address, cfg.farm.local_num_cpus, cfg.farm.object_store_memory,
             env_vars={"MLFLOW_TRACKING_URI": tracker.uri})


def _job_env_vars() -> dict:
    """The env_vars of the Ray Job this driver runs in ({} outside a Ray Job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    from ray.job_config import JobConfig

    return dict((JobConfig.from_json(json.loads(raw)).runtime_env or {}).get("env_vars") or {})


def task_threads() -> int:
    """Threads for torch in this task: Ray sets OMP_NUM_THREADS to the task's num_cpus."""
    return max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1"))))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# -- the work of one neuron -------------------------------------------------------------------------
@dataclass
class NeuronInputs:
    """What a neuron task needs besides its column index. Arrays are shared through the object store.

    bank_images uint8 (N,H,W,3) and bank_targets float32 (N, n_neurons): distillation pairs.
    heldout_images / heldout_targets: pruning + evaluation images (never trained on).
    real: optional per-session real data {"images": (M,H,W,3), "responses": (n_neurons_in_session,
    M, repeats), "has_repeats": bool, "neuron_ids": [...]} keyed by session id.
    ground_truth_heldout: optional float32 (n_heldout, n_neurons) true rates (simulated data).
    shared_start: optional shared student (a factorized-readout CompactModel over these neurons, the
        "shared" recipe's stage 1): each neuron starts from its slice instead of a fresh student.
    teacher_real: optional {neuron id: {"teacher_r2_er" or "teacher_r2_raw": value}}, the teacher's
        score on the same recorded images as the compact model's, logged next to it.
    """

    neuron_ids: list
    bank_images: Any
    bank_targets: Any
    heldout_images: Any
    heldout_targets: Any
    real: dict = field(default_factory=dict)
    ground_truth_heldout: Any = None
    shared_start: Any = None
    teacher_real: dict = field(default_factory=dict)


def neuron_params(neuron_id: str, compress_cfg: "dict | CompressConfig", seed: int) -> dict:
    from farm.compress import CompressConfig

    try:
        cfg = CompressConfig.from_dict(compress_cfg)
    except ValueError:  # logged for a failed neuron too, whatever its section
        cfg = CompressConfig()
    return {"neuron_id": neuron_id, "session": neuron_id.split(":", 1)[0], "recipe": cfg.recipe or "custom",
            "tau": cfg.prune.tau, "criterion": cfg.prune.criterion, "seed": seed}


def result_metrics(result, ground_truth_r2: float | None = None) -> dict:
    """The per-neuron metrics the issue names, from a CompressionResult."""
    f = list(result.filters)
    m = {"param_count": result.param_count, "trainable_params": result.trainable_params,
         "total_filters": result.total_filters,
         **{f"filters_layer{i}": k for i, k in enumerate(f)},
         "r2_teacher_heldout": result.r2_teacher_heldout,
         "r2_teacher_distilled": getattr(result, "r2_teacher_distilled", None)}
    for key in ("r2_er", "r2_raw", "r_real"):
        v = getattr(result, key, None)
        if v is not None:
            m[key] = v
    t = getattr(result, "timings", {}) or {}
    for key in ("start_s", "distill_s", "prune_s", "retrain_s", "cpu_s"):  # start: the neuron's specialization
        if key in t:
            m[key[:-2] + "_seconds"] = t[key]
    if ground_truth_r2 is not None:
        m["r2_ground_truth"] = ground_truth_r2
    return m


def log_result(tracker: Tracker, parent_run_id: str, result, params: dict, metrics: dict,
               register: bool = False, kind: str = "neuron", run_name: str | None = None,
               tags: dict | None = None) -> str:
    """Log one CompressionResult as a child run: model, pruning history (CSV + plot), filter figure."""
    import csv

    from farm import plots

    model = result.model()
    with tempfile.TemporaryDirectory() as d:
        mdir = Path(d) / "model"
        result.save(mdir)
        hdir = Path(d) / "history"
        hdir.mkdir()
        hist = list(result.history or [])
        if hist:
            keys = sorted({k for h in hist for k in h})
            with open(hdir / "pruning_history.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys)
                w.writeheader()
                w.writerows(hist)
        figs = [(plots.filter_weights_figure(model, title=f"{result.neuron_id}: filters {tuple(result.filters)}"),
                 "figures/filter_weights.png")]
        if hist:
            figs.append((plots.pruning_history_figure(hist, title=result.neuron_id),
                         "figures/pruning_history.png"))
        arts = [(mdir, "model")] + ([(hdir, "history")] if hist else [])
        try:
            rid = tracker.log_child(parent_run_id, result.neuron_id, params, metrics, arts, figs,
                                    kind=kind, run_name=run_name, tags=tags)
        finally:
            import matplotlib.pyplot as plt

            for fig, _ in figs:
                plt.close(fig)
    if register:
        tracker.register_model(rid, f"compact-{result.neuron_id.replace(':', '-')}", "model")
    return rid


def _real_data(inputs: NeuronInputs, neuron_id: str):
    """The neuron's recorded responses (RealData) when its session is in ``inputs.real``, else None."""
    from farm.compress import RealData

    rd = (inputs.real or {}).get(neuron_id.split(":", 1)[0])
    if rd is None or neuron_id not in rd["neuron_ids"]:
        return None
    row = list(rd["neuron_ids"]).index(neuron_id)
    return RealData(images=rd["images"], responses=rd["responses"][row], has_repeats=bool(rd["has_repeats"]))


def _log_compressed(neuron_id: str, result, inputs: NeuronInputs, params: dict, tracker: Tracker,
                    parent_run_id: str, register: bool, t0: float) -> dict:
    """Score a CompressionResult against the ground truth (simulated data) and log its child run."""
    from farm.metrics import r2_raw

    gt_r2 = None
    if inputs.ground_truth_heldout is not None:
        from farm.models.base import CompactTeacher

        col = inputs.neuron_ids.index(neuron_id)
        pred = CompactTeacher([result.model()], neuron_ids=[neuron_id]).predict(inputs.heldout_images)
        gt_r2 = float(r2_raw(inputs.ground_truth_heldout[:, col][None], pred[:, 0][None])[0])
    metrics = result_metrics(result, gt_r2)
    metrics.update((inputs.teacher_real or {}).get(neuron_id, {}))
    rid = log_result(tracker, parent_run_id, result, params, metrics, register=register)
    return {"neuron_id": neuron_id, "status": "FINISHED", "run_id": rid, "seconds": time.time() - t0, **metrics}


def _failed(neuron_id: str, e: BaseException, tracker: Tracker, parent_run_id: str, params: dict) -> dict:
    err = f"{type(e).__name__}: {e}"
    log.error("neuron %s failed: %s\n%s", neuron_id, err, traceback.format_exc())
    tracker.log_failed_child(parent_run_id, neuron_id, err + "\n" + traceback.format_exc(), params)
    return {"neuron_id": neuron_id, "status": "FAILED", "error": err}


def compress_and_log(neuron_id: str, inputs: NeuronInputs, compress_cfg: dict, seed: int,
                     tracker: Tracker, parent_run_id: str, device: str = "auto",
                     register: bool = False) -> dict:
    """Compress one neuron and log its child run. Never raises for the neuron's own errors: they
    end in a FAILED run and a ``{"status": "FAILED"}`` summary (system failures still propagate)."""
    return compress_group_and_log([neuron_id], inputs, compress_cfg, seed, tracker, parent_run_id, device,
                                  register)[0]


def compress_group_and_log(neuron_ids: Sequence[str], inputs: NeuronInputs, compress_cfg: dict, seed: int,
                           tracker: Tracker, parent_run_id: str, device: str = "auto",
                           register: bool = False) -> list[dict]:
    """Compress several neurons in one task (one packed distillation, ``farm.compress.compress_neurons``)
    and log a child run each; one row per neuron. A neuron already FINISHED (a retried task that had
    logged it) is SKIPPED; an error fails the neurons it concerns (all of them in distillation, one in
    its own pruning or logging), never the task."""
    import torch

    from farm.compress import CompressConfig, check_inputs, compress_neuron, compress_neurons
    from farm.specialize import neuron_start

    threads = task_threads()
    torch.set_num_threads(threads)  # workers are reused: fix the pool size per task (ecosystem §5a)
    params = {n: neuron_params(n, compress_cfg, seed) for n in neuron_ids}
    rows = {}
    for n in neuron_ids:  # a retried task (worker killed after logging) must not log a neuron twice
        if n in tracker.finished_neurons(parent_run_id, neuron_id=n):
            rows[n] = {"neuron_id": n, "status": "SKIPPED"}
    for n in neuron_ids:  # bad input fails its own neuron, not the others packed with it
        if n not in rows:
            try:
                col = inputs.neuron_ids.index(n)
                check_inputs(inputs.bank_images, inputs.bank_targets[:, col], inputs.heldout_images,
                             inputs.heldout_targets[:, col])
            except Exception as e:
                rows[n] = _failed(n, e, tracker, parent_run_id, params[n])
    todo = [n for n in neuron_ids if n not in rows]
    t0 = time.time()
    results = []
    if todo and inputs.shared_start is not None:  # each neuron from its slice of the shared student
        cfg = CompressConfig.for_seed(compress_cfg, seed)
        kept = []
        for n in todo:
            try:
                col = inputs.neuron_ids.index(n)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                start = neuron_start(inputs.shared_start, n, inputs.bank_images, cfg.specialize,
                                     targets=inputs.bank_targets[:, col])
                start_s = time.perf_counter() - wall0
                result = compress_neuron(
                    n, inputs.bank_images, inputs.bank_targets[:, col], inputs.heldout_images,
                    inputs.heldout_targets[:, col], cfg, real=_real_data(inputs, n),
                    device=resolve_device(device), threads=threads, distilled=start)
                result.timings = {**(result.timings or {}), "start_s": start_s,
                                  "cpu_s": time.process_time() - cpu0}
                results.append(result)
                kept.append(n)
            except Exception as e:
                rows[n] = _failed(n, e, tracker, parent_run_id, params[n])
        todo = kept
    elif todo:
        try:
            cols = [inputs.neuron_ids.index(n) for n in todo]
            cfg = CompressConfig.for_seed(compress_cfg, seed)
            cpu0 = time.process_time()
            results = compress_neurons(todo, inputs.bank_images, inputs.bank_targets[:, cols],
                                       inputs.heldout_images, inputs.heldout_targets[:, cols], cfg,
                                       real=[_real_data(inputs, n) for n in todo], device=resolve_device(device),
                                       threads=threads)
            cpu_each = (time.process_time() - cpu0) / max(1, len(results))  # a packed group's, shared equally
            for r in results:
                r.timings = {**(r.timings or {}), "cpu_s": cpu_each}
        except Exception as e:  # the neurons failed; the job goes on
            for n in todo:
                rows[n] = _failed(n, e, tracker, parent_run_id, params[n])
    for n, result in zip(todo, results):
        try:
            rows[n] = _log_compressed(n, result, inputs, params[n], tracker, parent_run_id, register, t0)
        except Exception as e:
            rows[n] = _failed(n, e, tracker, parent_run_id, params[n])
    return [rows[n] for n in neuron_ids]


# -- the job ----------------------------------------------------------------------------------------
@dataclass
class JobResult:
    job_id: str
    parent_run_id: str
    rows: list  # one summary dict per neuron (FINISHED rows carry the metrics)
    skipped: list  # neurons already finished in an earlier run of the job

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r.get("status") == "FAILED"]


def run_neurons(neurons: Sequence[str], inputs: NeuronInputs, compress_cfg: dict, seed: int,
                tracker: Tracker, parent_run_id: str, num_cpus: float = 1, num_gpus: float = 0,
                max_retries: int = 3, device: str = "auto", register: bool = False,
                progress: bool = True, on_result: Callable[[dict], None] | None = None,
                pack: int = 1) -> list[dict]:
    """One Ray task per neuron (per ``pack`` neurons: one packed distillation each) over shared
    inputs; results handled as they finish."""
    import ray

    remote = ray.remote(_neuron_task).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False,
        name="compress_neuron")
    # Every array goes into the object store once; as top-level task arguments Ray hands them to
    # each task zero-copy (numpy arrays are read straight from shared memory).
    refs = [ray.put(a) for a in (inputs.bank_images, inputs.bank_targets, inputs.heldout_images,
                                 inputs.heldout_targets, inputs.real or {}, inputs.ground_truth_heldout,
                                 inputs.shared_start, inputs.teacher_real or {})]
    ids = list(inputs.neuron_ids)
    if int(pack) < 1:
        raise ValueError(f"farm.pack must be >= 1 (neurons per task), got {pack}")
    neurons = list(neurons)
    groups = [neurons[i:i + int(pack)] for i in range(0, len(neurons), int(pack))]
    pending = {remote.remote(g, ids, *refs, compress_cfg, seed, tracker, parent_run_id, device, register): g
               for g in groups}
    def lost(nid, err):  # retries exhausted (e.g. the worker died every time)
        tracker.log_failed_child(parent_run_id, nid, err, neuron_params(nid, compress_cfg, seed))

    return gather(pending, "neurons", "neuron", progress, on_lost=lost, on_result=on_result)


def gather(pending: dict, desc: str, unit: str, progress: bool = True,
           on_lost: Callable[[str, str], None] | None = None,
           on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Results of Ray tasks ``{ref: neuron id}`` (or ``{ref: [neuron ids]}`` for tasks returning one
    row per neuron of a group) as they finish (``ray.wait``), with a tqdm bar over neurons.

    A row is a dict with "neuron_id" and "status". A task that raised (its retries exhausted) gives
    ``{"status": "FAILED", "error": ...}`` for each of its neurons, after ``on_lost(neuron_id, error)``."""
    import ray
    from tqdm import tqdm

    pending = dict(pending)
    rows = []
    total = sum(len(v) if isinstance(v, list) else 1 for v in pending.values())
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            key = pending.pop(ref)
            group = key if isinstance(key, list) else [key]
            try:
                got = ray.get(ref)
                got = got if isinstance(key, list) else [got]
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
                got = []
                for nid in group:
                    if on_lost:
                        on_lost(nid, err)
                    got.append({"neuron_id": nid, "status": "FAILED", "error": err})
            for row in got:
                rows.append(row)
                if on_result:
                    on_result(row)
                bar.set_postfix_str(f"{row['neuron_id']} {row['status']}")
                bar.update(1)
    bar.close()
    return rows


def _neuron_task(group, neuron_ids, bank_images, bank_targets, heldout_images, heldout_targets,
                 real, ground_truth_heldout, shared_start, teacher_real, compress_cfg, seed, tracker,
                 parent_run_id, device, register):
    inputs = NeuronInputs(neuron_ids, bank_images, bank_targets, heldout_images, heldout_targets,
                          real, ground_truth_heldout, shared_start, teacher_real)
    return compress_group_and_log(group, inputs, compress_cfg, seed, tracker, parent_run_id, device, register)


# -- teacher responses over a big bank: one Ray task per shard ----------------------------------------
def _responses_task(teacher, bank_dir: str, shard: int, batch_size: int):
    import torch

    from farm.data.images import ImageBank
    from farm.teacher_responses import shard_responses

    torch.set_num_threads(task_threads())
    ids, images, _ = ImageBank(bank_dir).read_shard(shard)
    return ids, shard_responses(teacher, images, batch_size)


def ray_shard_runner(num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3):
    """A ``compute_teacher_responses`` runner: the teacher is put in the object store once and every
    bank shard is one Ray task that reads its own images from the bank folder (which must be
    readable by every worker: local Ray, or a shared filesystem on a cluster); results are gathered
    as they finish (``ray.wait``) and returned in shard order."""
    import ray

    def run(teacher, bank, batch_size: int, progress=None):
        remote = ray.remote(_responses_task).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                     max_retries=max_retries)
        ref = ray.put(teacher)
        bank_dir = str(Path(bank.directory).resolve())
        pending = {remote.remote(ref, bank_dir, i, batch_size): i for i in range(len(bank.shards))}
        parts, done = {}, 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                i = pending.pop(r)
                parts[i] = ray.get(r)
                done += len(parts[i][0])
                if progress is not None:
                    progress(done, len(bank))
        return [parts[i] for i in range(len(bank.shards))]

    return run


# -- analysis at scale: maximizing natural images over a bank ----------------------------------------
def _rank_chunk_task(model_dirs, bank_dir, first, stop, top_k, params_dict):
    """Rank bank images [first, stop) by the outputs of the models saved in ``model_dirs``."""
    import torch

    from farm.analysis.natural import NaturalParams, rank_natural_images
    from farm.data.images import ImageBank
    from farm.models.compact import load_compact

    torch.set_num_threads(task_threads())
    models = [load_compact(d) for d in model_dirs]
    ids = np.arange(first, stop)
    images = ImageBank(bank_dir).read(ids)
    params = NaturalParams(**params_dict) if params_dict else NaturalParams()
    return rank_natural_images(models, [(ids.astype(str), images)], top_k=top_k, params=params)


def rank_bank_parallel(model_dirs: Sequence[str], bank_dir: str, top_k: int = 10, models_per_task: int = 8,
                       images_per_task: int = 10_000, params: dict | None = None, num_cpus: float = 1):
    """Maximizing natural images of many compact models over a whole image bank, as Ray tasks over
    (group of models) x (chunk of the bank); each task reads only its chunk, partial top-k lists are
    merged per group (``merge_topk``) and the groups joined (``concat_columns``). Equals ranking every
    image with every model at once.

    model_dirs: saved compact models (spec.json + state_dict.pt). bank_dir: an ImageBank folder.
    Returns a ``farm.analysis.natural.NaturalRanking`` whose columns follow ``model_dirs``.
    """
    import ray

    from farm.analysis.natural import concat_columns, merge_topk
    from farm.data.images import ImageBank

    n = len(ImageBank(bank_dir))
    chunks = [(a, min(a + images_per_task, n)) for a in range(0, n, images_per_task)]
    remote = ray.remote(_rank_chunk_task).options(num_cpus=num_cpus, max_retries=3)
    groups = [[str(d) for d in model_dirs[i:i + models_per_task]]
              for i in range(0, len(model_dirs), models_per_task)]
    refs = [[remote.remote(g, str(bank_dir), a, b, top_k, params or {}) for a, b in chunks] for g in groups]
    return concat_columns([merge_topk(ray.get(r)) for r in refs])

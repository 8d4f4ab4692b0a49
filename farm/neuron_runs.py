"""The work of one neuron task: compress the neuron(s) (``farm.compress``) from the shared inputs and
log one MLflow child run each (model, metrics, figures); a failure ends that neuron's run FAILED.

    rows = compress_group_and_log(["190923:0"], inputs, compress_cfg, seed, tracker, parent_run_id)
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence


from farm.tracking import Tracker

if TYPE_CHECKING:
    from farm.compress import CompressConfig

log = logging.getLogger(__name__)
from farm.task_env import init_task, release_freed_memory, resolve_device


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
    shared_features: optional {"path", "flip", "n_images", "maps"}: the shared student's layer-2
        activations of bank_images in a file and ("maps", optional) {neuron id: file} its map of each
        neuron on them (``farm.shared_features``), memory-mapped by each specialization.
    bank_mirror_targets: optional float32 (N, n_neurons): the teacher's responses to the left-right
        mirrors of bank_images (for trainings with ``DistillConfig.mirrors``).
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
    shared_features: Any = None
    bank_mirror_targets: Any = None

    def mirror_column(self, col: int):
        """The teacher's responses to the bank's mirrors for neuron column ``col``, or None."""
        return None if self.bank_mirror_targets is None else self.bank_mirror_targets[:, col]

    def _features_for(self, specialize) -> dict | None:
        f = self.shared_features
        if not f or specialize is None or bool(specialize.flip) != bool(f["flip"]) \
                or int(f["n_images"]) != len(self.bank_images):
            return None
        return f

    def early_features(self, specialize):
        """The memory-mapped layer-2 activations for a specialization with ``specialize`` (a
        SpecializeConfig), or None when there are none for it (then it computes its own)."""
        f = self._features_for(specialize)
        if f is None:
            return None
        from farm.shared_features import load_early_features

        return load_early_features(f["path"], len(self.bank_images), bool(f["flip"]), self.shared_start)

    def shared_map(self, specialize, neuron_id: str):
        """The shared student's memory-mapped map of ``neuron_id`` on the bank (and its mirrors) for a
        specialization with ``specialize``, or None when there is none (then it computes its own)."""
        f = self._features_for(specialize)
        path = ((f or {}).get("maps") or {}).get(neuron_id)
        if path is None:
            return None
        from farm.shared_features import load_neuron_map

        n = len(self.bank_images) * (2 if f["flip"] else 1)
        return load_neuron_map(path, n, self.shared_start)


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
    from farm.compress import CompressConfig, check_inputs, compress_neuron, compress_neurons
    from farm.specialize import neuron_start

    threads = init_task()
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
        early = inputs.early_features(cfg.specialize)
        kept = []
        for n in todo:
            try:
                col = inputs.neuron_ids.index(n)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                start = neuron_start(inputs.shared_start, n, inputs.bank_images, cfg.specialize,
                                     targets=inputs.bank_targets[:, col], early=early,
                                     mirror_targets=inputs.mirror_column(col),
                                     shared_map=inputs.shared_map(cfg.specialize, n))
                start_s = time.perf_counter() - wall0
                release_freed_memory()  # the specialization's activations: the peak of the task
                result = compress_neuron(
                    n, inputs.bank_images, inputs.bank_targets[:, col], inputs.heldout_images,
                    inputs.heldout_targets[:, col], cfg, real=_real_data(inputs, n),
                    device=resolve_device(device), threads=threads, distilled=start,
                    mirror_targets=inputs.mirror_column(col))
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
                                       threads=threads, mirror_targets=(None if inputs.bank_mirror_targets is None
                                                                        else inputs.bank_mirror_targets[:, cols]))
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
    release_freed_memory()  # Ray keeps the worker for the next task; its peak need not stay with it
    return [rows[n] for n in neuron_ids]


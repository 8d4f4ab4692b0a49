"""Ray Tune at the edge: sweep pruning thresholds from each neuron's cached distilled model.

Distillation is the expensive step and pruning thresholds only change what follows it, so every
selected neuron is distilled once (a Ray task; the model is cached on disk and reused by later runs),
then Tune runs one trial per (neuron, tau, criterion): prune + retrain from the cached model, log a
child run, report R² to the teacher and the parameter count. Per neuron the Pareto front (fewer
parameters, higher R²) is computed and the chosen model is the smallest one whose R² to the teacher
is at least (1 - eps) x the distilled model's. A sweep can be resumed (``Tuner.restore``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from farm.fanout import task_memory
from farm.neuron_runs import NeuronInputs, log_result, result_metrics
from farm.task_env import init_task, resolve_device, task_threads
from farm.selection import neuron_slug
from farm.tracking import Tracker

log = logging.getLogger(__name__)


def pareto_front(params: Sequence[float], r2: Sequence[float]) -> list[int]:
    """Indices of points not dominated by another (another has <= params and >= R², one strictly)."""
    p, r = np.asarray(params, float), np.asarray(r2, float)
    front = []
    for i in range(len(p)):
        dominated = np.any((p <= p[i]) & (r >= r[i]) & ((p < p[i]) | (r > r[i])))
        if not dominated and np.isfinite(r[i]):
            front.append(i)
    return sorted(front, key=lambda i: p[i])


def choose_model(params: Sequence[float], r2: Sequence[float], r2_distilled: float, eps: float) -> int | None:
    """The smallest model whose R² >= (1 - eps) * the distilled model's; None when none qualifies."""
    p, r = np.asarray(params, float), np.asarray(r2, float)
    ok = np.flatnonzero(r >= (1.0 - eps) * r2_distilled)
    if len(ok) == 0:
        return None
    return int(ok[np.lexsort((-r[ok], p[ok]))[0]])


def distill_cached(neuron_id: str, inputs: NeuronInputs, compress_cfg: dict, seed: int, cache_dir: str,
                   device: str = "auto") -> dict:
    """Distill one neuron unless its model is already cached in ``cache_dir``; returns its summary."""
    from farm.compress import CompressConfig, distill_neuron
    from farm.distill import predict, squared_pearson
    from farm.models.compact import load_compact, save_compact

    init_task()
    d = Path(cache_dir) / neuron_slug(neuron_id)
    info_path = d / "distilled.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    col = list(inputs.neuron_ids).index(neuron_id)
    cfg = CompressConfig.for_seed(compress_cfg, seed)
    t0 = time.time()
    if inputs.shared_start is not None:  # the "shared" recipe: the neuron's slice is its start
        from farm.specialize import neuron_start

        model = neuron_start(inputs.shared_start, neuron_id, inputs.bank_images, cfg.specialize,
                             targets=inputs.bank_targets[:, col], early=inputs.early_features(cfg.specialize),
                             mirror_targets=inputs.mirror_column(col),
                             shared_map=inputs.shared_map(cfg.specialize, neuron_id))
    else:
        model = distill_neuron(neuron_id, inputs.bank_images, inputs.bank_targets[:, col], cfg,
                               device=resolve_device(device), threads=task_threads(),
                               mirror_targets=inputs.mirror_column(col))
    r2 = squared_pearson(predict(model, inputs.heldout_images), inputs.heldout_targets[:, col])
    save_compact(model, d)
    info = {"neuron_id": neuron_id, "r2_teacher_distilled": float(r2), "seconds": time.time() - t0,
            "dir": str(d)}
    tmp = info_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(info_path)  # the marker last: a half-written cache is never taken for a finished one
    load_compact(d)  # fail here, not in every trial, if the files are unreadable
    return info


def _trial(config: dict, inputs: NeuronInputs, compress_cfg: dict, seed: int, cache_dir: str,
           tracker: Tracker, parent_run_id: str, device: str):
    """One Tune trial: prune + retrain the cached distilled model of config['neuron_id']."""
    from ray import tune

    from farm.compress import CompressConfig, prune_and_retrain
    from farm.models.compact import load_compact

    import ray

    init_task()
    tracker = tracker.from_node(ray.util.get_node_ip_address())
    nid, tau, criterion = config["neuron_id"], float(config["tau"]), config["criterion"]
    col = list(inputs.neuron_ids).index(nid)
    base = CompressConfig.from_dict(compress_cfg)
    cfg = CompressConfig.for_seed(base, seed, prune=dataclasses.replace(base.prune, tau=tau, criterion=criterion))
    distilled = load_compact(Path(cache_dir) / neuron_slug(nid))
    result = prune_and_retrain(distilled, nid, inputs.bank_images, inputs.bank_targets[:, col],
                               inputs.heldout_images, inputs.heldout_targets[:, col], cfg,
                               device=resolve_device(device), threads=task_threads(),
                               mirror_targets=inputs.mirror_column(col))
    metrics = result_metrics(result)
    params = {"neuron_id": nid, "session": nid.split(":", 1)[0], "tau": tau, "criterion": criterion,
              "seed": seed}
    rid = log_result(tracker, parent_run_id, result, params, metrics, kind="trial",
                     run_name=f"trial-{nid}-tau{tau:g}-{criterion}")
    tune.report({**{k: v for k, v in metrics.items() if v is not None}, "run_id": rid})


@dataclass
class SweepResult:
    neuron_id: str
    r2_teacher_distilled: float
    trials: list = field(default_factory=list)  # dicts: tau, criterion, param_count, r2_teacher_heldout, run_id
    front: list = field(default_factory=list)  # indices into trials
    chosen: int | None = None

    @property
    def chosen_trial(self) -> dict | None:
        return None if self.chosen is None else self.trials[self.chosen]


def _trial_progress(total: int):
    """A Tune callback drawing a tqdm bar of finished trials (Tune's own trial tables are switched off)."""
    from ray.tune import Callback
    from tqdm import tqdm

    class TrialBar(Callback):
        def __init__(self):
            self.bar = None

        def __getstate__(self):  # Tune saves its run config with the experiment: drop the live bar
            return {"bar": None}

        def _tick(self, trial, status):
            if self.bar is None:
                self.bar = tqdm(total=total, desc="sweep trials", unit="trial", dynamic_ncols=True)
            c = trial.config
            self.bar.set_postfix_str(f"{c.get('neuron_id')} tau={c.get('tau', float('nan')):.3g} "
                                     f"{c.get('criterion')} {status}")
            self.bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._tick(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._tick(trial, "ERROR")

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

    return TrialBar()


def run_sweep(neurons: Sequence[str], inputs: NeuronInputs, compress_cfg: dict, taus: Sequence[float],
              criteria: Sequence[str], tracker: Tracker, parent_run_id: str, storage_path: str,
              name: str, seed: int = 0, eps: float = 0.02, search: str = "grid", num_samples: int = 1,
              max_concurrent: int = 2, max_failures: int = 2, num_cpus: float = 1, num_gpus: float = 0,
              device: str = "auto", progress: bool = True, memory_gb: float | None = None) -> list[SweepResult]:
    """Distill each neuron once, then a Tune sweep over (tau, criterion); see the module docstring."""
    import ray
    from ray import tune

    from farm import plots

    storage_path = str(Path(storage_path).resolve())
    cache_dir = str(Path(storage_path) / name / "distilled")
    os.makedirs(cache_dir, exist_ok=True)
    neurons = list(neurons)

    # 1. distill once per neuron, in parallel (cached across runs of the sweep)
    if progress:
        print(f"sweep: distilling {len(neurons)} neuron(s) once (cached in {cache_dir}) ...", flush=True)
    refs = [ray.put(a) for a in (inputs.bank_images, inputs.bank_targets, inputs.heldout_images,
                                 inputs.heldout_targets, inputs.shared_start, inputs.shared_features,
                                 inputs.bank_mirror_targets)]
    remote = ray.remote(_distill_task).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=3,
                                               **task_memory(memory_gb))
    infos = {i["neuron_id"]: i for i in ray.get([
        remote.remote(n, list(inputs.neuron_ids), *refs, compress_cfg, seed, cache_dir, device)
        for n in neurons])}

    # 2. Tune over thresholds; arrays go to the object store once through with_parameters
    if search == "grid":
        space = {"neuron_id": tune.grid_search(neurons), "tau": tune.grid_search(list(taus)),
                 "criterion": tune.grid_search(list(criteria))}
        samples = 1
    elif search == "random":
        space = {"neuron_id": tune.grid_search(neurons), "tau": tune.uniform(min(taus), max(taus)),
                 "criterion": tune.choice(list(criteria))}
        samples = num_samples
    else:
        raise ValueError(f"sweep.search must be 'grid' or 'random', got {search!r}")
    trainable = tune.with_resources(
        tune.with_parameters(_trial, inputs=NeuronInputs(list(inputs.neuron_ids), inputs.bank_images,
                                                         inputs.bank_targets, inputs.heldout_images,
                                                         inputs.heldout_targets,
                                                         bank_mirror_targets=inputs.bank_mirror_targets),
                             compress_cfg=compress_cfg, seed=seed, cache_dir=cache_dir,
                             tracker=tracker.at_home(ray.util.get_node_ip_address()),
                             parent_run_id=parent_run_id, device=device),
        {"cpu": num_cpus, "gpu": num_gpus})
    path = os.path.join(storage_path, name)
    if tune.Tuner.can_restore(path):
        log.info("resuming sweep from %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(num_samples=samples, max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage_path,
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      verbose=0,
                                      callbacks=[_trial_progress(len(neurons) * len(taus) * len(criteria)
                                                                 if search == "grid" else len(neurons) * samples)]
                                      if progress else None))
    # Tune's console (its "Configuration for experiment" box, a TensorBoard hint, a line per state
    # write) would interleave with farm's one progress bar: the legacy output engine at verbose=0
    # prints none of it; the trials, their results and files are unchanged.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(max(level, logging.WARNING))
    try:
        grid = tuner.fit()
    finally:
        tune_log.setLevel(level)

    # 3. per neuron: Pareto front and chosen model
    out = []
    rows = [(r.config, r.metrics or {}) for r in grid if r.error is None and r.metrics]
    for r in grid:
        if r.error is not None:
            log.warning("sweep trial %s failed after %d retries: %s (re-run the sweep to resume it)",
                        r.config, max_failures, r.error)
    for nid in neurons:
        trials = [{"tau": c["tau"], "criterion": c["criterion"], **{k: m.get(k) for k in (
                   "param_count", "total_filters", "r2_teacher_heldout", "run_id")}}
                  for c, m in rows if c["neuron_id"] == nid]
        trials.sort(key=lambda t: (t["criterion"], t["tau"]))
        res = SweepResult(nid, infos[nid]["r2_teacher_distilled"], trials)
        if trials:
            p = [t["param_count"] for t in trials]
            r = [t["r2_teacher_heldout"] for t in trials]
            res.front = pareto_front(p, r)
            res.chosen = choose_model(p, r, res.r2_teacher_distilled, eps)
            client = tracker.client
            for i, t in enumerate(trials):
                client.set_tag(t["run_id"], "farm.pareto", str(i in res.front).lower())
                client.set_tag(t["run_id"], "farm.chosen", str(i == res.chosen).lower())
            fig = plots.pareto_figure(p, r, res.front, res.chosen,
                                      labels=[f"{t['criterion'][:3]} {t['tau']:.2f}" for t in trials],
                                      title=f"{nid}: distilled R² {res.r2_teacher_distilled:.3f}")
            tracker.log_figure(parent_run_id, fig, f"sweep/pareto_{neuron_slug(nid)}.png")
            import matplotlib.pyplot as plt

            plt.close(fig)
        out.append(res)
    return out


def _distill_task(neuron_id, neuron_ids, bank_images, bank_targets, heldout_images, heldout_targets,
                  shared_start, shared_features, bank_mirror_targets, compress_cfg, seed, cache_dir, device):
    inputs = NeuronInputs(neuron_ids, bank_images, bank_targets, heldout_images, heldout_targets,
                          shared_start=shared_start, shared_features=shared_features,
                          bank_mirror_targets=bank_mirror_targets)
    return distill_cached(neuron_id, inputs, compress_cfg, seed, cache_dir, device)

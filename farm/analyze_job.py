"""Job-level analyses: every compact model of a compress job, analysed on Ray, logged to MLflow.

    farm analyze --config configs/demo.yaml        # after `farm demo` or `farm compress`

1. The job's FINISHED neuron runs (MLflow) -> their compact models (the logged ``model/`` artifacts).
2. Maximizing natural images over the WHOLE image bank: Ray tasks over (groups of models) x (bank
   chunks), partial top-k lists merged (``farm.fanout.rank_bank_parallel``).
3. Per model, one Ray task: ``run_all_analyses`` (maximizing/minimizing synthesized images,
   adversarial, saliency, smooth-, dot tuning, filter ablation) on the model's top bank images plus a
   random sample of the bank (the "normal" baseline); figures, .npz data and metrics.json go to the
   neuron's child run under ``analysis/`` (metrics as ``analysis.<name>``), and under
   ``<out_dir>/analysis/<neuron>/``.
4. Across the job's models (driver): kernel similarity, CKA by layer, signal correlation, galleries
   of each model's best synthesized and best natural image -> the job's parent run under
   ``analysis/population/`` and ``<out_dir>/analysis/population/``.

Re-running skips neurons already analysed (tag ``farm.analyzed``) unless ``force``; a neuron whose
analysis fails is tagged ``farm.analysis_error`` and the others go on.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from farm.config import JobConfig
from farm.selection import neuron_sort_key
from farm.tracking import TAG_NEURON, Tracker

log = logging.getLogger(__name__)

TAG_ANALYZED = "farm.analyzed"
TAG_ANALYSIS_ERROR = "farm.analysis_error"
#: Metrics shown in the printed summary (metric, column title), when present.
SUMMARY_COLUMNS = (("natural_top1", "top natural"), ("synth_max_best", "best synth"),
                   ("synth_beats_natural_p99", "synth>p99"), ("adversarial_plus_mean_change", "adv+ change"),
                   ("adversarial_minus_mean_change", "adv- change"), ("dots_preferred_radius", "dot radius"),
                   ("dsi_layer3_max", "max DSI L3"))


def write_analysis(res: dict, out: Path) -> Path:
    """Write ``run_all_analyses``/``run_population_analyses`` output: one .npz per result, one PNG per
    figure, metrics.json. Closes the figures."""
    import matplotlib.pyplot as plt

    from farm.analysis import save_figure, save_result_npz

    out.mkdir(parents=True, exist_ok=True)
    for name, result in res["results"].items():
        if result is not None:
            save_result_npz(result, out / f"{name}.npz")
    for name, fig in res["figures"].items():
        save_figure(fig, out / f"{name}.png")
        plt.close(fig)
    (out / "metrics.json").write_text(json.dumps(res["metrics"], indent=2, default=float))
    return out


def _safe(neuron_id: str) -> str:
    return neuron_id.replace(":", "_").replace("/", "_")


def _analyze_task(neuron_id: str, model_dir: str, top_images: np.ndarray, sample: np.ndarray, config: dict,
                  tracker: Tracker, run_id: str, out_dir: str, device: str) -> dict:
    """All per-neuron analyses of one model; logged to its run. Never raises for the model's own errors."""
    from farm.analysis import AnalysisConfig, run_all_analyses
    from farm.task_env import init_task, resolve_device
    from farm.models.compact import load_compact

    import ray

    init_task()
    tracker = tracker.from_node(ray.util.get_node_ip_address())
    t0 = time.time()
    try:
        model = load_compact(model_dir)
        images = np.concatenate([top_images, sample]) if len(top_images) else sample
        res = run_all_analyses(model, images, AnalysisConfig.from_dict(config), output=0,
                               device=resolve_device(device), title=neuron_id)
        synth = res["results"].get("synth_max")
        out = write_analysis(res, Path(out_dir) / _safe(neuron_id))
        tracker.log_metrics(run_id, {f"analysis.{k}": v for k, v in res["metrics"].items()})
        tracker.log_artifacts(run_id, out, "analysis")
        tracker.client.set_tag(run_id, TAG_ANALYZED, "true")
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        log.error("analysis of %s failed: %s\n%s", neuron_id, err, traceback.format_exc())
        tracker.client.set_tag(run_id, TAG_ANALYSIS_ERROR, (err + "\n" + traceback.format_exc())[:4900])
        return {"neuron_id": neuron_id, "status": "FAILED", "error": err}
    return {"neuron_id": neuron_id, "status": "FINISHED", "metrics": res["metrics"], "synth_max": synth,
            "seconds": time.time() - t0}


@dataclass
class AnalyzeJobResult:
    job_id: str
    parent_run_id: str
    rows: list  # per analysed neuron: {"neuron_id", "status", "metrics"?, "error"?}
    skipped: list  # neurons analysed in an earlier run
    population_metrics: dict = field(default_factory=dict)
    out_dir: str = ""

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r.get("status") == "FAILED"]


def _download_whole(tracker: Tracker, run_id: str, local: Path) -> None:
    """The run's ``model`` artifact into ``local/model``, through a temporary sibling folder renamed
    into place: an interrupted download leaves no folder that a rerun would take for a model."""
    import shutil
    import tempfile

    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}."))
    try:
        tracker.download(run_id, "model", tmp)
        shutil.rmtree(local, ignore_errors=True)  # what an earlier, interrupted download left
        tmp.rename(local)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def job_models(tracker: Tracker, job_id: str, dst: Path, neurons: Sequence[str] | None = None) -> list[tuple]:
    """(neuron id, run, local model folder) for each FINISHED neuron run of the job ``job_id``,
    models downloaded under ``dst`` (reused when already there)."""
    parent = tracker.find_job(job_id)
    if parent is None:
        raise ValueError(f"no compress job {job_id!r} in experiment {tracker.experiment_name!r} of {tracker.uri}: "
                         f"run `farm compress` (or `farm demo`) with this config first")
    runs = [r for r in tracker.child_runs(parent, "neuron") if r.info.status == "FINISHED"]
    if neurons is not None:
        runs = [r for r in runs if r.data.tags.get(TAG_NEURON) in set(neurons)]
    out = []
    for run in sorted(runs, key=lambda r: neuron_sort_key(r.data.tags[TAG_NEURON])):
        nid = run.data.tags[TAG_NEURON]
        local = dst / _safe(nid)
        if not all((local / "model" / f).is_file() for f in ("spec.json", "state_dict.pt")):
            _download_whole(tracker, run.info.run_id, local)
        out.append((nid, run, local / "model"))
    return out


def run_analyze_job(cfg: JobConfig, force: bool = False, progress: bool = True) -> AnalyzeJobResult:
    """Analyse every compact model of the compress job ``cfg`` describes (see the module docstring)."""
    import ray

    from farm.analysis import AnalysisConfig, run_population_analyses
    from farm.analysis.figures import gallery_figure
    from farm.data.images import ImageBank
    from farm.fanout import gather, rank_bank_parallel
    from farm.selection import parse_neuron_selection
    from farm.models.compact import load_compact
    from farm.fanout import init_job_ray

    t0 = time.time()
    acfg = AnalysisConfig.from_dict(cfg.analysis.config)  # fails early on a bad key
    bank_dir = Path(cfg.bank.dir) if cfg.bank.dir else Path(cfg.out_dir) / "bank"
    if not (bank_dir / "bank.json").is_file():
        raise FileNotFoundError(f"analyze: no image bank at {bank_dir} (bank.json missing); the job's bank is "
                                f"built by `farm compress` with the same config")
    out_root = Path(cfg.out_dir) / "analysis"
    tracker = Tracker.open(cfg.tracking_uri(), cfg.tracking.experiment)
    job_id = cfg.resolved_job_id()
    parent = tracker.find_job(job_id)
    selection = None
    if cfg.analysis.neurons:
        finished = [r.data.tags[TAG_NEURON] for r in tracker.child_runs(parent, "neuron")] if parent else []
        selection = parse_neuron_selection(cfg.analysis.neurons, finished)
    models = job_models(tracker, job_id, out_root / "models", selection)
    if not models:
        raise ValueError(f"analyze: job {job_id} has no FINISHED neuron runs to analyse")
    todo = [m for m in models if force or m[1].data.tags.get(TAG_ANALYZED) != "true"]
    skipped = [m[0] for m in models if m not in todo]
    log.info("analyze job %s: %d models, %d already analysed, %d to analyse", job_id, len(models),
             len(skipped), len(todo))

    bank = ImageBank(bank_dir)
    rng = np.random.default_rng(cfg.seed)
    n_sample = min(cfg.analysis.images, len(bank))
    sample = bank.read(np.sort(rng.choice(len(bank), n_sample, replace=False)))
    init_job_ray(cfg, tracker)
    rows = []
    ranking = None
    if todo or "gallery" in acfg.population:
        # Top natural images of every model over the whole bank (also those analysed before: the
        # population gallery shows them all).
        ranking = rank_bank_parallel([str(m[2]) for m in models], str(bank_dir), top_k=cfg.analysis.top_k,
                                     params={"top_k": cfg.analysis.top_k, "n_random": 0},
                                     num_cpus=cfg.farm.num_cpus)
    if todo:
        remote = ray.remote(_analyze_task).options(num_cpus=cfg.farm.num_cpus, num_gpus=cfg.farm.num_gpus,
                                                   max_retries=cfg.farm.max_retries, retry_exceptions=False,
                                                   name="analyze_model")
        sample_ref = ray.put(sample)
        home = tracker.at_home(ray.util.get_node_ip_address())  # tasks on other nodes: Tracker.from_node
        col = {str(m[2]): i for i, m in enumerate(models)}
        pending = {remote.remote(nid, str(mdir), ranking.top_images[col[str(mdir)]], sample_ref,
                                 cfg.analysis.config, home, run.info.run_id, str(out_root), cfg.farm.device): nid
                   for nid, run, mdir in todo}
        rows = gather(pending, "analyses", "model", progress)

    # Across models, on the driver: every finished model of the job, analysed now or before.
    loaded = [load_compact(m[2]) for m in models]
    labels = [m[0] for m in models]
    synth = {r["neuron_id"]: r["synth_max"] for r in rows if r.get("synth_max") is not None}
    missing = [i for i, nid in enumerate(labels) if nid not in synth]
    if missing and "gallery" in acfg.population and "synth" in acfg.analyses:
        from dataclasses import replace

        from farm.analysis import synthesize

        for i in missing:  # analysed in an earlier run: redo only the (cheap) best synthesized image
            synth[labels[i]] = synthesize(loaded[i], replace(acfg.synth, direction="max"))
    synth_results = [synth[nid] for nid in labels] if len(synth) == len(labels) else None
    pop = run_population_analyses(loaded, sample, acfg, synth_results=synth_results, labels=labels)
    if ranking is not None and ranking.top_images is not None:
        pop["figures"]["gallery_natural"] = gallery_figure(
            ranking.top_images[:, 0], ranking.top_responses[:, 0], labels=labels, ncols=8,
            title="maximizing natural images (whole bank)")
        pop["results"]["natural_bank"] = ranking
    pop_dir = write_analysis(pop, out_root / "population")
    population_metrics = pop["metrics"]
    tracker.log_metrics(parent, {f"analysis.{k}": v for k, v in population_metrics.items()})
    tracker.log_metrics(parent, {"analysis.models": len(models), "analysis.seconds": time.time() - t0})
    tracker.log_artifacts(parent, pop_dir, "analysis/population")
    result = AnalyzeJobResult(job_id, parent, sorted(rows, key=lambda r: neuron_sort_key(r["neuron_id"])), skipped,
                              population_metrics, str(out_root))
    (out_root / "summary.json").write_text(json.dumps(
        {"job_id": job_id, "parent_run_id": parent, "skipped": skipped, "population": population_metrics,
         "neurons": [{k: v for k, v in r.items() if k != "synth_max"} for r in result.rows]},
        indent=2, default=float))
    if progress:
        print_analysis_summary(result)
    return result


def print_analysis_summary(result: AnalyzeJobResult) -> None:
    print(f"\nanalyses of job {result.job_id} -> {result.out_dir} (and the job's MLflow runs)")
    cols = [(k, t) for k, t in SUMMARY_COLUMNS if any(k in r.get("metrics", {}) for r in result.rows)]
    head = f"{'neuron':<12} {'status':<9}" + "".join(f" {t:>11}" for _, t in cols)
    print(head + "\n" + "-" * len(head))
    for r in result.rows:
        m = r.get("metrics", {})
        line = f"{r['neuron_id']:<12} {r['status']:<9}" + "".join(
            f" {m[k]:>11.4g}" if k in m else f" {'-':>11}" for k, _ in cols)
        print(line + (f"  {r['error']}" if r.get("error") else ""))
    if cols:
        print("(responses in the model's output units; synth>p99: fraction of synthesized images above the "
              "natural images' 99th percentile; DSI: dot-size invariance after ablating one filter)")
    if result.skipped:
        print(f"already analysed (use --force to redo): {', '.join(result.skipped)}")
    if result.population_metrics:
        print("across models: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(result.population_metrics.items())))


# -- `farm analyze MODEL --out DIR` ------------------------------------------------------------------
def analyze_command(args) -> int:
    """``farm analyze MODEL --out DIR``: every analysis of one compact model; figures (PNG), data
    (.npz per analysis) and metrics (metrics.json) under DIR, and in an MLflow run when given."""
    from farm.analysis import run_all_analyses
    from farm.config import store_uri

    p = Path(args.model)
    if p.suffix == ".pt":
        from farm.models.published import load_published_compact

        model = load_published_compact(p)
    else:
        from farm.models.compact import load_compact

        model = load_compact(p)
    images = np.load(args.images) if args.images else None
    out = Path(args.out)
    res = run_all_analyses(model, images)
    write_analysis(res, out)
    if args.run_id:
        tracker = Tracker.open(args.tracking_uri or store_uri(), args.experiment)
        tracker.log_metrics(args.run_id, {f"analysis.{k}": v for k, v in res["metrics"].items()})
        tracker.log_artifacts(args.run_id, out, "analysis")
    print(f"analyses of {p} -> {out}")
    for k, v in sorted(res["metrics"].items()):
        print(f"  {k}: {v:.4g}")
    return 0

"""Analyses of compact models (method.md §7): what a compact model computes, per neuron and across neurons.

Every analysis takes any ``CompactModel`` (farm's own or a published one, one output or many: pick
one with ``output``), is plain torch/numpy, and returns a dataclass with its arrays and the parameters
used; ``figures`` turns results into matplotlib Figures. Logging (MLflow) is the caller's job:
``run_all_analyses`` returns results, scalar metrics and figures ready to log.

Per neuron (model + output):
  synth.synthesize                   maximizing / minimizing synthesized images (§7.1)
  natural.rank_natural_images        top-k natural images of a bank of any size; merge_topk for shards
  adversarial.adversarial_images     adversarial+ / adversarial- within a pixel budget
  saliency.saliency_map, smooth_minus  patch-smoothing heat map; greedy smooth- vs random smoothing
  dots.dot_tuning                    location map, size and number tuning with dot stimuli
  ablation.dot_size_invariance       filter ablation -> DSI per filter; cumulative ablation (Fig. 4e)
Across models:
  similarity.kernel_similarity, layer_cka, signal_correlation
  shared.sweep_shared_k, compare_with_per_neuron   shared compact models (Fig. 3d-f)

Example::

    from farm.analysis import AnalysisConfig, run_all_analyses
    out = run_all_analyses(model, natural_images, AnalysisConfig())
    out["metrics"]            # {"synth_max_best": ..., "pct_natural_max": ..., ...}
    out["figures"]["dots"]    # a matplotlib Figure
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from farm.dataclass_dict import from_dict, to_dict
from farm.analysis import figures
from farm.analysis.ablation import (AblationParams, AblationResult, CumulativeAblationResult, ablate,
                                    cumulative_ablation, dot_number_invariance, dot_size_invariance,
                                    filter_invariance, invariance_index, n_filters)
from farm.analysis.adversarial import AdversarialParams, AdversarialResult, adversarial_images, pixel_distance
from farm.analysis.common import gaussian_blur, predict, result_arrays, result_params, save_result_npz
from farm.analysis.dots import DotParams, DotTuningResult, dot_tuning, location_tuning, number_tuning, size_tuning
from farm.analysis.figures import save_figure
from farm.analysis.natural import (NaturalParams, NaturalRanking, concat_columns, delta_in_sd, fit_affine,
                                   iter_array_shards, merge_topk, percent_delta_r, rank_natural_images)
from farm.analysis.saliency import SaliencyParams, SaliencyResult, SmoothMinusResult, saliency_map, smooth_minus
from farm.analysis.similarity import (CKAResult, KernelSimilarityResult, SignalCorrelationResult, kernel_similarity,
                                      layer_cka, linear_cka, matched_cosine, signal_correlation)
from farm.analysis.shared import (SharedSweepResult, SharedTrainParams, SharedTrainResult, build_shared,
                                  compare_with_per_neuron, r2_to_teacher, sweep_shared_k, train_shared)
from farm.analysis.synth import SynthParams, SynthResult, synthesize
from farm.models.compact import CompactModel

log = logging.getLogger(__name__)

ALL_ANALYSES = ("synth", "natural", "adversarial", "saliency", "smooth_minus", "dots", "ablation")
POPULATION_ANALYSES = ("kernel_similarity", "cka", "signal_correlation", "gallery")
#: Analyses that need natural images (the rest run from the model alone).
NEED_IMAGES = frozenset({"natural", "adversarial", "saliency", "smooth_minus"})


@dataclass(frozen=True)
class AnalysisConfig:
    """What ``run_all_analyses`` runs, and with which parameters.

    analyses: names from ALL_ANALYSES ("synth" makes maximizing and minimizing images).
    synth: default 100 steps x 9 images per direction (the paper's figure script; its code default is
      1000 steps). natural, adversarial, saliency, dots: see each Params class.
    n_base_images: adversarial base images, drawn at random from the natural images (paper: >= 10).
    n_shown: top natural images used for the natural %Δr (the images "shown").
    ablation_layers: paper layers (1-6) with per-filter DSI. cumulative_layer: paper layer of the
      cumulative ablation (Fig. 4e used layer 3); None = skip. number_invariance: also per-filter
      dot-number invariance.
    population: names from POPULATION_ANALYSES for ``run_population_analyses``.
    cka_images: images (the first ones of the set) for CKA and signal correlation; n_pairs: model
      pairs (None = all).
    seed: base image draw.
    """

    analyses: tuple[str, ...] = ALL_ANALYSES
    synth: SynthParams = SynthParams(n_steps=100, n_restarts=9)
    natural: NaturalParams = NaturalParams()
    adversarial: AdversarialParams = AdversarialParams()
    saliency: SaliencyParams = SaliencyParams()
    dots: DotParams = DotParams()
    ablation: AblationParams = AblationParams()
    n_base_images: int = 10
    n_shown: int = 10
    ablation_layers: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    cumulative_layer: int | None = 3
    number_invariance: bool = False
    population: tuple[str, ...] = POPULATION_ANALYSES
    cka_images: int = 1000
    n_pairs: int | None = 500
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "analyses", tuple(self.analyses))
        object.__setattr__(self, "population", tuple(self.population))
        bad = set(self.analyses) - set(ALL_ANALYSES)
        if bad:
            raise ValueError(f"AnalysisConfig.analyses: unknown {sorted(bad)}; known {list(ALL_ANALYSES)}")
        bad = set(self.population) - set(POPULATION_ANALYSES)
        if bad:
            raise ValueError(f"AnalysisConfig.population: unknown {sorted(bad)}; known {list(POPULATION_ANALYSES)}")
        object.__setattr__(self, "ablation_layers", tuple(int(l) for l in self.ablation_layers))
        for l in self.ablation_layers + ((self.cumulative_layer,) if self.cumulative_layer is not None else ()):
            if l not in range(1, 7):
                raise ValueError(f"AnalysisConfig: ablation layers are paper layers 1..6, got {l}")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: "dict | AnalysisConfig") -> "AnalysisConfig":
        """Build from a (YAML) dict; nested dicts override the defaults of each Params; unknown keys raise."""
        return d if isinstance(d, cls) else from_dict(cls, d)


def _finite(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


def _calibrated(x, calibration):
    x = np.asarray(x, np.float64)
    return x if calibration is None else calibration[0] * x + calibration[1]


def run_all_analyses(model: CompactModel, images: np.ndarray, config: AnalysisConfig | None = None, output: int = 0,
                     calibration: tuple[float, float] | None = None, device=None, title: str = "") -> dict:
    """Run the per-neuron analyses on ``model``'s output ``output``.

    images: uint8 (N, H, W, 3) natural images at the model's size: the bank to rank (use
      ``rank_natural_images`` over shards for a bank that does not fit in memory, and pass its top
      images here), the adversarial base images and the normal-image baseline. None: only the
      analyses that need no images run (synth, dots, ablation); the others are skipped with a warning.
    calibration: (slope, intercept) from model output to spike counts (``fit_affine`` on recorded
      responses); the paper's %Δr metrics are computed on calibrated responses, and only where the
      baseline is positive.

    Returns {"results": {name: result dataclass}, "metrics": {name: float}, "figures": {name: Figure},
    "params": {name: dict}}.
    """
    config = config or AnalysisConfig()
    todo = set(config.analyses)
    if images is None:
        skipped = sorted(todo & NEED_IMAGES)
        if skipped:
            log.warning("run_all_analyses: no natural images given; skipping %s", ", ".join(skipped))
        todo -= NEED_IMAGES
    else:
        images = np.asarray(images)
    results: dict[str, Any] = {}
    figs: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    label = title or (model.spec.neuron_ids[output] if model.spec.neuron_ids else f"output {output}")

    natural = None
    if todo & {"natural", "saliency", "smooth_minus", "adversarial"}:
        natural = rank_natural_images(model, iter_array_shards(images), params=config.natural, device=device)
        col = output  # the ranking has a column per model output
        normal = natural.sample_responses[col]
        results["natural"] = natural
        metrics.update({"natural_n_images": natural.n_images,
                        "natural_top1": natural.top_responses[col, 0],
                        "natural_topk_mean": natural.top_responses[col].mean(),
                        "natural_bank_mean": natural.mean()[col], "natural_bank_sd": natural.sd()[col],
                        "natural_p99": np.percentile(normal, 99),
                        "natural_delta_sd": delta_in_sd(natural.top_responses[col, :config.n_shown], normal),
                        "pct_natural_max": percent_delta_r(
                            _calibrated(natural.top_responses[col, :config.n_shown], calibration),
                            _calibrated(normal, calibration))})
        if config.natural.keep_images:
            n = min(config.n_shown, natural.top_responses.shape[1])
            figs["natural_top"] = figures.gallery_figure(natural.top_images[col, :n], natural.top_responses[col, :n],
                                                         labels=[f"#{i + 1}" for i in range(n)],
                                                         title=f"{label}: maximizing natural images")
    if "synth" in todo:
        for direction in ("max", "min"):
            s = synthesize(model, replace(config.synth, direction=direction), output=output, device=device)
            results[f"synth_{direction}"] = s
            metrics.update(s.summary())
            figs[f"synth_{direction}"] = figures.gallery_figure(
                s.images, s.responses, title=f"{label}: {'maximizing' if direction == 'max' else 'minimizing'} "
                                             f"synthesized images")
        if natural is not None:
            normal = natural.sample_responses[output]
            smax = results["synth_max"].responses
            metrics["synth_delta_sd"] = delta_in_sd(smax, normal)
            metrics["pct_synth_max"] = percent_delta_r(_calibrated(smax, calibration), _calibrated(normal, calibration))
            metrics["synth_beats_natural_p99"] = float(np.mean(smax > np.percentile(normal, 99)))
    if "adversarial" in todo:
        rng = np.random.default_rng(config.seed)
        base = images[np.sort(rng.choice(len(images), min(config.n_base_images, len(images)), replace=False))]
        plus = adversarial_images(model, base, replace(config.adversarial, direction="max"), output, device)
        minus = adversarial_images(model, base, replace(config.adversarial, direction="min"), output, device)
        results["adversarial_plus"], results["adversarial_minus"] = plus, minus
        metrics.update(plus.summary())
        metrics.update(minus.summary())
        for tag, r in (("plus", plus), ("minus", minus)):
            metrics[f"pct_adversarial_{tag}"] = percent_delta_r(_calibrated(r.responses, calibration),
                                                                _calibrated(r.base_responses, calibration))
        figs["adversarial"] = figures.adversarial_figure(plus, minus, title=f"{label}: adversarial images")
    top_image = None
    if images is not None:
        top_image = natural.top_images[output, 0] if natural is not None and config.natural.keep_images else images[0]
    if "saliency" in todo:
        sal = saliency_map(model, top_image, config.saliency, output,
                           normal_mean=float(natural.mean()[output]) if natural is not None else None,
                           normal_sd=float(natural.sd()[output]) if natural is not None else None, device=device)
        results["saliency"] = sal
        metrics.update(sal.summary())
        figs["saliency"] = figures.saliency_figure(sal, title=f"{label}: saliency (top natural image)")
    if "smooth_minus" in todo:
        sm = smooth_minus(model, top_image, config.saliency, output, device=device)
        results["smooth_minus"] = sm
        metrics.update(sm.summary())
        metrics["pct_smooth_minus"] = percent_delta_r(_calibrated([sm.response], calibration),
                                                      _calibrated([sm.base_response], calibration))
        if len(sm.control_responses):
            metrics["pct_random_smooth"] = percent_delta_r(_calibrated(sm.control_responses, calibration),
                                                           _calibrated([sm.base_response], calibration))
        figs["smooth_minus"] = figures.smooth_minus_figure(sm, title=f"{label}: smooth- vs random smoothing")
    if todo & {"dots", "ablation"}:
        dt = dot_tuning(model, config.dots, output, device=device)
        results["dots"] = dt
        metrics.update(dt.summary())
        figs["dots"] = figures.tuning_figure(dt, title=f"{label}: dot stimuli")
    if "ablation" in todo:
        dt = results["dots"]
        cum = None
        if config.cumulative_layer is not None:
            cum = dot_size_invariance(model, dt.preferred_location,
                                      replace(config.ablation, layer=config.cumulative_layer), config.dots, output,
                                      cumulative=True, device=device)
            results[f"dsi_cumulative_layer{config.cumulative_layer}"] = cum
            metrics.update(cum.summary())
        for layer in config.ablation_layers:
            a = dot_size_invariance(model, dt.preferred_location, replace(config.ablation, layer=layer), config.dots,
                                    output, device=device)
            results[f"dsi_layer{layer}"] = a
            metrics.update(a.summary())
            figs[f"dsi_layer{layer}"] = figures.ablation_figure(
                a, cum if layer == config.cumulative_layer else None, title=f"{label}: dot-size invariance")
            if config.number_invariance:
                b = dot_number_invariance(model, dt.preferred_location, dt.number_radius,
                                          replace(config.ablation, layer=layer), config.dots, output, device=device)
                results[f"dni_layer{layer}"] = b
                metrics.update(b.summary())
    params = {name: result_params(r) for name, r in results.items()}
    return {"results": results, "metrics": _finite(metrics), "figures": figs, "params": params}


def run_population_analyses(models: Sequence[CompactModel], images: np.ndarray, config: AnalysisConfig | None = None,
                            synth_results: Sequence[SynthResult] | None = None, labels: Sequence[str] | None = None,
                            device=None) -> dict:
    """Analyses across a job's models: kernel similarity, CKA by layer, signal correlation, and a gallery
    of the best maximizing image of each model (from ``synth_results``, one per model).

    images: uint8 (N, H, W, 3); the first ``config.cka_images`` are used for CKA and signal correlation.
    Returns {"results", "metrics", "figures"} like ``run_all_analyses``.
    """
    config = config or AnalysisConfig()
    models = list(models)
    results: dict[str, Any] = {}
    figs: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    todo = set(config.population)
    sub = np.asarray(images)[:config.cka_images]
    if "kernel_similarity" in todo and len(models) >= 2:
        ks = kernel_similarity(models, n_pairs=config.n_pairs, seed=config.seed)
        results["kernel_similarity"] = ks
        metrics.update(ks.summary())
        figs["kernel_similarity"] = figures.kernel_similarity_figure(ks)
    if "cka" in todo and len(models) >= 2:
        cka = layer_cka(models, sub, n_pairs=config.n_pairs, seed=config.seed, device=device)
        results["cka"] = cka
        metrics.update(cka.summary())
        figs["cka"] = figures.cka_figure(cka)
    if "signal_correlation" in todo and sum(m.spec.n_outputs for m in models) >= 2:
        sc = signal_correlation(models, sub, device=device)
        results["signal_correlation"] = sc
        metrics.update(sc.summary())
    if "gallery" in todo and synth_results:
        best = [s.images[s.best_index()] for s in synth_results]
        resp = [s.responses[s.best_index()] for s in synth_results]
        names = list(labels) if labels is not None else [
            (m.spec.neuron_ids[s.output] if m.spec.neuron_ids else f"model {i}") for i, (m, s) in
            enumerate(zip(models, synth_results))]
        figs["gallery"] = figures.gallery_figure(np.stack(best), resp, labels=names, ncols=8,
                                                 title="maximizing synthesized images")
    return {"results": results, "metrics": _finite(metrics), "figures": figs}


__all__ = [
    "ALL_ANALYSES", "POPULATION_ANALYSES", "AnalysisConfig", "run_all_analyses", "run_population_analyses",
    "SynthParams", "SynthResult", "synthesize",
    "NaturalParams", "NaturalRanking", "rank_natural_images", "merge_topk", "concat_columns", "iter_array_shards",
    "percent_delta_r", "delta_in_sd", "fit_affine",
    "AdversarialParams", "AdversarialResult", "adversarial_images", "pixel_distance",
    "SaliencyParams", "SaliencyResult", "SmoothMinusResult", "saliency_map", "smooth_minus",
    "DotParams", "DotTuningResult", "dot_tuning", "location_tuning", "size_tuning", "number_tuning",
    "AblationParams", "AblationResult", "CumulativeAblationResult", "ablate", "filter_invariance",
    "cumulative_ablation", "dot_size_invariance", "dot_number_invariance", "invariance_index", "n_filters",
    "KernelSimilarityResult", "CKAResult", "SignalCorrelationResult", "kernel_similarity", "layer_cka", "linear_cka",
    "matched_cosine", "signal_correlation",
    "SharedTrainParams", "SharedTrainResult", "SharedSweepResult", "build_shared", "train_shared", "r2_to_teacher",
    "sweep_shared_k", "compare_with_per_neuron",
    "figures", "save_figure", "predict", "gaussian_blur", "result_arrays", "result_params", "save_result_npz",
]

"""Compressing one neuron: distill -> prune -> rebuild narrower -> retrain -> evaluate.

method.md §4 (distillation), §5 (pruning, rebuild, retrain), §6 (metrics). Plain PyTorch/NumPy:
``compress_neuron(...)`` runs in a notebook as well as inside a Ray task.

    result = compress_neuron("190923:4", bank_images, bank_targets, heldout_images, heldout_targets,
                             CompressConfig(), real=RealData(images, responses, has_repeats=False))
    result.save("out/190923_4"); model = result.model()

The two halves are exposed for sweeps, which distill once and prune many ways:
``distill_neuron(...) -> CompactModel`` and ``prune_and_retrain(distilled, ...) -> CompressionResult``.

Images: the training images (the bank minus the held-out part) train the student and, after pruning,
retrain it; the held-out images (paper: 5 k of the 10 k test images) drive the pruning decisions and
the student-vs-teacher R². Targets are the teacher's responses to them (one neuron's column).

Pruning threshold rule: ``PruneConfig.off_by_one`` keeps prune's default, False: every layer's kept
filters explain >= tau (the rule as stated). The paper's code drops one filter more (True), which
reproduces its published widths; a sweep over tau is only honest with the stated rule.
"""

from __future__ import annotations

import dataclasses

import json
import math
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from farm.dataclass_dict import from_dict, to_dict
from farm.files import read_manifest
from farm.distill import DistillConfig, DistillResult, distill, distill_many, predict, squared_pearson
from farm.models.compact import CompactModel, CompactSpec, build_compact, load_compact, save_compact
from farm.prune import PruneConfig, prune
from farm.recipes import resolve_recipe
from farm.shared_start import SharedStartConfig
from farm.specialize import SpecializeConfig

RESULT_FILE = "result.json"
RESULT_FORMAT_VERSION = 1

Progress = Callable[[str, dict], None]


@dataclass
class RealData:
    """Recorded responses of the neuron being compressed, for the final evaluation.

    images: uint8 (M, H, W, 3), the evaluation images (paper: a test session's second half).
    responses: (M, repeats) raw spike counts NaN-padded when ``has_repeats`` (r2_ER is then
        computed); otherwise the repeat-averaged responses (M,) (or (M, 1)), scored by raw R².
    """

    images: np.ndarray
    responses: np.ndarray
    has_repeats: bool

    def __post_init__(self):
        self.images = np.asarray(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"RealData.images must be uint8 (M, H, W, 3), got {self.images.dtype} "
                             f"{self.images.shape}")
        r = np.asarray(self.responses, dtype=np.float64)
        if not self.has_repeats and r.ndim == 2 and r.shape[1] == 1:
            r = r[:, 0]
        want = "(M, repeats)" if self.has_repeats else "(M,)"
        if r.ndim != (2 if self.has_repeats else 1) or r.shape[0] != len(self.images):
            raise ValueError(f"RealData.responses must be {want} with M = {len(self.images)} images "
                             f"(has_repeats={self.has_repeats}), got shape {r.shape}")
        self.responses = r


@dataclass
class CompressConfig:
    """Everything ``compress_neuron`` does, with the paper's defaults.

    student_filters: widths K0..K4 of the distilled student (paper: 100 each).
    image_size: the student's input size; None = the training images' size.
    output_units: what the teacher's (and so the student's) outputs mean, recorded in the spec.
    distill: the distillation run. prune: the pruning (``farm.prune.PruneConfig``). retrain: the
        retraining of the narrow model (same loop, fresh Adam; paper: the same as distill).
    iterative_retrain_passes: with ``prune.iterative``, the short retrain after each layer as passes
        over the training images (wins over ``iterative_retrain_images`` when set).
    iterative_retrain_images: with ``prune.iterative``, images seen by the short retrain after each
        layer (the paper's unimplemented header comment speaks of 2 k images).
    recipe: the ``farm.recipes`` preset this config was filled in from (None: none); recorded only.
    shared: the "shared" recipe's stage 1 (``farm.shared_start.SharedStartConfig``): one student for
        all of a job's neurons, whose slice is each neuron's start instead of a fresh student (the
        job trains it once; ``compress_neuron`` takes the slice as ``distilled``). None: a fresh
        ``student_filters`` student per neuron.
    specialize: with ``shared``, start each neuron from its own narrow layers 3-4 fitted to its
        feature map of the shared student (``farm.specialize.SpecializeConfig``) instead of its
        slice (which keeps the shared model's late widths). None: the slice.
    seed: the ONE seed of a compression: the student's initialization and the batch orders of
        distill, retrain and iterative retrains derive from it and the neuron id (the ``seed`` fields
        inside ``distill`` and ``retrain`` are replaced by derived seeds).
    eval_batch_size: batch size of evaluation forwards.
    """

    student_filters: tuple[int, int, int, int, int] = (100, 100, 100, 100, 100)
    image_size: int | None = None
    output_units: str = "standardized"
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    retrain: DistillConfig = field(default_factory=DistillConfig)
    iterative_retrain_images: int = 2000
    iterative_retrain_passes: float | None = None
    recipe: str | None = None
    shared: SharedStartConfig | None = None
    specialize: SpecializeConfig | None = None
    seed: int = 0
    eval_batch_size: int = 256

    def __post_init__(self):
        for name, cls in (("shared", SharedStartConfig), ("specialize", SpecializeConfig), ("distill", DistillConfig),
                          ("retrain", DistillConfig), ("prune", PruneConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, from_dict(cls, getattr(self, name), f"CompressConfig.{name}"))
        if self.specialize is not None and self.shared is None:
            raise ValueError("CompressConfig.specialize needs a shared student (compress.shared or recipe: shared)")
        self.student_filters = tuple(int(k) for k in self.student_filters)
        if len(self.student_filters) != 5 or min(self.student_filters) < 1:
            raise ValueError(f"CompressConfig.student_filters must be 5 positive ints, got {self.student_filters}")
        if self.iterative_retrain_images < 1:
            raise ValueError(f"CompressConfig.iterative_retrain_images must be >= 1, got "
                             f"{self.iterative_retrain_images}")
        if self.iterative_retrain_passes is not None and not self.iterative_retrain_passes > 0:
            raise ValueError(f"CompressConfig.iterative_retrain_passes must be > 0 or None, got "
                             f"{self.iterative_retrain_passes}")

    @property
    def uses_mirrors(self) -> bool:
        """Whether a training (``distill``, ``retrain`` or the specialization's tune step) needs the
        teacher's responses to the mirrored training images (``DistillConfig.mirrors``,
        ``SpecializeConfig.tune_mirrors``)."""
        return bool(self.distill.mirrors or self.retrain.mirrors
                    or (self.specialize is not None and self.specialize.tune_mirrors))

    def to_dict(self) -> dict:
        return to_dict(self)

    _config_prepare = staticmethod(resolve_recipe)  # the recipe's preset fills what the mapping leaves out

    @classmethod
    def from_dict(cls, d: "dict | CompressConfig", where: str = "compress") -> "CompressConfig":
        """Inverse of ``to_dict``; nested sections may be partial (missing keys keep defaults), the
        recipe's preset fills what the mapping leaves out (``farm.recipes``)."""
        return d if isinstance(d, cls) else from_dict(cls, d, where)

    @classmethod
    def for_seed(cls, section: "dict | CompressConfig", seed: int, **changes) -> "CompressConfig":
        """The section (a mapping or a CompressConfig) with the job's ``seed`` (and ``changes``)."""
        return dataclasses.replace(cls.from_dict(section), seed=int(seed), **changes)

    def seeds(self, neuron_id: str | None = None) -> dict[str, int]:
        """The derived seeds: init, distill, retrain, iterative. With ``neuron_id``, they derive from
        (seed, neuron id): every neuron of a job gets its own initialization and batch orders (one
        shared init would make all of a job's compact models start, and often end, alike)."""
        entropy = [int(self.seed)]
        if neuron_id is not None:
            entropy.append(zlib.crc32(str(neuron_id).encode()))
        states = np.random.SeedSequence(entropy).generate_state(4)
        return dict(zip(("init", "distill", "retrain", "iterative"), (int(s) for s in states)))


@dataclass
class CompressionResult:
    """One compressed neuron.

    spec: the compact model's CompactSpec as a dict. state_dict: its weights (CPU tensors).
    param_count / trainable_params: method.md §3.2 (Keras count with BN statistics / without).
    filters: (K0..K4). total_filters: the paper's count 2*K0 + K1 + K2 + K3 + K4.
    keep: the distilled model's filter indices kept per layer.
    r2_teacher_heldout: squared Pearson r of the compact model with the teacher on the held-out
        images; r2_teacher_distilled: the same for the distilled model before pruning;
        r2_teacher_pruned: after pruning, before retraining.
    r2_er (raw repeats) / r2_raw (averaged-only: squared Pearson r) / r_real (Pearson r, signed):
        against the real responses when given, else None.
    history: the pruning steps (``PruneResult.history``). distill_history / retrain_history: the
        training logs (``DistillResult.history``). timings: distill_s, prune_s, retrain_s, eval_s.
    """

    neuron_id: str
    spec: dict
    state_dict: dict
    param_count: int
    trainable_params: int
    filters: tuple[int, ...]
    total_filters: int
    r2_teacher_heldout: float
    r2_teacher_distilled: float | None = None
    r2_teacher_pruned: float | None = None
    r2_er: float | None = None
    r2_raw: float | None = None
    r_real: float | None = None
    keep: list = field(default_factory=list)
    history: list = field(default_factory=list)
    distill_history: list = field(default_factory=list)
    retrain_history: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    seed: int = 0
    config: dict = field(default_factory=dict)

    def model(self) -> CompactModel:
        """The compact model (CPU, eval mode)."""
        m = CompactModel(CompactSpec.from_dict(self.spec))
        m.load_state_dict(self.state_dict)
        return m.eval()

    def to_dict(self) -> dict:
        """A JSON-safe summary: every field except the weights."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "state_dict"}
        d["filters"] = list(self.filters)
        d["kind"] = "CompressionResult"
        d["format_version"] = RESULT_FORMAT_VERSION
        return _jsonable(d)

    def save(self, directory: str | Path) -> Path:
        """Write ``spec.json``, ``state_dict.pt`` and ``result.json`` into ``directory``.

        The three files are written in a temporary sibling folder that then replaces ``directory``,
        so a failed save leaves any earlier result there untouched and nothing half-written.
        """
        d = Path(directory)
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".tmp", dir=d.parent))
        try:
            save_compact(self.model(), tmp)
            (tmp / RESULT_FILE).write_text(json.dumps(self.to_dict(), indent=2))
            old = None
            if d.exists():
                old = d.parent / f".{d.name}.{os.getpid()}.{time.monotonic_ns()}.old"
                os.replace(d, old)
            os.replace(tmp, d)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "CompressionResult":
        d = Path(directory)
        info = read_manifest(d / RESULT_FILE, ("kind", "CompressionResult"), ("format_version", RESULT_FORMAT_VERSION),
                             "CompressionResult", f"a saved CompressionResult is a folder with spec.json, "
                             f"state_dict.pt and {RESULT_FILE}")
        info.pop("kind"), info.pop("format_version")
        model = load_compact(d)
        if model.spec.to_dict() != CompactSpec.from_dict(info["spec"]).to_dict():
            raise ValueError(f"{d}: spec.json and {RESULT_FILE} describe different models")
        names = {f.name for f in fields(cls)}
        unknown = set(info) - names
        if unknown:
            raise ValueError(f"{d / RESULT_FILE}: unknown fields {sorted(unknown)}")
        info["filters"] = tuple(info["filters"])
        return cls(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, **info)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().cpu().tolist())
    return x


def _stage(progress: Progress | None, stage: str):
    if progress is None:
        return None
    return lambda step, info: progress(stage, {"step": step, **info})


def _check_images(images, what: str) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"{what} must be uint8 square RGB images (N, S, S, 3), got {a.dtype} {a.shape}")
    return a


def check_inputs(images, targets, heldout_images, heldout_targets):
    """Validate the four arrays up front (before hours of training) and return them as arrays."""
    images = _check_images(images, "compress: images")
    heldout_images = _check_images(heldout_images, "compress: heldout_images")
    if heldout_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"compress: heldout_images are {heldout_images.shape[1:]} but images are {images.shape[1:]}")
    out = []
    for name, t, n in (("targets", targets, len(images)), ("heldout_targets", heldout_targets, len(heldout_images))):
        t = np.asarray(t, dtype=np.float32)
        if t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.shape != (n,):
            raise ValueError(f"compress: {name} must be (N,) = ({n},), one teacher response per image, "
                             f"got shape {t.shape}")
        if not np.all(np.isfinite(t)):
            raise ValueError(f"compress: {name} contain NaN or inf")
        out.append(t)
    return images, out[0], heldout_images, out[1]


def _student(neuron_id: str, images: np.ndarray, config: CompressConfig) -> CompactModel:
    """A fresh ``config.student_filters`` student for ``neuron_id``, initialized from its own seed."""
    size = config.image_size or images.shape[1]
    if images.shape[1] != size:
        raise ValueError(f"compress: images are {images.shape[1]} px but CompressConfig.image_size is {size}")
    spec = CompactSpec(filters=config.student_filters, image_size=size, readout="dense",
                       output_units=config.output_units, neuron_ids=(str(neuron_id),))
    return build_compact(spec, seed=config.seeds(neuron_id)["init"])


def _distill_run(neuron_id: str, images, targets, config: CompressConfig, device, progress,
                 heldout_images=None, heldout_targets=None, mirror_targets=None) -> DistillResult:
    images = _check_images(images, "compress: images")
    student = _student(neuron_id, images, config)
    seeds = config.seeds(neuron_id)
    return distill(student, images, targets, replace(config.distill, seed=seeds["distill"]), device=device,
                   callback=_stage(progress, "distill"), eval_images=heldout_images,
                   eval_targets=heldout_targets, mirror_targets=mirror_targets)


def distill_neuron(neuron_id: str, images: np.ndarray, targets: np.ndarray, config: CompressConfig | None = None,
                   device: str | torch.device = "cpu", threads: int | None = None,
                   progress: Progress | None = None, heldout_images: np.ndarray | None = None,
                   heldout_targets: np.ndarray | None = None,
                   mirror_targets: np.ndarray | None = None) -> CompactModel:
    """Distill a ``config.student_filters`` student for one neuron (the first half of
    ``compress_neuron``). images uint8 (N, S, S, 3); targets (N,) the teacher's responses;
    mirror_targets: see ``compress_neuron``.
    Returns the distilled CompactModel (eval mode, on ``device``)."""
    config = config or CompressConfig()
    if threads is not None:
        torch.set_num_threads(int(threads))
    return _distill_run(neuron_id, images, targets, config, device, progress, heldout_images,
                        heldout_targets, mirror_targets).model


def prune_and_retrain(distilled: CompactModel, neuron_id: str, images: np.ndarray, targets: np.ndarray,
                      heldout_images: np.ndarray, heldout_targets: np.ndarray,
                      config: CompressConfig | None = None, real: RealData | None = None,
                      device: str | torch.device = "cpu", threads: int | None = None,
                      progress: Progress | None = None, *, distill_seconds: float = 0.0,
                      distill_history: list | None = None,
                      mirror_targets: np.ndarray | None = None) -> CompressionResult:
    """The second half of ``compress_neuron``: prune ``distilled`` on the held-out images, rebuild
    it narrower, retrain it on ``images``/``targets`` and evaluate. ``distilled`` is not modified.
    See ``compress_neuron`` for the arguments."""
    config = config or CompressConfig()
    if threads is not None:
        torch.set_num_threads(int(threads))
    if not isinstance(distilled, CompactModel) or distilled.spec.n_outputs != 1:
        raise ValueError("prune_and_retrain: distilled must be a single-output CompactModel (dense readout, or "
                         "factorized with one output)")
    images, targets, heldout_images, heldout_targets = check_inputs(images, targets, heldout_images,
                                                                     heldout_targets)
    if distilled.spec.image_size != images.shape[1]:
        raise ValueError(f"prune_and_retrain: the distilled model takes {distilled.spec.image_size} px "
                         f"images, got {images.shape[1]} px")
    if real is not None and not isinstance(real, RealData):
        raise TypeError(f"compress: real must be a RealData, got {type(real).__name__}")
    seeds = config.seeds(neuron_id)
    ebs = config.eval_batch_size
    timings = {"distill_s": float(distill_seconds)}

    r2_distilled = squared_pearson(heldout_targets, predict(distilled, heldout_images, ebs))

    retrain_hook = None
    if config.prune.iterative:
        n_short = (math.ceil(config.iterative_retrain_passes * len(images)) if config.iterative_retrain_passes
                   else config.iterative_retrain_images)
        short = replace(config.retrain, n_images=n_short, seed=seeds["iterative"])

        def retrain_hook(model: CompactModel) -> CompactModel:
            return distill(model, images, targets, short, device=device,
                           callback=_stage(progress, "iterative_retrain"), trained=True,
                           mirror_targets=mirror_targets).model

    prune_progress = None if progress is None else (lambda stage, info: progress("prune", {"stage": stage, **info}))
    t = time.perf_counter()
    pruned = prune(distilled, heldout_images, heldout_targets, config.prune, device=device,
                   progress=prune_progress, retrain=retrain_hook)
    timings["prune_s"] = time.perf_counter() - t
    r2_pruned = pruned.history[-1]["r2_teacher"] if pruned.history else None

    t = time.perf_counter()
    retrained = distill(pruned.model, images, targets, replace(config.retrain, seed=seeds["retrain"]),
                        device=device, callback=_stage(progress, "retrain"), eval_images=heldout_images,
                        eval_targets=heldout_targets, trained=True, mirror_targets=mirror_targets)
    timings["retrain_s"] = time.perf_counter() - t
    model = retrained.model

    t = time.perf_counter()
    r2_heldout = squared_pearson(heldout_targets, predict(model, heldout_images, ebs))
    metrics = {"r2_er": None, "r2_raw": None, "r_real": None}
    if real is not None:
        from farm.metrics import evaluate_predictions

        scores = evaluate_predictions(real.responses, predict(model, real.images, ebs), real.has_repeats)
        metrics["r2_raw"] = float(scores["r2_raw"][0])
        metrics["r_real"] = float(scores["r"][0])
        if "r2_er" in scores:
            metrics["r2_er"] = float(scores["r2_er"][0])
    timings["eval_s"] = time.perf_counter() - t
    spec = model.spec
    result = CompressionResult(
        neuron_id=str(neuron_id), spec=spec.to_dict(),
        state_dict={k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        param_count=spec.param_count(), trainable_params=spec.trainable_param_count(),
        filters=tuple(spec.filters), total_filters=spec.filter_count(),
        r2_teacher_heldout=r2_heldout, r2_teacher_distilled=r2_distilled, r2_teacher_pruned=r2_pruned,
        keep=[list(k) for k in pruned.keep], history=list(pruned.history),
        distill_history=list(distill_history or []), retrain_history=list(retrained.history),
        timings=timings, seed=int(config.seed), config=config.to_dict(), **metrics)
    if progress is not None:
        progress("done", result.to_dict() | {"history": None, "distill_history": None, "retrain_history": None})
    return result


def _neuron_history(history: list[dict], j: int) -> list[dict]:
    """Neuron ``j``'s view of a packed run's history (its own loss and held-out R²)."""
    out = []
    for h in history:
        e = {k: v for k, v in h.items() if k != "losses"}
        if "losses" in h:
            e["loss"] = h["losses"][j]
        if isinstance(h.get("eval_r2"), list):
            e["eval_r2"] = h["eval_r2"][j]
        out.append(e)
    return out


def compress_neurons(neuron_ids, images: np.ndarray, targets: np.ndarray, heldout_images: np.ndarray,
                     heldout_targets: np.ndarray, config: CompressConfig | None = None,
                     real=None, device: str | torch.device = "cpu", threads: int | None = None,
                     progress: Progress | None = None,
                     mirror_targets: np.ndarray | None = None) -> list[CompressionResult]:
    """``compress_neuron`` for several neurons with ONE packed distillation (``distill_many``: the
    students, one network of grouped convolutions, see the same batches), then pruning, retraining
    and evaluation per neuron. Several small students per call use a CPU core or a GPU better than
    one (benchmarks/README.md "Distillation throughput").

    targets: float (N, n), column j = neuron_ids[j]; heldout_targets (M, n); mirror_targets (N, n) or
    None, as ``compress_neuron``'s (the packed distillation takes none). real: None or one
    RealData (or None) per neuron. Each student starts from its own seed (``config.seeds(neuron
    id)``); the shared batch order comes from the first neuron's seeds, so a neuron's model depends
    on the group it was packed with (deterministic for the same group and seed). One neuron =
    ``compress_neuron``.
    """
    config = config or CompressConfig()
    ids = [str(n) for n in neuron_ids]
    if not ids:
        raise ValueError("compress_neurons: no neuron ids")
    if len(set(ids)) != len(ids):
        raise ValueError(f"compress_neurons: duplicate neuron ids in {ids}")
    reals = list(real) if real is not None else [None] * len(ids)
    if len(reals) != len(ids):
        raise ValueError(f"compress_neurons: real must have one entry per neuron ({len(ids)}), got {len(reals)}")
    tg = np.asarray(targets, dtype=np.float32)
    htg = np.asarray(heldout_targets, dtype=np.float32)
    for name, t, n in (("targets", tg, len(images)), ("heldout_targets", htg, len(heldout_images))):
        if t.shape != (n, len(ids)):
            raise ValueError(f"compress_neurons: {name} must be (images, neurons) = ({n}, {len(ids)}), "
                             f"got shape {t.shape}")
    mtg = None if mirror_targets is None else np.asarray(mirror_targets, dtype=np.float32)
    if mtg is not None and mtg.shape != tg.shape:
        raise ValueError(f"compress_neurons: mirror_targets must be shaped like targets {tg.shape}, got {mtg.shape}")
    mcol = (lambda j: None) if mtg is None else (lambda j: mtg[:, j])  # noqa: E731
    if threads is not None:
        torch.set_num_threads(int(threads))
    if len(ids) == 1:
        return [compress_neuron(ids[0], images, tg[:, 0], heldout_images, htg[:, 0], config, reals[0], device,
                                progress=progress, mirror_targets=mcol(0))]
    for j in range(len(ids)):  # every column checked up front, before any training
        images, _, heldout_images, _ = check_inputs(images, tg[:, j], heldout_images, htg[:, j])
    for r in reals:
        if r is not None and not isinstance(r, RealData):
            raise TypeError(f"compress: real must be a RealData, got {type(r).__name__}")
    students = [_student(nid, images, config) for nid in ids]
    run = distill_many(students, images, tg, replace(config.distill, seed=config.seeds(ids[0])["distill"]),
                       device=device, callback=_stage(progress, "distill"), eval_images=heldout_images,
                       eval_targets=htg)
    return [prune_and_retrain(run.models[j], nid, images, tg[:, j], heldout_images, htg[:, j], config,
                              real=reals[j], device=device, progress=progress,
                              distill_seconds=run.seconds / len(ids),
                              distill_history=_neuron_history(run.history, j), mirror_targets=mcol(j))
            for j, nid in enumerate(ids)]


def compress_neuron(neuron_id: str, images: np.ndarray, targets: np.ndarray, heldout_images: np.ndarray,
                    heldout_targets: np.ndarray, config: CompressConfig | None = None,
                    real: RealData | None = None, device: str | torch.device = "cpu",
                    threads: int | None = None, progress: Progress | None = None,
                    distilled: CompactModel | None = None,
                    mirror_targets: np.ndarray | None = None) -> CompressionResult:
    """Compress one neuron: distill -> prune -> narrow -> retrain -> evaluate (method.md §4-§6).

    neuron_id: "<session>:<index>", recorded in the spec.
    images, targets: uint8 (N, S, S, 3) training images and the teacher's responses (N,) for this
        neuron (training and retraining).
    heldout_images, heldout_targets: held-out images (M, S, S, 3) and responses (M,): pruning
        decisions and the student-vs-teacher R².
    config: CompressConfig (paper defaults when None).
    real: optional RealData: adds r2_ER (raw repeats) or raw R² (averaged only) and Pearson r.
    device, threads: where to train; ``threads`` sets ``torch.set_num_threads`` (a Ray task's CPUs).
    progress: ``progress(stage, info)`` with stage "distill" / "retrain" (training log entries),
        "prune" (``info["stage"]`` = prune's own stage), "iterative_retrain", "done".
    distilled: a distilled CompactModel to start from (a sweep's cache); distillation is skipped.
    mirror_targets: the teacher's responses (N,) to the left-right mirrors of ``images``, for the
        trainings whose DistillConfig has ``mirrors`` on (``config.distill`` / ``config.retrain``).

    Deterministic for ``config.seed`` on CPU with a fixed thread count.
    """
    config = config or CompressConfig()
    if threads is not None:
        torch.set_num_threads(int(threads))
    images, targets, heldout_images, heldout_targets = check_inputs(images, targets, heldout_images,
                                                                     heldout_targets)
    if real is not None and not isinstance(real, RealData):
        raise TypeError(f"compress: real must be a RealData, got {type(real).__name__}")
    distill_history: list = []
    distill_seconds = 0.0
    if distilled is None:
        run = _distill_run(neuron_id, images, targets, config, device, progress, heldout_images, heldout_targets,
                           mirror_targets)
        distilled, distill_history, distill_seconds = run.model, run.history, run.seconds
    return prune_and_retrain(distilled, neuron_id, images, targets, heldout_images, heldout_targets, config,
                             real=real, device=device, progress=progress, distill_seconds=distill_seconds,
                             distill_history=distill_history, mirror_targets=mirror_targets)

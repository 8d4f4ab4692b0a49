"""Stage 1 of the "shared" recipe: ONE student distilled for every neuron of a teacher at once.

The paper's own finding (method.md §7.2, Fig. 3d-f) is that compact models share their early filters:
a shared compact model (K "early" filters in layers 0-2, wider "late" layers 3-4, one factorized
readout per neuron) predicts nearly as well as the per-neuron models. Distilling it costs about one
student's training for ALL neurons, so every neuron gets the images of the whole job's budget. Each
neuron's Ray task then starts from its output's slice (``farm.models.compact.output_slice``: an exact
single-neuron dense model), or, with ``compress.specialize`` set (both real-V4 configs), from
``farm.specialize``'s narrower model fitted to that slice's feature map; then prunes and retrains it
alone (``farm.compress``).

    shared = distill_shared(neuron_ids, images, targets, SharedStartConfig(early_filters=16))
    start = output_slice(shared.model, "sim7:3")   # then compress_neuron(..., distilled=start)

Targets are standardized per neuron while training (each neuron's MSE then weighs the same whatever
its teacher's scale) and the readout is rescaled at the end, so the model outputs the teacher's units.
Plain PyTorch/NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from farm.dataclass_dict import from_dict, to_dict
from farm.distill import (DistillConfig, _check_eval, _check_images, _fit, _standardized, _targets_matrix,
                          smooth_kernels_)
from farm.models.compact import CompactModel, CompactSpec, build_compact, rescale_outputs_


@dataclass
class SharedStartConfig:
    """The shared student of stage 1.

    early_filters: width of layers 0-2 (paper's K: 5-200; 10-50 predict as well as 200).
    late_filters: width of layers 3-4 (paper: 100).
    distill: its training run (the same loop as a per-neuron distillation; ``passes`` over the
        bank's training images).
    path: start from this shared model instead of training one: a published shared compact model
        (``shared_compact_model_<K>filters.keras``, distilled from the paper's ensemble: a stage-1
        result made elsewhere) or a farm model folder (spec.json + state_dict.pt) with a factorized
        readout over the job's neurons. The widths and ``distill`` above are then unused.
    init_from: train a new shared student whose early part (layers 0-2 and layer 3's depthwise
        kernels) starts as that model's (a published shared compact model or a farm folder; its
        early width must equal ``early_filters``); layers 3-4 and the readout start fresh at
        ``late_filters``. Early filters distilled from the paper's 12 M images, narrow late layers
        fitted here.
    early_lr_scale: the early part's learning rate as a fraction of the run's (0 = frozen).
    """

    early_filters: int = 16
    late_filters: int = 32
    distill: DistillConfig = field(default_factory=DistillConfig)
    path: str | None = None
    init_from: str | None = None
    early_lr_scale: float = 1.0

    def __post_init__(self):
        if isinstance(self.distill, dict):
            self.distill = from_dict(DistillConfig, self.distill, "SharedStartConfig.distill")
        for name in ("early_filters", "late_filters"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"SharedStartConfig.{name} must be an int >= 1, got {v!r}")
        if not self.early_lr_scale >= 0:
            raise ValueError(f"SharedStartConfig.early_lr_scale must be >= 0, got {self.early_lr_scale!r}")

    @property
    def filters(self) -> tuple[int, int, int, int, int]:
        k, l = int(self.early_filters), int(self.late_filters)
        return (k, k, k, l, l)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SharedStartConfig":
        return from_dict(cls, d)


@dataclass
class SharedStartResult:
    """model: the shared student (factorized readout, one output per neuron id, eval mode, CPU).
    history: the training log (``farm.distill.DistillResult.history``; ``eval_r2`` per neuron).
    seconds: wall time of the training; cpu_seconds: process CPU time it took."""

    model: CompactModel
    history: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0


EARLY = ("layer0_conv", "layer0_bn", "layer1_depth", "layer1_point", "layer1_bn", "layer2_depth", "layer2_point",
         "layer2_bn", "layer3_depth")


def _load_any(path: str | Path) -> CompactModel:
    p = Path(path)
    if p.suffix == ".keras":
        from farm.models.published import load_shared_compact

        return load_shared_compact(p)
    from farm.models.compact import load_compact

    return load_compact(p)


def copy_early_(model: CompactModel, source: CompactModel) -> list[torch.nn.Parameter]:
    """Copy ``source``'s early part (layers 0-2 and layer 3's depthwise kernels) into ``model``, in
    place; returns the copied parameters. The early widths must agree."""
    if model.spec.filters[:3] != source.spec.filters[:3] or model.spec.image_size != source.spec.image_size:
        raise ValueError(f"shared init_from: early widths {source.spec.filters[:3]} @ {source.spec.image_size} px "
                         f"do not match the student's {model.spec.filters[:3]} @ {model.spec.image_size} px")
    src = source.state_dict()
    params = []
    with torch.no_grad():
        for name in EARLY:
            mod = getattr(model, name)
            for key, t in mod.state_dict().items():
                t.copy_(src[f"{name}.{key}"])
            params += list(mod.parameters())
    return params


def load_shared_start(path: str | Path, neuron_ids: Sequence[str]) -> CompactModel:
    """A shared student made elsewhere (``SharedStartConfig.path``), checked to cover ``neuron_ids``."""
    p = Path(path)
    model = _load_any(p)
    missing = [n for n in neuron_ids if n not in model.spec.neuron_ids]
    if model.spec.readout != "factorized" or missing:
        raise ValueError(f"compress.shared.path {p}: not a shared model of this job's neurons (readout "
                         f"{model.spec.readout!r}; missing {missing[:5]}{' ...' if len(missing) > 5 else ''})")
    return model.eval()


def distill_shared(neuron_ids: Sequence[str], images: np.ndarray, targets: np.ndarray,
                   config: SharedStartConfig | None = None, seed: int = 0, device: str | torch.device = "cpu",
                   threads: int | None = None, eval_images: np.ndarray | None = None,
                   eval_targets: np.ndarray | None = None,
                   callback: Callable[[int, dict], None] | None = None) -> SharedStartResult:
    """Distill one shared student for all ``neuron_ids`` on images uint8 (N, S, S, 3) and the
    teacher's responses ``targets`` (N, n) (column j = neuron_ids[j]); eval_* (M, S, S, 3) / (M, n)
    are scored at the run's evaluation points. Deterministic for ``seed`` on CPU."""
    import time

    config = config or SharedStartConfig()
    if threads is not None:
        torch.set_num_threads(int(threads))
    ids = [str(n) for n in neuron_ids]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"distill_shared: need unique neuron ids, got {ids[:5]}")
    images = _check_images(images, "distill_shared: images")
    if len(images) < 2:
        raise ValueError(f"distill_shared: need at least 2 training images, got {len(images)}")
    targets = _targets_matrix(targets, len(images), len(ids), "distill_shared: targets")
    eval_images, eval_targets = _check_eval(eval_images, eval_targets, len(ids), "distill_shared")
    if eval_targets is not None and len(ids) == 1:
        eval_targets = eval_targets.reshape(-1, 1)
    z, ez, (mu, sd) = _standardized(targets, eval_targets)
    spec = CompactSpec(filters=config.filters, image_size=images.shape[1], readout="factorized",
                       n_outputs=len(ids), neuron_ids=tuple(ids))
    model = build_compact(spec, seed=seed)
    scales, frozen = None, []
    if config.init_from:
        early = copy_early_(model, _load_any(config.init_from))
        scales = {p: config.early_lr_scale for p in early}
        if config.early_lr_scale == 0:
            frozen = [(p, p.detach().clone()) for p in early]
    cfg = config.distill

    def smooth():
        smooth_kernels_(model, cfg.smooth_sigma)
        with torch.no_grad():  # frozen kernels stay as they came
            for p, value in frozen:
                p.copy_(value)

    t0 = time.process_time()
    history, steps, seconds = _fit(model, smooth, images, z, cfg,
                                   device, callback, eval_images, ez, None, None, lr_scales=scales)
    rescale_outputs_(model, mu, sd)
    return SharedStartResult(model=model.cpu().eval(), history=history, steps=steps, seconds=seconds,
                             cpu_seconds=time.process_time() - t0)

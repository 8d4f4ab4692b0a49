"""Shared compact models: one network for many neurons, trained by distillation (method.md §7.2, Fig. 3d-f).

Architecture (the paper's ``class_compact_shared_model``): code layers 0-2 with K "early" filters each,
layers 3-4 with 100 ("late", scaled down by argument for tests), and a factorized readout: a 1x1
mixing conv K4 -> n_neurons and one spatial R x R map per neuron (``CompactSpec(readout="factorized")``).

Training (method.md §7.2): MSE over the batch and all outputs (Keras) on (image, teacher responses of
every neuron), Adam lr 1e-4 (Keras eps 1e-7), element-wise gradient clip 0.5, batch 64, BN in training
mode, no pruning; depthwise kernels of layers 1-4 and the spatial readout maps smoothed with a Gaussian
(sigma 0.5) every 1/24 of the run and at its end (``farm.distill.smooth_kernels_``, which handles the
factorized readout). Control option: freeze the early (layer 0-2) kernels at their random init while
the rest of those layers trains (the paper's "random early kernels" control).

Scoring: squared Pearson r per neuron between the shared model and the teacher on held-out images
(the paper's student-vs-teacher monitor, method.md §4). ``compare_with_per_neuron`` tabulates it
against per-neuron compact models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from farm.analysis.common import check_images, check_size, predict
from farm.models.input import recenter
from farm.models.compact import CompactModel, CompactSpec, build_compact


@dataclass(frozen=True)
class SharedTrainParams:
    """late_filters: widths of layers 3-4 (paper 100). activation: False = the paper's "linear" model.
    passes: passes over the training images (paper: 1 pass of 12 M). batch_size, lr, adam_eps,
    clip_value: the paper's 64, 1e-4, 1e-7, 0.5. smooth_sigma: 0 = off. smooth_times: smoothing
    points per run (paper: 24, one per 500 k-image zip). freeze_early_kernels: the random-early-kernels
    control. recalibrate_bn_images: after training, recompute the BN running statistics as plain
    averages over this many training images (0 = off, the paper). With Keras's momentum 0.99 the
    running statistics need ~500 steps to forget their init (mean 0, var 1), so short runs (tests,
    small banks) should turn it on; over the paper's 192 k steps it changes nothing.
    seed: init and batch order. eval_batch_size: images per prediction batch."""

    late_filters: int = 100
    activation: bool = True
    passes: float = 1.0
    batch_size: int = 64
    lr: float = 1e-4
    adam_eps: float = 1e-7
    clip_value: float | None = 0.5
    smooth_sigma: float = 0.5
    smooth_times: int = 24
    freeze_early_kernels: bool = False
    recalibrate_bn_images: int = 0
    seed: int = 0
    eval_batch_size: int = 64

    def __post_init__(self):
        if self.late_filters < 1 or self.batch_size < 1 or not self.passes > 0 or not self.lr > 0:
            raise ValueError("SharedTrainParams: need late_filters >= 1, batch_size >= 1, passes > 0, lr > 0")
        if self.smooth_times < 1 or self.smooth_sigma < 0:
            raise ValueError("SharedTrainParams: need smooth_times >= 1 and smooth_sigma >= 0")


def build_shared(k: int, n_neurons: int, image_size: int = 112, late_filters: int = 100, activation: bool = True,
                 neuron_ids: Sequence[str] = (), seed: int | None = 0) -> CompactModel:
    """A shared compact model: filters (k, k, k, late, late), factorized readout to ``n_neurons``."""
    if k < 1 or n_neurons < 1:
        raise ValueError(f"build_shared: k and n_neurons must be >= 1, got {k}, {n_neurons}")
    spec = CompactSpec(filters=(k, k, k, late_filters, late_filters), image_size=image_size, readout="factorized",
                       n_outputs=n_neurons, activation=activation, neuron_ids=tuple(neuron_ids))
    return build_compact(spec, seed=seed)


def _early_kernels(model: CompactModel) -> list[torch.nn.Parameter]:
    return [model.layer0_conv.weight, model.depthwise(1).weight, model.depthwise(2).weight]


@dataclass
class SharedTrainResult:
    """model: the trained shared model (eval mode). history: dicts (step, images_seen, loss, smoothed)."""

    model: CompactModel
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _check_targets(targets, n: int, n_outputs: int, what: str) -> np.ndarray:
    t = np.asarray(targets, np.float32)
    if t.shape != (n, n_outputs):
        raise ValueError(f"{what} must be (N, n_neurons) = ({n}, {n_outputs}), got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{what} contains NaN or inf")
    return t


def train_shared(model: CompactModel, images: np.ndarray, targets: np.ndarray, params: SharedTrainParams | None = None,
                 device=None, callback: Callable[[dict], None] | None = None, log_every: int = 50
                 ) -> SharedTrainResult:
    """Distill ``model`` (in place, moved to ``device``) on images uint8 (N, H, W, 3) and teacher
    responses ``targets`` (N, n_outputs). Deterministic for ``params.seed`` on CPU."""
    from farm.distill import smooth_kernels_  # here: importing farm.analysis should not need the trainer

    params = params or SharedTrainParams()
    images = check_images(images, "shared training images")
    check_size(model, images, "shared training images")
    targets = _check_targets(targets, len(images), model.spec.n_outputs, "shared training targets")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).train()
    frozen = []
    if params.freeze_early_kernels:
        frozen = [(p, p.detach().clone()) for p in _early_kernels(model)]
    frozen_ids = {id(p) for p, _ in frozen}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in frozen_ids], lr=params.lr,
                           eps=params.adam_eps)
    n = len(images)
    total = math.ceil(params.passes * n / params.batch_size)
    smooth_at = {max(1, round(total * (i + 1) / params.smooth_times)) for i in range(params.smooth_times)}
    gen = torch.Generator().manual_seed(int(params.seed))
    targets_t = torch.from_numpy(targets)
    order = torch.empty(0, dtype=torch.long)
    history, running, t0 = [], [], time.perf_counter()
    for step in range(1, total + 1):
        if len(order) < params.batch_size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:params.batch_size], order[params.batch_size:]
        idx_np = np.sort(idx.numpy())
        x = recenter(images[idx_np], dev).to(next(model.parameters()).dtype)
        y = targets_t[idx_np].to(dev, x.dtype)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if params.clip_value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), params.clip_value)
        opt.step()
        running.append(float(loss.detach()))
        smoothed = step in smooth_at and params.smooth_sigma > 0
        if smoothed:
            smooth_kernels_(model, params.smooth_sigma)
            with torch.no_grad():
                for p, init in frozen:
                    p.copy_(init)
        if step % log_every == 0 or step == total:
            entry = {"step": step, "images_seen": min(step * params.batch_size, math.ceil(params.passes * n)),
                     "loss": float(np.mean(running)), "smoothed": smoothed,
                     "seconds": time.perf_counter() - t0}
            history.append(entry)
            running = []
            if callback is not None:
                callback(entry)
    if params.recalibrate_bn_images:
        recalibrate_bn(model, images[:params.recalibrate_bn_images], params.eval_batch_size)
    model.eval()
    return SharedTrainResult(model=model, history=history, steps=total, seconds=time.perf_counter() - t0)


@torch.no_grad()
def recalibrate_bn(model: CompactModel, images: np.ndarray, batch_size: int = 64) -> None:
    """Set every BN layer's running mean / variance to their averages over ``images`` (uint8), in place.

    Batch statistics are averaged over batches (PyTorch's cumulative mode, momentum None), layer by
    layer in one forward pass per batch. The model's train/eval mode and BN momenta are restored."""
    images = check_images(images, "BN recalibration images")
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    bns = [model.bn(l) for l in range(5)]
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for s in range(0, len(images), batch_size):
            model(recenter(images[s:s + batch_size], dev).to(dtype))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)


def r2_to_teacher(model: CompactModel, images: np.ndarray, targets: np.ndarray, batch_size: int = 64,
                  device=None) -> np.ndarray:
    """Squared Pearson r per output between model and teacher on images -> float64 (n_outputs,).
    NaN where either side is constant."""
    pred = predict(model, images, output=None, batch_size=batch_size, device=device, dtype=np.float64)
    pred = pred.reshape(len(images), -1)
    t = _check_targets(targets, len(images), model.spec.n_outputs, "teacher targets").astype(np.float64)
    pc, tc = pred - pred.mean(0), t - t.mean(0)
    den = np.sqrt((pc ** 2).sum(0) * (tc ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(0) / den
    return r ** 2


@dataclass
class SharedSweepResult:
    """ks: int (n_k,) early widths; r2: float64 (n_k, n_neurons) squared r to the teacher on the
    evaluation images; param_counts: int (n_k,) (Keras count, BN statistics included);
    filter_counts: int (n_k,) spatial kernels (2 K + K + K + 100 + 100 + one map per neuron);
    neuron_ids: the teacher's neuron of each column; models: the trained models (if kept)."""

    ks: np.ndarray
    r2: np.ndarray
    param_counts: np.ndarray
    filter_counts: np.ndarray
    neuron_ids: tuple[str, ...]
    histories: list = field(default_factory=list)
    models: list = field(default_factory=list)
    params: SharedTrainParams = field(default_factory=SharedTrainParams)

    def summary(self) -> dict[str, float]:
        return {f"shared_k{k}_median_r2": float(np.nanmedian(r)) for k, r in zip(self.ks, self.r2)}


def sweep_shared_k(ks: Sequence[int], train_images: np.ndarray, train_targets: np.ndarray | None = None,
                   eval_images: np.ndarray | None = None, eval_targets: np.ndarray | None = None, teacher=None,
                   params: SharedTrainParams | None = None, neuron_ids: Sequence[str] | None = None, device=None,
                   keep_models: bool = False, callback: Callable[[int, dict], None] | None = None
                   ) -> SharedSweepResult:
    """Train one shared model per early width K in ``ks`` on all the teacher's neurons; score each.

    Targets come from the arrays, or from ``teacher.predict`` (a ``farm.models.base.Teacher``) when
    they are None. The evaluation images default to the training images (then the R^2 is a training
    fit, say so when reporting). callback(k, history entry) reports training progress.
    """
    params = params or SharedTrainParams()
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("sweep_shared_k needs at least one K")
    train_images = check_images(train_images, "shared training images")
    if train_targets is None:
        if teacher is None:
            raise ValueError("sweep_shared_k: pass train_targets or a teacher")
        train_targets = teacher.predict(train_images)
    train_targets = np.asarray(train_targets, np.float32)
    if train_targets.ndim != 2:
        raise ValueError(f"train_targets must be (N, n_neurons), got shape {train_targets.shape}")
    if eval_images is None:
        eval_images, eval_targets = train_images, train_targets
    elif eval_targets is None:
        if teacher is None:
            raise ValueError("sweep_shared_k: pass eval_targets or a teacher")
        eval_targets = teacher.predict(eval_images)
    n_neurons = train_targets.shape[1]
    if neuron_ids is None:
        neuron_ids = tuple(getattr(teacher, "neuron_ids", ())) or tuple(f"output{i}" for i in range(n_neurons))
    neuron_ids = tuple(str(i) for i in neuron_ids)
    if len(neuron_ids) != n_neurons:
        raise ValueError(f"{len(neuron_ids)} neuron ids for {n_neurons} target columns")
    size = train_images.shape[1]
    r2, pcount, fcount, histories, models = [], [], [], [], []
    for k in ks:
        model = build_shared(k, n_neurons, image_size=size, late_filters=params.late_filters,
                             activation=params.activation, neuron_ids=neuron_ids, seed=params.seed)
        res = train_shared(model, train_images, train_targets, params, device=device,
                           callback=None if callback is None else (lambda e, k=k: callback(k, e)))
        r2.append(r2_to_teacher(res.model, eval_images, eval_targets, params.eval_batch_size))
        pcount.append(model.param_count())
        fcount.append(2 * k + k + k + 2 * params.late_filters + n_neurons)
        histories.append(res.history)
        if keep_models:
            models.append(res.model)
    return SharedSweepResult(ks=np.asarray(ks), r2=np.asarray(r2), param_counts=np.asarray(pcount),
                             filter_counts=np.asarray(fcount), neuron_ids=neuron_ids, histories=histories,
                             models=models, params=params)


def compare_with_per_neuron(sweep: SharedSweepResult, per_neuron_r2: Sequence[float],
                            per_neuron_params: Sequence[int] | None = None) -> list[dict]:
    """Table (one dict per row) of shared models of each K against per-neuron compact models.

    per_neuron_r2: (n_neurons,) the per-neuron models' R^2 to the same teacher on the same images,
    in the sweep's neuron order. per_neuron_params: their parameter counts (for the size columns).
    Columns: model, k, median_r2, mean_r2, median_diff (shared - per-neuron, per neuron),
    frac_shared_better (fraction of neurons with shared R^2 >= per-neuron), params_total,
    params_per_neuron.
    """
    pn = np.asarray(per_neuron_r2, np.float64)
    if pn.shape != (sweep.r2.shape[1],):
        raise ValueError(f"per_neuron_r2 must have one value per neuron ({sweep.r2.shape[1]}), got {pn.shape}")
    n = len(pn)
    rows = []
    for k, r, p in zip(sweep.ks, sweep.r2, sweep.param_counts):
        ok = np.isfinite(r) & np.isfinite(pn)
        rows.append({"model": f"shared K={int(k)}", "k": int(k), "median_r2": float(np.nanmedian(r)),
                     "mean_r2": float(np.nanmean(r)), "median_diff": float(np.median(r[ok] - pn[ok])),
                     "frac_shared_better": float(np.mean(r[ok] >= pn[ok])), "params_total": int(p),
                     "params_per_neuron": float(p) / n})
    total = None if per_neuron_params is None else int(np.sum(per_neuron_params))
    rows.append({"model": "per-neuron compact", "k": None, "median_r2": float(np.nanmedian(pn)),
                 "mean_r2": float(np.nanmean(pn)), "median_diff": 0.0, "frac_shared_better": float("nan"),
                 "params_total": total, "params_per_neuron": None if total is None else total / n})
    return rows

"""Distillation: training a compact student on the teacher's responses (``farm.teacher_responses``).

Method: method.md §4 (distillation), §10 (PyTorch equivalences).

- ``distill``: MSE regression of one student onto one neuron's teacher responses. Adam (lr 1e-4,
  Keras eps 1e-7), batch 64, BatchNorm in training mode, reshuffled every pass, no weight decay, no LR
  schedule; separable Gaussian smoothing (sigma 0.5) of the depthwise kernels of layers 1-4 and of the
  spatial readout maps at regular intervals (paper: after every 500 k of 12 M images, 24 times a pass).
- ``smooth_kernels_``: that smoothing, equal to ``scipy.ndimage.gaussian_filter(sigma=0.5,
  mode='reflect', truncate=4)`` over the two spatial axes.

Images are uint8 RGB (N, H, W, 3) throughout; they are recentered batch by batch on the device.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from farm.dataclass_dict import from_dict, to_dict
from farm.models.input import check_images as _check_images, predict, recenter, tensor_view  # noqa: F401 (predict: farm.distill.predict)
from farm.models.compact import CompactModel, rescale_outputs_
from farm.models.packed import PackedCompact

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Smoothing
# ---------------------------------------------------------------------------------------------------


def gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalized to sum 1.

    sigma 0.5 -> [0.000264, 0.106451, 0.786571, 0.106451, 0.000264].
    """
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def smoothing_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(n, n) matrix M with (M @ v) = v smoothed by the Gaussian under scipy's 'reflect' boundary
    (half-sample symmetric: d c b a | a b c d | d c b a), for any n >= 1."""
    w = gaussian_weights(sigma, truncate)
    r = len(w) // 2
    m = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for k, wk in enumerate(w):
            j = (i + k - r) % (2 * n)
            if j >= n:
                j = 2 * n - 1 - j
            m[i, j] += wk
    return m


def _smooth_last_two_(t: torch.Tensor, sigma: float) -> None:
    """Smooth a (..., H, W) tensor in place over its last two axes."""
    h, w = t.shape[-2:]
    mh = torch.as_tensor(smoothing_matrix(h, sigma), dtype=torch.float64, device=t.device)
    mw = torch.as_tensor(smoothing_matrix(w, sigma), dtype=torch.float64, device=t.device)
    out = torch.einsum("ia,...ab,jb->...ij", mh, t.to(torch.float64), mw)
    t.copy_(out.to(t.dtype))


@torch.no_grad()
def smooth_kernels_(model: CompactModel, sigma: float = 0.5) -> CompactModel:
    """Gaussian-smooth (in place) the depthwise 5x5 kernels of layers 1-4 and the spatial readout
    maps (R x R per layer-4 filter, or per output for a factorized readout). The layer-0 RGB kernels
    are never smoothed (method.md §4: "hurts performance"). Returns ``model``."""
    if sigma <= 0:
        return model
    for layer in range(1, 5):
        _smooth_last_two_(model.depthwise(layer).weight, sigma)  # (K, 1, 5, 5)
    if model.spec.readout == "dense":
        maps = model.readout_maps()  # (R, R, K4) view into the Linear weight
        _smooth_last_two_(maps.permute(2, 0, 1), sigma)
    else:
        _smooth_last_two_(model.spatial, sigma)  # (n_outputs, R, R)
    return model


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    """How one student is trained on (image, teacher response) pairs. Defaults are the paper's
    (method.md §4), except ``bn_recalibrate_images`` (see below; 0 restores the paper's behaviour).

    batch_size, lr, betas, adam_eps: Adam as Keras (method.md §4; eps 1e-7 is Keras's default).
    passes: training amount as passes over the given images (paper: 1 pass over 12 M images);
        n_images, when set, overrides it with a number of images seen (rounded up to whole batches).
    smooth_every_images: smooth the kernels after every this many images; None = the paper's ratio,
        24 times per run (every 500 k of 12 M). smooth_sigma 0 turns smoothing off.
    smooth_at_end: also smooth after the last step, as the paper's run does (its last zip ends with
        a smoothing, so its saved models are smoothed ones).
    augment: on-the-fly augmentation (``farm.data.images.augment``) of every batch. Only valid when
        ``distill`` is given a ``teacher`` to re-query on the augmented images: the teacher's
        response to the original image is not the right target for an altered one. The paper does
        not augment (method.md §11 item 12).
    lr_schedule: "constant" (the paper's) or "cosine" (lr decays to 0 by the last step; steadier
        end points for short runs, where the paper's constant rate leaves the final weights noisy).
    grad_clip: Keras-style element-wise gradient clip value (paper: none for per-neuron models,
        0.5 for shared ones); None = off.
    seed: batch order (and augmentation); weights are initialised by ``build_compact``.
    amp_bf16: bf16 autocast, CUDA only (ignored on CPU, where it is slower: benchmarks/memory_format.py).
    channels_last: train in NHWC memory format (CUDA and CPU: ~1.6x faster per image on CPU at 32 and
        112 px, benchmarks/memory_format.py); the model is returned in the default format.
    log_every_steps: how often ``callback`` is called and ``history`` grows.
    eval_every_images: how often the evaluation set (if given) is scored; None = at every
        smoothing point (the paper monitors after every zip). Always scored at the end.
    bn_recalibrate_images: at the end of training (and before every evaluation) the BatchNorm
        running statistics are recomputed as plain averages over this many training images; 0 keeps
        the paper's momentum averages (Keras momentum 0.99 = torch 0.01), which reflect the weights of
        the last ~100 steps. In a 192 k-step run at lr 1e-4 the two agree; in a short run the momentum
        averages lag the weights and the eval-mode model (used by pruning and every prediction) can
        lose most of its R² (measured: 0.2-0.45 vs 0.6-0.65 at 16 px after 400 steps). Only these
        statistics change: training uses batch statistics, so the weights are the same either way.
    eval_batch_size: batch size of predictions on the evaluation images.
    standardize_targets: train on per-neuron z-scored targets (mean 0, SD 1 over the training
        images) and rescale the readout at the end (exact: it is linear), so the model still outputs
        the teacher's units. The learning rate then means the same whatever the teacher's scale.
    mirrors: train on the images AND their left-right mirrors, each with the teacher's own response
        (``distill(..., mirror_targets=)``; a farm job computes the teacher's responses to the bank's
        mirrors once for all neurons): twice the (image, response) pairs at no extra cost per step;
        ``passes`` count over both. Not with ``augment`` (which asks the teacher itself).
    average_tail: the weights kept are the plain average of the weights after each of the run's last
        ``average_tail`` x steps (stochastic weight averaging over the end of the schedule; BatchNorm
        statistics recalibrated for the averaged weights); 0 = the last step's weights (the paper's).
    early_lr_scale: layers 0-2 train at this factor x ``lr`` (e.g. < 1 keeps more of a shared model's
        early filters while the later layers adapt); 1 = every layer at ``lr`` (the paper's).
    frozen_layers: layers 0 .. frozen_layers - 1 keep their weights (their BatchNorm still normalizes
        with batch statistics while training); no gradient flows into them, so a step costs less (on CPU,
        112 px, 35-35-35-42-14: 8.4 ms per image end to end, 6.2 with layer 0 frozen, 4.5 with layers
        0-1). 0 = every layer trains (the paper's).
    frozen_depthwise: the spatial (depthwise 5 x 5) kernels of layers 1 .. frozen_depthwise keep their
        weights while their 1 x 1 mixing and BatchNorm train. Layer 1's depthwise kernels cost the most to
        train (their gradient sweeps the full-resolution layer-0 maps): with layer 0 frozen, freezing them
        too takes a step from 6.7 to 5.2 CPU-ms per image (112 px, 35-35-35-42-14). 0 = none.
    """

    batch_size: int = 64
    lr: float = 1e-4
    adam_eps: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.999)
    loss: str = "mse"
    lr_schedule: str = "constant"
    passes: float = 1.0
    n_images: int | None = None
    smooth_every_images: int | None = None
    smooth_sigma: float = 0.5
    smooth_at_end: bool = True
    augment: bool = False
    grad_clip: float | None = None
    seed: int = 0
    amp_bf16: bool = True
    channels_last: bool = True
    log_every_steps: int = 100
    eval_every_images: int | None = None
    bn_recalibrate_images: int = 1024
    eval_batch_size: int = 256
    standardize_targets: bool = False
    mirrors: bool = False
    average_tail: float = 0.0
    early_lr_scale: float = 1.0
    frozen_layers: int = 0
    frozen_depthwise: int = 0

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.batch_size < 1:
            raise ValueError(f"DistillConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"DistillConfig.lr must be > 0, got {self.lr}")
        if self.loss != "mse":
            raise ValueError(f"DistillConfig.loss: only 'mse' (the paper's) is implemented, got {self.loss!r}")
        if not self.early_lr_scale > 0:
            raise ValueError(f"DistillConfig.early_lr_scale must be > 0, got {self.early_lr_scale}")
        if not (isinstance(self.frozen_layers, int) and 0 <= self.frozen_layers <= 4):
            raise ValueError(f"DistillConfig.frozen_layers must be an integer in 0..4 (layers 0 .. n-1 keep their "
                             f"weights), got {self.frozen_layers!r}")
        if not (isinstance(self.frozen_depthwise, int) and 0 <= self.frozen_depthwise <= 4):
            raise ValueError(f"DistillConfig.frozen_depthwise must be an integer in 0..4 (the depthwise kernels of "
                             f"layers 1 .. n keep their weights), got {self.frozen_depthwise!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"DistillConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.n_images is None and not self.passes > 0:
            raise ValueError(f"DistillConfig.passes must be > 0, got {self.passes}")
        if self.n_images is not None and self.n_images < 1:
            raise ValueError(f"DistillConfig.n_images must be >= 1, got {self.n_images}")
        if self.smooth_every_images is not None and self.smooth_every_images < 1:
            raise ValueError(f"DistillConfig.smooth_every_images must be >= 1 or None, got "
                             f"{self.smooth_every_images}")
        if self.smooth_sigma < 0:
            raise ValueError(f"DistillConfig.smooth_sigma must be >= 0, got {self.smooth_sigma}")
        if self.eval_every_images is not None and self.eval_every_images < 1:
            raise ValueError(f"DistillConfig.eval_every_images must be >= 1 or None, got "
                             f"{self.eval_every_images}")
        if self.bn_recalibrate_images < 0:
            raise ValueError(f"DistillConfig.bn_recalibrate_images must be >= 0, got {self.bn_recalibrate_images}")
        if self.log_every_steps < 1:
            raise ValueError(f"DistillConfig.log_every_steps must be >= 1, got {self.log_every_steps}")
        if not 0.0 <= self.average_tail <= 1.0:
            raise ValueError(f"DistillConfig.average_tail must be in [0, 1] (a fraction of the steps), got "
                             f"{self.average_tail}")
        if self.mirrors and self.augment:
            raise ValueError("DistillConfig.mirrors and augment cannot both be on: augment re-queries the teacher "
                             "on every (randomly flipped) batch; mirrors trains on stored responses to the mirrors")

    def total_images(self, n_available: int) -> int:
        """Images seen in a run over ``n_available`` images."""
        return self.n_images if self.n_images is not None else math.ceil(self.passes * n_available)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        return from_dict(cls, d)


@dataclass
class DistillResult:
    """model: the trained student (train mode off, on the training device).
    history: one dict per log point: step, images_seen, loss (mean MSE since the previous point),
    seconds, smoothed (bool), and eval_r2 (squared Pearson r student vs teacher on the evaluation
    images) at smoothing points when an evaluation set was given."""

    model: CompactModel
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    images_seen: int = 0
    seconds: float = 0.0


@torch.no_grad()
@torch.no_grad()
def recalibrate_bn_(model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 256,
                    device: str | torch.device | None = None) -> CompactModel:
    """Set every BatchNorm's running mean / variance to the average of its batch statistics over
    ``images`` (uint8 (N, H, W, 3)), in place, without touching any weight. Returns ``model`` in the
    train/eval mode it had."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
        model.train()
        for s in range(0, len(images), batch_size):
            batch = images[s:s + batch_size]
            if len(batch) < 2:
                continue
            model(recenter(batch, dev))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    return model


def squared_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Squared Pearson correlation of two 1-D arrays (the paper's student-vs-teacher "fv")."""
    from farm.metrics import r2_raw

    return float(r2_raw(np.asarray(a, np.float64), np.asarray(b, np.float64))[0])


def _targets_array(targets, n: int, what: str) -> np.ndarray:
    t = np.asarray(targets, dtype=np.float32)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.shape != (n,):
        raise ValueError(f"{what} must be (N,) = ({n},) one value per image, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{what} contains NaN or inf")
    return t


def _check_eval(eval_images, eval_targets, n_outputs: int, what: str):
    if (eval_images is None) != (eval_targets is None):
        raise ValueError(f"{what}: pass both eval_images and eval_targets, or neither")
    if eval_images is None:
        return None, None
    eval_images = _check_images(eval_images, f"{what}: eval_images")
    if n_outputs == 1:
        t = _targets_array(eval_targets, len(eval_images), f"{what}: eval_targets")[:, None]
    else:
        t = _targets_matrix(eval_targets, len(eval_images), n_outputs, f"{what}: eval_targets")
    return eval_images, t


def _targets_matrix(targets, n: int, n_outputs: int, what: str) -> np.ndarray:
    t = np.asarray(targets, dtype=np.float32)
    if t.shape != (n, n_outputs):
        raise ValueError(f"{what} must be (N, neurons) = ({n}, {n_outputs}), got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{what} contains NaN or inf")
    return t


def distill(student: CompactModel, images: np.ndarray, targets: np.ndarray | None,
            config: DistillConfig | None = None, device: str | torch.device = "cpu",
            threads: int | None = None, callback: Callable[[int, dict], None] | None = None,
            eval_images: np.ndarray | None = None, eval_targets: np.ndarray | None = None,
            teacher=None, neuron_id: str | None = None, trained: bool = False,
            mirror_targets: np.ndarray | None = None) -> DistillResult:
    """Train ``student`` (in place, moved to ``device``) to regress one neuron's teacher response.

    images: uint8 (N, H, W, 3), H = W = student.spec.image_size.
    targets: float (N,) teacher responses to ``images`` (teacher units). May be None when
        ``config.augment`` is on: the targets then come from ``teacher`` on every augmented batch.
    mirror_targets: float (N,) teacher responses to the left-right mirrors of ``images``, used when
        ``config.mirrors`` is on (required then; ignored otherwise): training draws from 2N pairs,
        (image, response) and (its mirror, the mirror's response), the mirrors flipped batch by batch
        (no copy of the images); passes count over the 2N. A neuron's response to a mirror is not its
        response to the image (the teacher says what it is): the mirrors are new pairs.
    config: DistillConfig (paper defaults when None). A fresh Adam is created on every call, so
        retraining after pruning is the same call on the narrow model (method.md §5.5).
    threads: if given, ``torch.set_num_threads(threads)`` (a Ray task's CPU share).
    callback: ``callback(step, info)`` at every log point; ``info`` is the history entry.
    eval_images, eval_targets: an evaluation set (e.g. held-out bank images and the teacher's
        responses) scored at every smoothing point and at the end.
    teacher, neuron_id: a Teacher and the neuron to re-query on augmented batches (augment only).
    trained: the student is already trained (a retrain after pruning): with
        ``config.standardize_targets`` its readout is first put into the z-scored units (the exact
        inverse of the final rescaling), so training continues from the function it computes rather
        than from outputs on the wrong scale, which the first steps would wreck the features to fix.

    Deterministic for ``config.seed`` on CPU with a fixed thread count.
    """
    config = config or DistillConfig()
    if threads is not None:
        torch.set_num_threads(int(threads))
    images = _check_images(images, "distill: images")
    n = len(images)
    size = student.spec.image_size
    if images.shape[1:3] != (size, size):
        raise ValueError(f"distill: images are {images.shape[1]}x{images.shape[2]} px but the student "
                         f"takes {size}x{size} (spec.image_size)")
    if n < 2:
        raise ValueError(f"distill: need at least 2 training images, got {n}")
    columns = None
    if config.augment:
        if teacher is None or neuron_id is None:
            raise ValueError("distill: config.augment needs teacher= and neuron_id= to re-query the "
                             "teacher on augmented images (the original image's response is not the "
                             "target for an altered image)")
        columns = [list(map(str, teacher.neuron_ids)).index(str(neuron_id))]
        targets = None
    else:
        if targets is None:
            raise ValueError("distill: targets are required unless config.augment is on")
        targets = _targets_array(targets, n, "distill: targets")[:, None]
        if config.mirrors:
            if mirror_targets is None:
                raise ValueError("distill: config.mirrors is on but no mirror_targets (the teacher's responses to "
                                 "the images' left-right mirrors) were given")
            targets = np.concatenate([targets, _targets_array(mirror_targets, n, "distill: mirror_targets")[:, None]])
    eval_images, eval_targets = _check_eval(eval_images, eval_targets, 1, "distill")
    scale = None
    if config.standardize_targets and targets is not None:
        targets, eval_targets, scale = _standardized(targets, eval_targets)
        if trained:
            student.to(device)
            rescale_outputs_(student, -scale[0] / scale[1], 1.0 / scale[1])
    history, steps, seconds = _fit(student, lambda: smooth_kernels_(student, config.smooth_sigma), images,
                                   targets, config, device, callback, eval_images, eval_targets, teacher, columns,
                                   lr_scales=_lr_scales(student, config), mirrored=config.mirrors)
    if scale is not None:
        rescale_outputs_(student, *scale)
    return DistillResult(model=student, history=history, steps=steps, images_seen=steps * config.batch_size,
                         seconds=seconds)


def _lr_scales(model: CompactModel, config: DistillConfig) -> dict | None:
    """{parameter: factor} (``_fit``'s ``lr_scales``): layers 0-2 at ``early_lr_scale``, the first
    ``frozen_layers`` layers and the depthwise kernels of layers 1 .. ``frozen_depthwise`` at 0; None when
    every parameter trains at the run's rate."""
    scales = {}
    for name, p in model.named_parameters():
        layer = name.split("_")[0]
        if layer in ("layer0", "layer1", "layer2") and config.early_lr_scale != 1.0:
            scales[p] = config.early_lr_scale
        if layer.startswith("layer") and int(layer[5:]) < config.frozen_layers:
            scales[p] = 0.0
        if name.split(".")[0].endswith("_depth") and int(layer[5:]) <= config.frozen_depthwise:
            scales[p] = 0.0
    return scales or None


def _standardized(targets: np.ndarray, eval_targets: np.ndarray | None):
    """(z-scored targets, eval targets on the same scale, (mean, sd)) per column of (N, n)."""
    mu = targets.astype(np.float64).mean(axis=0)
    sd = targets.astype(np.float64).std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z = ((targets - mu) / sd).astype(np.float32)
    ez = None if eval_targets is None else ((eval_targets - mu) / sd).astype(np.float32)
    return z, ez, (mu, sd)


def _fit(net: torch.nn.Module, smooth: Callable[[], object], images: np.ndarray, targets: np.ndarray | None,
         config: DistillConfig, device, callback, eval_images, eval_targets, teacher, columns,
         lr_scales: dict | None = None, mirrored: bool = False):
    """The training loop shared by ``distill`` and ``distill_many``.

    net(x) -> (B, n) outputs for n neurons; targets float32 (N, n) or None (augment: ``teacher``'s
    ``columns`` on every augmented batch); eval_targets (M, n). The loss is the sum over neurons of
    each neuron's MSE, so every neuron's parameters get exactly the gradient of its own MSE.
    lr_scales: {parameter: factor} for parameters trained at ``factor`` x the run's rate (0 = frozen).
    mirrored: targets are (2N, n), rows N.. the responses to the images' left-right mirrors; pair
    i >= N is image i - N flipped.
    Returns (history, steps, seconds).
    """
    n_img = len(images)
    n = 2 * n_img if mirrored else n_img  # training pairs
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    net.to(dev)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:
        net.to(memory_format=torch.channels_last)
    net.train()
    scales = {id(p): float(f) for p, f in (lr_scales or {}).items()}
    groups: dict[float, list] = {}
    for p in net.parameters():
        f = scales.get(id(p), 1.0)
        if f > 0:
            groups.setdefault(f, []).append(p)
        else:
            p.requires_grad_(False)
    opt = torch.optim.Adam([{"params": ps, "lr": config.lr * f, "scale": f} for f, ps in groups.items()],
                           lr=config.lr, betas=config.betas, eps=config.adam_eps)

    total_images = config.total_images(n)
    bs = config.batch_size
    total_steps = math.ceil(total_images / bs)
    smooth_every = config.smooth_every_images or max(1, round(total_images / 24))
    smooth_every_steps = max(1, round(smooth_every / bs))
    eval_every_steps = (max(1, round(config.eval_every_images / bs)) if config.eval_every_images
                        else smooth_every_steps)

    gen = torch.Generator().manual_seed(int(config.seed))
    n_recal = min(config.bn_recalibrate_images, n_img)
    recal_idx = (torch.randperm(n_img, generator=torch.Generator().manual_seed(int(config.seed) + 1))[:n_recal]
                 if n_recal >= 2 else None)
    aug_rng = np.random.default_rng([int(config.seed), 1])
    # The uint8 images stay on the host unless they are small enough to sit on the GPU whole.
    images_t = tensor_view(images)
    if cuda and images.nbytes <= 2 * 1024 ** 3:
        images_t = images_t.to(dev)
    targets_t = tensor_view(targets).to(dev) if targets is not None else None
    if config.augment:
        from farm.data.images import augment as augment_images

    history: list[dict] = []
    # stochastic weight averaging: the running mean of the weights after each step from average_from on
    average_from = total_steps - math.ceil(config.average_tail * total_steps) + 1 if config.average_tail else None
    averaged: list[torch.Tensor] | None = None
    loss_sum = None
    loss_count = 0
    order = torch.empty(0, dtype=torch.long)
    pos = 0
    t0 = time.perf_counter()
    step = 0
    for step in range(1, total_steps + 1):
        # A stream of fresh permutations: every pass is reshuffled (Keras fit(shuffle=True)); a batch
        # may straddle two passes so that every batch is full.
        parts = []
        need = bs
        while need > 0:
            if pos >= len(order):
                order = torch.randperm(n, generator=gen)
                pos = 0
            take = order[pos:pos + need]
            parts.append(take)
            pos += len(take)
            need -= len(take)
        idx = parts[0] if len(parts) == 1 else torch.cat(parts)

        if config.augment:
            batch_np = augment_images(images[idx.numpy()], aug_rng)
            y = torch.from_numpy(np.asarray(teacher.predict(batch_np), dtype=np.float32)[:, columns]).to(dev)
            x = recenter(batch_np, dev)
        elif mirrored:
            flip = idx >= n_img
            x = recenter(images_t[(idx - flip.long() * n_img).to(images_t.device)], dev)
            if bool(flip.any()):
                f = flip.to(dev)
                x[f] = x[f].flip(-1)  # (B, 3, H, W): left-right
            y = targets_t[idx.to(dev)]
        else:
            x = recenter(images_t[idx.to(images_t.device)], dev)
            y = targets_t[idx.to(dev)]
        if memory_format is torch.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and config.amp_bf16):
            out = net(x)
        per_neuron = ((out.float() - y) ** 2).mean(dim=0)  # (n,) each neuron's MSE
        loss = per_neuron.sum()
        if config.lr_schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = group["scale"] * config.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / total_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(net.parameters(), config.grad_clip)
        opt.step()
        if average_from is not None and step >= average_from:
            with torch.no_grad():
                if averaged is None:
                    averaged = [p.detach().clone() for p in net.parameters()]
                else:
                    k = step - average_from + 1  # the number of weights averaged, this one included
                    for a, p in zip(averaged, net.parameters()):
                        a.add_(p.detach() - a, alpha=1.0 / k)
        detached = per_neuron.detach().double()
        loss_sum = detached if loss_sum is None else loss_sum + detached
        loss_count += 1

        smoothed = False
        if config.smooth_sigma > 0 and (step % smooth_every_steps == 0
                                        or (config.smooth_at_end and step == total_steps)):
            smooth()
            smoothed = True
        evaluate = eval_images is not None and (step % eval_every_steps == 0 or step == total_steps)
        if step % config.log_every_steps == 0 or step == total_steps or evaluate:
            losses = (loss_sum / loss_count).cpu().tolist()
            if not all(math.isfinite(v) for v in losses):
                raise FloatingPointError(f"distill: loss became {losses} by step {step} "
                                         f"(lr {config.lr}); check the targets' scale")
            info = {"step": step, "images_seen": step * bs, "loss": float(np.mean(losses)),
                    "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, "smoothed": smoothed}
            if len(losses) > 1:
                info["losses"] = losses
            if evaluate:
                if recal_idx is not None:
                    recalibrate_bn_(net, images_t[recal_idx.to(images_t.device)], config.eval_batch_size, dev)
                info["eval_r2"] = _eval_r2(net, eval_images, eval_targets, config.eval_batch_size)
            history.append(info)
            if callback is not None:
                callback(step, info)
            loss_sum = None
            loss_count = 0

    for p in net.parameters():
        p.requires_grad_(True)
    if averaged is not None:
        with torch.no_grad():
            for a, p in zip(averaged, net.parameters()):
                p.copy_(a)
        if config.smooth_sigma > 0 and config.smooth_at_end:  # the kept weights end smoothed, as without averaging
            smooth()
    if recal_idx is not None and (eval_images is None or averaged is not None):  # else done at the last step
        recalibrate_bn_(net, images_t[recal_idx.to(images_t.device)], config.eval_batch_size, dev)
    if averaged is not None and eval_images is not None and history:  # the last entry: the averaged weights
        history[-1]["eval_r2_averaged"] = _eval_r2(net, eval_images, eval_targets, config.eval_batch_size)
    net.eval()
    if memory_format is torch.channels_last:
        net.to(memory_format=torch.contiguous_format)
    return history, step, time.perf_counter() - t0


def _eval_r2(net: torch.nn.Module, eval_images, eval_targets: np.ndarray, batch_size: int):
    """Squared Pearson r of each output against ``eval_targets`` (M, n): a float for one output, else a list."""
    pred = predict(net, eval_images, batch_size).reshape(len(eval_images), -1)
    r2 = [squared_pearson(eval_targets[:, j], pred[:, j]) for j in range(pred.shape[1])]
    return r2[0] if len(r2) == 1 else r2


# ---------------------------------------------------------------------------------------------------
# Several neurons at once
# ---------------------------------------------------------------------------------------------------


def _smooth_pack_(pack: PackedCompact, sigma: float = 0.5) -> PackedCompact:
    """``smooth_kernels_`` of every model of a pack: depthwise kernels of layers 1-4 and readout maps."""
    if sigma <= 0:
        return pack
    with torch.no_grad():
        for w in pack.depth:
            _smooth_last_two_(w, sigma)
        r, k4 = pack.specs[0].readout_size, pack.specs[0].filters[4]
        _smooth_last_two_(pack.readout.view(pack.n, r, r, k4).permute(0, 3, 1, 2), sigma)
    return pack


@dataclass
class DistillManyResult:
    """models: the trained students, in input order (eval mode). history: as DistillResult's, with
    ``loss`` the mean over neurons, ``losses`` per neuron and ``eval_r2`` a list per neuron."""

    models: list[CompactModel]
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    images_seen: int = 0
    seconds: float = 0.0


def distill_many(students: list[CompactModel], images: np.ndarray, targets: np.ndarray,
                 config: DistillConfig | None = None, device: str | torch.device = "cpu",
                 threads: int | None = None, callback: Callable[[int, dict], None] | None = None,
                 eval_images: np.ndarray | None = None, eval_targets: np.ndarray | None = None,
                 teacher=None, neuron_ids: list[str] | None = None) -> DistillManyResult:
    """``distill`` for several neurons at once, packed into one network (``farm.models.packed``).

    students: n CompactModels of one spec (not modified; the trained ones are returned).
    targets: float (N, n), column j = student j's neuron; eval_targets (M, n). With
    ``config.augment``: targets None and ``teacher`` + ``neuron_ids`` (one per student).
    Equal, up to float rounding, to calling ``distill`` on each student with the same config.
    """
    config = config or DistillConfig()
    if config.mirrors:
        raise ValueError("distill_many: DistillConfig.mirrors is not implemented for packed neurons; "
                         "train them one by one (farm.pack: 1)")
    if config.early_lr_scale != 1.0 or config.frozen_layers or config.frozen_depthwise:
        raise ValueError("distill_many: DistillConfig.early_lr_scale / frozen_layers / frozen_depthwise are not "
                         "implemented for packed neurons; train them one by one (farm.pack: 1)")
    if threads is not None:
        torch.set_num_threads(int(threads))
    students = list(students)
    first = students[0].spec if students else None
    for m in students:
        if (m.spec.filters, m.spec.image_size) != (first.filters, first.image_size):
            raise ValueError(f"distill_many: every student must have the same widths and image size, got "
                             f"{m.spec.filters} @ {m.spec.image_size} px and {first.filters} @ {first.image_size} px")
    pack = PackedCompact(students)
    images = _check_images(images, "distill_many: images")
    size = pack.specs[0].image_size
    if images.shape[1:3] != (size, size):
        raise ValueError(f"distill_many: images are {images.shape[1]}x{images.shape[2]} px but the "
                         f"students take {size}x{size}")
    if len(images) < 2:
        raise ValueError(f"distill_many: need at least 2 training images, got {len(images)}")
    columns = None
    if config.augment:
        if teacher is None or neuron_ids is None or len(neuron_ids) != pack.n:
            raise ValueError("distill_many: config.augment needs teacher= and one neuron id per student")
        ids = list(map(str, teacher.neuron_ids))
        columns = [ids.index(str(nid)) for nid in neuron_ids]
        targets = None
    else:
        targets = _targets_matrix(targets, len(images), pack.n, "distill_many: targets")
    eval_images, eval_targets = _check_eval(eval_images, eval_targets, pack.n, "distill_many")
    if pack.n == 1 and eval_targets is not None:
        eval_targets = eval_targets.reshape(-1, 1)
    scale = None
    if config.standardize_targets and targets is not None:
        targets, eval_targets, scale = _standardized(targets, eval_targets)
    history, steps, seconds = _fit(pack, lambda: _smooth_pack_(pack, config.smooth_sigma), images, targets, config,
                                   device, callback, eval_images, eval_targets, teacher, columns)
    models = pack.unpack()
    if scale is not None:
        for j, m in enumerate(models):
            rescale_outputs_(m, scale[0][j:j + 1], scale[1][j:j + 1])
    return DistillManyResult(models=models, history=history, steps=steps,
                             images_seen=steps * config.batch_size, seconds=seconds)

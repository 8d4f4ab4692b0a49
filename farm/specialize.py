"""Specializing a shared student to one neuron: narrow late layers fitted to the neuron's feature MAP.

A shared student's output k is ``sum_xy s_k[x, y] * T_k[x, y] + b`` with ``T_k = m_k . a4`` the
neuron's mixing of the layer-4 maps (R x R, 28 x 28 at 112 px): a whole map of targets per image,
not one number. ``specialize`` keeps the shared early part (layers 0-2 and layer 3's depthwise kernels),
builds narrow layers 3-4 (``filters``) and fits them, with a 1x1 mixing of their K4 maps, to T on the
bank's images (MSE per pixel weighted by s^2, the pixels the readout reads). The result is a
single-neuron CompactModel whose readout is ``s x mixing`` (``readout: dense``: as 784 x K4 weights;
``factorized``: as the map and the mixing): exactly what the shared model computes when the fit is
exact, at the narrow widths. ``tune_passes`` then fit layers 3-4 and the readout to the teacher's
scalar responses on the same activations. Pruning and retraining go on as for any distilled student
(``farm.compress.prune_and_retrain``).

The layer-2 activations are computed once per image set (the early part is frozen here), so the fit
runs on 28 x 28 maps and costs a small fraction of a distillation at 112 px. Plain PyTorch/NumPy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from farm.dataclass_dict import from_dict, to_dict
from farm.models.input import recenter
from farm.models.compact import CompactModel, CompactSpec, build_compact, output_slice
from farm.shared_start import copy_early_


@dataclass(frozen=True)
class SpecializeConfig:
    """late_filters: widths (K3, K4) of the neuron's own layers 3-4. passes: passes over the
    training images. lr: Adam rate (cosine to 0). batch_size: images per step. flip: add each
    image's left-right mirror to the training images (the target map is the shared model's own, so
    any image is a training image; a pass then covers twice as many).
    readout: "dense" (784 x K4 weights at 28 x 28, like the paper's per-neuron models) or
    "factorized" (the shared model's form: a spatial map times a channel mixing, 784 + K4 weights;
    the same function at the end of the map fit, and the parameters go to wider late layers).
    tune_passes: then passes of fitting layers 3-4 and the readout to the TEACHER's responses
    (``targets``) on the same frozen early activations (Adam at tune_lr, cosine to 0; BatchNorm
    statistics fixed); 0: none.
    tune_mirrors: the tune step also fits the teacher's responses to the images' left-right mirrors
    (``mirror_targets``; needs ``flip``, whose mirrored activations it reuses): twice the (image,
    response) pairs at the same cost per pass over them, so less overfitting per pass."""

    late_filters: tuple[int, int] = (16, 4)
    passes: float = 20.0
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0
    flip: bool = False
    readout: Literal["dense", "factorized"] = "dense"
    tune_passes: float = 0.0
    tune_lr: float = 1e-3
    tune_batch_size: int = 32
    tune_mirrors: bool = False

    def __post_init__(self):
        lf = tuple(int(k) for k in self.late_filters)
        object.__setattr__(self, "late_filters", lf)
        if len(lf) != 2 or min(lf) < 1:
            raise ValueError(f"SpecializeConfig.late_filters must be two ints >= 1, got {self.late_filters}")
        if not self.passes > 0 or not self.lr > 0 or self.batch_size < 1:
            raise ValueError("SpecializeConfig: need passes > 0, lr > 0, batch_size >= 1")
        if not self.tune_passes >= 0 or not self.tune_lr > 0 or self.tune_batch_size < 1:
            raise ValueError("SpecializeConfig: need tune_passes >= 0, tune_lr > 0, tune_batch_size >= 1")
        if self.readout not in ("dense", "factorized"):
            raise ValueError(f"SpecializeConfig.readout must be 'dense' or 'factorized', got {self.readout!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"SpecializeConfig.flip must be true or false, got {self.flip!r}")
        if not isinstance(self.tune_mirrors, bool):
            raise ValueError(f"SpecializeConfig.tune_mirrors must be true or false, got {self.tune_mirrors!r}")
        if self.tune_mirrors and not (self.flip and self.tune_passes > 0):
            raise ValueError("SpecializeConfig.tune_mirrors needs flip: true (the mirrors' activations) and "
                             "tune_passes > 0")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpecializeConfig":
        return from_dict(cls, d)


def neuron_start(shared: CompactModel, neuron_id: str, images: np.ndarray,
                 config: "SpecializeConfig | None" = None, targets: np.ndarray | None = None,
                 early: torch.Tensor | None = None, mirror_targets: np.ndarray | None = None,
                 shared_map: torch.Tensor | None = None) -> CompactModel:
    """A neuron's start from a shared student: its exact slice, or with ``config`` its specialized
    model (``specialize``; ``targets``: the teacher's responses to ``images``, for ``tune_passes``;
    ``mirror_targets``: its responses to their mirrors, for ``tune_mirrors``; ``early`` and
    ``shared_map``: the shared student's layer-2 activations of ``images`` and its map of this neuron,
    computed once for all neurons, ``farm.shared_features``)."""
    if config is None:
        return output_slice(shared, neuron_id)
    return specialize(shared, neuron_id, images, config, targets=targets, early=early,
                      mirror_targets=mirror_targets, target_map=shared_map)[0]


@torch.no_grad()
def _activations(model: CompactModel, images: np.ndarray, through: int, batch_size: int, head=None,
                 flip: bool = False, channels_last: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Layer ``through``'s activations (then ``head`` of them), batch by batch, float32 CPU: of the
    images, then (``flip``) of their left-right mirrors, (2N, ...). Written into one tensor made
    up front (``channels_last``: in that layout; ``out``: that tensor, e.g. a view of a memory-mapped
    file), so the peak is the result itself: a 24,000-image bank's mirrored layer-2 activations are
    3.7 GB, and a list of batches joined at the end, then copied to channels-last, held three times that."""
    model.eval()
    dev = next(model.parameters()).device
    n = len(images)
    for view in ((False, True) if flip else (False,)):
        for s in range(0, n, batch_size):
            batch = images[s:s + batch_size]
            x = recenter(np.ascontiguousarray(batch[:, :, ::-1]) if view else batch, dev)
            for l in range(through + 1):
                x = model.layer_act(l, x)
            y = (x if head is None else head(x)).float().cpu()
            if out is None:
                fmt = torch.channels_last if channels_last and y.dim() == 4 else torch.contiguous_format
                out = torch.empty((n * (2 if flip else 1), *y.shape[1:]), dtype=torch.float32, memory_format=fmt)
            first = s + (n if view else 0)
            out[first:first + len(y)] = y
    return out


def _early(shared: CompactModel, images: np.ndarray, batch_size: int = 128, flip: bool = False) -> torch.Tensor:
    """Layer-2 activations (N, K2, R, R) (``flip``: then those of the mirrored images, 2N), float32
    CPU, channels-last (PyTorch's CPU depthwise/pointwise convolutions and their backward run about
    twice as fast on it at these sizes: benchmarks/README.md "A wider start kept in factorized form")."""
    return _activations(shared, images, 2, batch_size, flip=flip, channels_last=True)


@torch.no_grad()
def _late_maps(model: CompactModel, indices: list[int], a2: torch.Tensor, outs: list[torch.Tensor],
               batch_size: int = 256) -> None:
    """``neuron_map`` of outputs ``indices`` from layer-2 activations ``a2`` already computed (layers
    3-4 once per batch, then each output's mixing), written into ``outs`` (one (len(a2), R, R)
    float32 tensor per output, made up front: joining a list of per-batch maps at the end, with
    ``farm.task_env.keep_freed_memory`` (a farm task's allocator), grew the heap by 14 GB in 2 of 4
    runs over the 46,800 maps of configs/v4_190923_k35.yaml; this way by at most 0.9 GB in 8 of 8:
    ``benchmarks/late_map_heap.py``; benchmarks/README.md "The 35-filter start over all 33 neurons")."""
    model.eval()
    dev = model.mixing.weight.device
    heads = [(model.mixing.weight[i:i + 1], model.mixing.bias[i:i + 1]) for i in indices]
    for s in range(0, len(a2), batch_size):
        a4 = model.layer_act(4, model.layer_act(3, a2[s:s + batch_size].to(dev)))
        for (w, b), out in zip(heads, outs):  # one output at a time: each map as _late_map computes it alone
            out[s:s + len(a4)] = torch.nn.functional.conv2d(a4, w, b)[:, 0].float().cpu()


def _late_map(model: CompactModel, index: int, a2: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``neuron_map`` of output ``index`` from layer-2 activations ``a2`` (layers 3-4 and the mixing only)."""
    out = torch.empty((len(a2), *a2.shape[2:]), dtype=torch.float32)
    _late_maps(model, [index], a2, [out], batch_size)
    return out


def neuron_map(model: CompactModel, index: int, images: np.ndarray, batch_size: int = 64,
               flip: bool = False) -> torch.Tensor:
    """Output ``index``'s map T = m . a4 (N, R, R) of a factorized model, float32 CPU (``flip``: then
    its maps of the mirrored images, 2N)."""
    w, b = model.mixing.weight[index:index + 1], model.mixing.bias[index:index + 1]
    return _activations(model, images, 4, batch_size, head=lambda a4: torch.nn.functional.conv2d(a4, w, b)[:, 0],
                        flip=flip)


def specialize(shared: CompactModel, neuron_id: str, images: np.ndarray,
               config: SpecializeConfig | None = None, target: CompactModel | None = None,
               target_map: torch.Tensor | None = None,
               targets: np.ndarray | None = None, early: torch.Tensor | None = None,
               mirror_targets: np.ndarray | None = None) -> tuple[CompactModel, dict]:
    """The neuron's compact model (``config.readout``: dense or factorized) with its own narrow layers
    3-4 (see the module docstring).
    ``target``: another factorized model with this output (e.g. a shared-compact TEACHER) whose map
    and spatial readout are fitted instead of ``shared``'s own. ``target_map``: the fitted model's
    (``target``'s, else ``shared``'s) map precomputed, (N, R, R) on ``images`` (with ``config.flip``
    the mirrors' is added here) or (2N, R, R) on the images then their mirrors (``farm.shared_features``
    computes ``shared``'s once for all neurons); default: computed here. ``targets``: the teacher's
    responses (N,) to ``images``, needed with ``config.tune_passes``; ``mirror_targets``: its
    responses (N,) to their left-right mirrors, needed with ``config.tune_mirrors``. ``early``: ``shared``'s layer-2 activations of ``images`` (then of their
    mirrors with ``config.flip``), (N or 2N, K2, R, R), computed once for all neurons
    (``farm.shared_features``); default: computed here. Returns (model in eval mode on CPU, info: seconds, map_r2 = weighted R²
    of the fitted map, wall seconds of its parts: early_s, target_map_s, map_fit_s, tune_s)."""
    config = config or SpecializeConfig()
    n_images = len(images)
    if config.tune_passes:
        if targets is None:
            raise ValueError("specialize: SpecializeConfig.tune_passes needs the teacher's responses (targets)")
        targets = np.asarray(targets, dtype=np.float64).reshape(-1)
        if targets.shape != (n_images,) or not np.all(np.isfinite(targets)):
            raise ValueError(f"specialize: targets must be {n_images} finite responses, one per image, "
                             f"got shape {targets.shape}")
    if config.tune_mirrors:
        if mirror_targets is None:
            raise ValueError("specialize: SpecializeConfig.tune_mirrors needs the teacher's responses to the "
                             "images' mirrors (mirror_targets)")
        mirror_targets = np.asarray(mirror_targets, dtype=np.float64).reshape(-1)
        if mirror_targets.shape != (n_images,) or not np.all(np.isfinite(mirror_targets)):
            raise ValueError(f"specialize: mirror_targets must be {n_images} finite responses, one per image's "
                             f"mirror, got shape {mirror_targets.shape}")
    spec = shared.spec
    target = shared if target is None else target
    for what, m in (("shared", shared), ("target", target)):
        if m.spec.readout != "factorized" or neuron_id not in m.spec.neuron_ids:
            raise ValueError(f"specialize: needs a shared (factorized) model with output {neuron_id!r} "
                             f"as {what}, got a {m.spec.readout} one with outputs {m.spec.neuron_ids[:3]}...")
    index = target.spec.neuron_ids.index(neuron_id)
    t0 = time.perf_counter()
    k3, k4 = config.late_filters
    new_spec = CompactSpec(filters=(*spec.filters[:3], k3, k4), image_size=spec.image_size,
                           readout=config.readout, n_outputs=1, activation=spec.activation, output_units=spec.output_units,
                           neuron_ids=(neuron_id,))
    model = build_compact(new_spec, seed=config.seed)
    copy_early_(model, shared)
    src = target.state_dict()
    images = np.asarray(images)
    if config.flip and target_map is not None and len(target_map) == n_images:
        # the model is not mirror-symmetric: its map of the mirrors
        mirrored = np.ascontiguousarray(images[:, :, ::-1])
        target_map = torch.cat([target_map.float(), neuron_map(target, index, mirrored)])
    if early is None:
        a2 = _early(shared, images, flip=config.flip)  # (2N with the mirrors, K2, R, R)
    else:
        want = (n_images * (2 if config.flip else 1), spec.filters[2], *shared.spatial.shape[1:])
        if tuple(early.shape) != want:
            raise ValueError(f"specialize: early activations {tuple(early.shape)} != {want} (the shared "
                             f"model's layer 2 on {n_images} images{' and their mirrors' if config.flip else ''})")
        a2 = early
    t_early = time.perf_counter()
    if target_map is None:  # the shared model's own map: from the early activations just computed
        target_map = (_late_map(shared, index, a2) if target is shared
                      else neuron_map(target, index, images, flip=config.flip))
    t_map = time.perf_counter()
    target_map = target_map.float()
    if tuple(target_map.shape) != (len(a2), *shared.spatial.shape[1:]):
        raise ValueError(f"specialize: target map {tuple(target_map.shape)} != {(len(a2), *shared.spatial.shape[1:])} "
                         f"(one {tuple(shared.spatial.shape[1:])} map per image{' and mirror' if config.flip else ''})")
    weight = (target.spatial[index].detach().float().cpu() ** 2)
    weight = weight / weight.sum()
    mu, sd = target_map.mean(), target_map.std().clamp_min(1e-8)
    z = (target_map - mu) / sd
    with torch.random.fork_rng(devices=[]):  # the mixing's init is seeded too: same config, same model
        torch.manual_seed(int(config.seed))
        mix = torch.nn.Conv2d(k4, 1, 1)
    model = model.to(memory_format=torch.channels_last)
    mix = mix.to(memory_format=torch.channels_last)
    n = len(a2)
    model.train()

    def map_loss(idx):
        out = mix(model.layer_act(4, model.layer_act(3, a2[idx])))[:, 0]
        return (((out - z[idx]) ** 2) * weight).sum(dim=(1, 2)).mean()

    _fit_cosine(_late_params(model) + list(mix.parameters()), map_loss, n, config.passes, config.batch_size,
                config.lr, config.seed)
    t_fit = time.perf_counter()
    model.eval()
    with torch.no_grad():
        # BN statistics of the new layers as plain averages over the images (train-mode batches)
        for bn in (model.layer3_bn, model.layer4_bn):
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for s in range(0, n, 256):
            model.layer_act(4, model.layer_act(3, a2[s:s + 256]))
        for bn in (model.layer3_bn, model.layer4_bn):
            bn.momentum = new_spec.bn_momentum
        model.eval()
        fit = mix(model.layer_act(4, model.layer_act(3, a2[:1024])))[:, 0]
        resid = (((fit - z[:1024]) ** 2) * weight).sum() / (((z[:1024] - z[:1024].mean()) ** 2) * weight).sum()
        # readout: out = sum_xy s * (sd * (mix . a4') + mu) + b  ->  dense maps s[x,y] * sd * mix_k
        s_map = target.spatial[index].detach().float().cpu()  # (R, R)
        m = mix.weight.detach()[0, :, 0, 0]  # (K4,)
        if config.readout == "dense":
            w = s_map[:, :, None] * (sd * m)[None, None, :]
            model.readout.weight.copy_(w.reshape(1, -1))
            bias = src["spatial_bias"][index].float().cpu() + s_map.sum() * (sd * mix.bias.detach()[0] + mu)
            model.readout.bias.copy_(bias.reshape(1))
        else:  # the same function: sum_xy s * (mixing . a4) + b with mixing = sd * mix, its bias sd * b + mu
            model.mixing.weight.copy_((sd * mix.weight.detach()).reshape(1, k4, 1, 1))
            model.mixing.bias.copy_((sd * mix.bias.detach() + mu).reshape(1))
            model.spatial.copy_(s_map[None])
            model.spatial_bias.copy_(src["spatial_bias"][index].float().cpu().reshape(1))
    info = {"map_r2": float(1 - resid), "early_s": t_early - t0, "target_map_s": t_map - t_early,
            "map_fit_s": t_fit - t_map}
    if config.tune_passes:
        t = time.perf_counter()
        if config.tune_mirrors:  # a2 holds the mirrors' activations after the images' (flip)
            info["tune_train_r2"] = _tune(model, a2, np.concatenate([targets, mirror_targets]), config)
        else:
            info["tune_train_r2"] = _tune(model, a2[:n_images], targets, config)
        info["tune_s"] = time.perf_counter() - t
    model = model.to(memory_format=torch.contiguous_format)
    return model.eval(), {"seconds": time.perf_counter() - t0, **info}


def _tune(model: CompactModel, a2: torch.Tensor, targets: np.ndarray, config: SpecializeConfig) -> float:
    """Fit layers 3-4 and the readout to the teacher's responses on frozen layer-2 activations ``a2``
    (in place; BatchNorm in eval mode: its statistics stay the map fit's). The loss is on z-scored
    responses, the model keeps the teacher's units. Returns the squared correlation on the
    training images at the end."""
    mu, sd = float(targets.mean()), float(targets.std()) or 1.0
    z = torch.as_tensor((targets - mu) / sd, dtype=torch.float32)
    readout = ([*model.readout.parameters()] if model.spec.readout == "dense"
               else [*model.mixing.parameters(), model.spatial, model.spatial_bias])
    model.eval()

    def loss(idx):
        out = model.head(model.layer_act(4, model.layer_act(3, a2[idx])))[:, 0]
        return (((out - mu) / sd - z[idx]) ** 2).mean()

    _fit_cosine(_late_params(model) + readout, loss, len(a2), config.tune_passes, config.tune_batch_size,
                config.tune_lr, config.seed + 1)
    with torch.no_grad():
        out = torch.cat([model.head(model.layer_act(4, model.layer_act(3, a2[s:s + 256])))[:, 0]
                         for s in range(0, len(a2), 256)]).double().numpy()
    return float(np.corrcoef(out, targets)[0, 1] ** 2)


def _late_params(model: CompactModel) -> list[torch.nn.Parameter]:
    """The parameters of a neuron's own layers 3-4 (layer 3's depthwise kernels stay the shared model's)."""
    late = [model.layer3_point, model.layer3_bn, model.layer4_depth, model.layer4_point, model.layer4_bn]
    return [p for m in late for p in m.parameters()]


def _fit_cosine(params, loss_of, n: int, passes: float, batch_size: int, lr: float, seed: int) -> None:
    """Adam on ``loss_of(batch indices)`` for ``passes`` over ``n`` items, shuffled per pass from
    ``seed``, the rate annealed from ``lr`` to 0 on a cosine."""
    opt = torch.optim.Adam(params, lr=lr, eps=1e-7)
    steps = max(1, math.ceil(passes * n / batch_size))
    gen = torch.Generator().manual_seed(int(seed))
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss_of(idx).backward()
        opt.step()

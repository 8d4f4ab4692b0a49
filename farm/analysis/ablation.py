"""Filter ablation and dot-size / dot-number invariance (method.md §7.2, Fig. 4e).

Filters are counted as the paper counts them (method.md §3.2: spatial kernels, 2 K0 + K1 + K2 + K3 + K4),
in **paper layers 1-6** (1-based):

  paper layer 1: the K0 RGB kernels of code layer 0 (``layer0_conv.weight[j]``);
  paper layer p = 2..5: the depthwise kernels of code layer p-1, one per input channel
      (``depthwise(p-1).weight[j]``, K_{p-2} of them);
  paper layer 6: the K4 spatial readout maps (dense: ``readout_maps()[:, :, j]``; a factorized readout
      has one map per output, not per filter, so there filter j is layer-4 channel j's mixing column
      ``mixing.weight[:, j]``).

Ablating a filter sets its kernel weights to 0 (biases and BN untouched): what it computed no longer
depends on the stimulus (paper layer 1 leaves a constant channel; the others cut channel j of the
previous layer out of the next one).

Invariance index of an ablation, for a tuning curve over conditions (dot sizes -> DSI, dot numbers ->
dot-number invariance):

    index = clip(1 - range(ablated curve) / range(intact curve), 0, 1),   range = max - min

1 = the ablated model's curve is flat (invariant: the ablated filters carried all the tuning);
0 = the curve's range is intact (or larger). NaN when the intact curve is flat. The paper's exact
formula is not known (method.md §11 item 13); this one has the two anchors the paper states.

Cumulative ablation (Fig. 4e): within one paper layer, repeatedly ablate the filter whose ablation
(together with those already ablated) raises the index least, until the index reaches 1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from farm.analysis.common import (check_images, check_output, check_size, model_device,
                                  to_model_input)
from farm.analysis.dots import DotParams, number_stimuli, size_stimuli
from farm.models.compact import CompactModel


@dataclass(frozen=True)
class AblationParams:
    """layer: paper layer 1-6 (see module docstring). max_cumulative_steps: cap on the greedy
    cumulative ablation (None: until the index reaches 1 or every filter is ablated).
    tol: the index counts as 1 at >= 1 - tol (float32 noise leaves ~1e-5 of a curve that should be flat).
    batch_size: images per forward pass."""

    layer: int = 1
    max_cumulative_steps: int | None = None
    tol: float = 1e-4
    batch_size: int = 64

    def __post_init__(self):
        if self.layer not in range(1, 7):
            raise ValueError(f"AblationParams.layer must be a paper layer 1..6, got {self.layer}")


@dataclass
class AblationResult:
    """layer: paper layer. intact_curve: float64 (C,) tuning curve of the intact model.
    curves: float64 (K, C) with filter k ablated. index: float64 (K,) invariance index per filter
    (DSI for dot-size stimuli). conditions: float (C,) radii or dot counts. kind: "size" or "number"."""

    layer: int
    conditions: np.ndarray
    intact_curve: np.ndarray
    curves: np.ndarray
    index: np.ndarray
    kind: str
    output: int
    params: AblationParams = field(default_factory=AblationParams)

    def summary(self) -> dict[str, float]:
        tag = "dsi" if self.kind == "size" else "dni"
        return {f"{tag}_layer{self.layer}_max": float(np.nanmax(self.index)),
                f"{tag}_layer{self.layer}_mean": float(np.nanmean(self.index)),
                f"{tag}_layer{self.layer}_n_above_0.75": float(np.sum(self.index > 0.75))}


@dataclass
class CumulativeAblationResult:
    """order: int (T,) filters in the order ablated; index: float64 (T,) invariance index after each
    step; curves: float64 (T, C). The run stops when the index reaches 1 (within tol)."""

    layer: int
    conditions: np.ndarray
    intact_curve: np.ndarray
    order: np.ndarray
    index: np.ndarray
    curves: np.ndarray
    kind: str
    output: int
    params: AblationParams = field(default_factory=AblationParams)

    def n_to_invariance(self) -> int:
        """Filters ablated when the index first reached 1 (len(order) + 1 if it never did)."""
        hit = np.flatnonzero(self.index >= 1 - self.params.tol)
        return int(hit[0] + 1) if len(hit) else len(self.order) + 1

    def summary(self) -> dict[str, float]:
        tag = "dsi" if self.kind == "size" else "dni"
        return {f"{tag}_cumulative_layer{self.layer}_n_ablated": float(self.n_to_invariance()),
                f"{tag}_cumulative_layer{self.layer}_n_filters": float(len(self.order))}


def invariance_index(intact_curve, ablated_curve) -> float:
    """clip(1 - range(ablated) / range(intact), 0, 1); NaN if the intact curve is flat."""
    a = np.asarray(intact_curve, np.float64)
    b = np.asarray(ablated_curve, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"tuning curves must be 1-D of the same length, got {a.shape} and {b.shape}")
    ra = np.ptp(a)
    if not ra > 0:
        return float("nan")
    return float(np.clip(1.0 - np.ptp(b) / ra, 0.0, 1.0))


def n_filters(model: CompactModel, layer: int) -> int:
    """Number of filters in paper layer ``layer`` (1-6)."""
    k = model.spec.filters
    return {1: k[0], 2: k[0], 3: k[1], 4: k[2], 5: k[3], 6: k[4]}[_check_layer(layer)]


def _check_layer(layer: int) -> int:
    if int(layer) not in range(1, 7):
        raise ValueError(f"paper layer must be 1..6, got {layer}")
    return int(layer)


def _kernel(model: CompactModel, layer: int, j) -> torch.Tensor:
    """View of filter(s) j's kernel weights in paper layer ``layer``."""
    if layer == 1:
        return model.layer0_conv.weight.data[j]
    if layer <= 5:
        return model.depthwise(layer - 1).weight.data[j]
    if model.spec.readout == "dense":
        return model.readout_maps().data[:, :, j]
    return model.mixing.weight.data[:, j]


def _zero_(model: CompactModel, layer: int, filters) -> None:
    idx = torch.as_tensor(sorted(int(f) for f in filters), dtype=torch.long)
    if len(idx) == 0:
        return
    if idx.min() < 0 or idx.max() >= n_filters(model, layer):
        raise ValueError(f"paper layer {layer} has filters 0..{n_filters(model, layer) - 1}, got {idx.tolist()}")
    with torch.no_grad():
        if layer == 6 and model.spec.readout == "dense":
            model.readout_maps()[:, :, idx] = 0
        elif layer == 6:
            model.mixing.weight[:, idx] = 0
        elif layer == 1:
            model.layer0_conv.weight[idx] = 0
        else:
            model.depthwise(layer - 1).weight[idx] = 0


def ablate(model: CompactModel, layer: int, filters) -> CompactModel:
    """A copy of ``model`` with the kernel weights of ``filters`` in paper layer ``layer`` set to 0."""
    m = copy.deepcopy(model)
    _zero_(m, _check_layer(layer), filters)
    return m


class _FromLayer:
    """Evaluate a model on fixed stimuli many times with kernels of one paper layer changed.

    The activations before the changed code layer do not change, so they are computed once."""

    def __init__(self, model: CompactModel, layer: int, stimuli: np.ndarray, output: int, batch_size: int, dev):
        self.model, self.layer, self.output = model, layer, output
        self.start = 0 if layer == 1 else (layer - 1 if layer <= 5 else 5)  # first code layer recomputed
        self.inputs = []
        with torch.no_grad():
            for s in range(0, len(stimuli), batch_size):
                a = to_model_input(stimuli[s:s + batch_size], model, dev)
                for l in range(self.start):
                    a = model.layer_act(l, a)
                self.inputs.append(a)

    @torch.no_grad()
    def responses(self) -> np.ndarray:
        out = []
        for a in self.inputs:
            for l in range(self.start, 5):
                a = self.model.layer_act(l, a)
            out.append(self.model.head(a)[:, self.output].double().cpu())
        return torch.cat(out).numpy()


def _curve(r: np.ndarray, n_conditions: int) -> np.ndarray:
    return r.reshape(n_conditions, -1).mean(1)


def filter_invariance(model: CompactModel, stimuli: np.ndarray, n_conditions: int,
                      params: AblationParams | None = None, output: int = 0, conditions=None, kind: str = "size",
                      device=None) -> AblationResult:
    """Invariance index of every filter of paper layer ``params.layer``, ablated one at a time.

    stimuli: uint8 (n_conditions * m, H, W, 3), condition-major; the tuning curve is the mean response
    over each condition's m images (m = 1 for dot sizes, n_per_count for dot numbers).
    """
    params = params or AblationParams()
    output = check_output(model, output)
    stimuli = check_images(stimuli, "ablation stimuli")
    check_size(model, stimuli, "ablation stimuli")
    if len(stimuli) % n_conditions:
        raise ValueError(f"{len(stimuli)} stimuli do not split into {n_conditions} conditions")
    dev = model_device(model, device)
    work = copy.deepcopy(model).eval()
    run = _FromLayer(work, params.layer, stimuli, output, params.batch_size, dev)
    intact = _curve(run.responses(), n_conditions)
    k = n_filters(model, params.layer)
    curves = np.empty((k, n_conditions))
    for j in range(k):
        kernel = _kernel(work, params.layer, j)
        saved = kernel.clone()
        kernel.zero_()
        curves[j] = _curve(run.responses(), n_conditions)
        kernel.copy_(saved)
    index = np.array([invariance_index(intact, c) for c in curves])
    cond = np.arange(n_conditions) if conditions is None else np.asarray(conditions)
    return AblationResult(layer=params.layer, conditions=cond, intact_curve=intact, curves=curves, index=index,
                          kind=kind, output=output, params=params)


def cumulative_ablation(model: CompactModel, stimuli: np.ndarray, n_conditions: int,
                        params: AblationParams | None = None, output: int = 0, conditions=None, kind: str = "size",
                        device=None) -> CumulativeAblationResult:
    """Greedy cumulative ablation within paper layer ``params.layer`` (Fig. 4e): at each step ablate
    the remaining filter that raises the invariance index least, until the index reaches 1."""
    params = params or AblationParams()
    output = check_output(model, output)
    stimuli = check_images(stimuli, "ablation stimuli")
    check_size(model, stimuli, "ablation stimuli")
    dev = model_device(model, device)
    work = copy.deepcopy(model).eval()
    run = _FromLayer(work, params.layer, stimuli, output, params.batch_size, dev)
    intact = _curve(run.responses(), n_conditions)
    remaining = list(range(n_filters(model, params.layer)))
    limit = len(remaining) if params.max_cumulative_steps is None else min(params.max_cumulative_steps,
                                                                         len(remaining))
    order, indices, curves = [], [], []
    for _ in range(limit):
        best = None
        for j in remaining:
            kernel = _kernel(work, params.layer, j)
            saved = kernel.clone()
            kernel.zero_()
            c = _curve(run.responses(), n_conditions)
            kernel.copy_(saved)
            idx = invariance_index(intact, c)
            key = np.inf if np.isnan(idx) else idx
            if best is None or key < best[0]:
                best = (key, j, idx, c)
        _, j, idx, c = best
        _kernel(work, params.layer, j).zero_()
        remaining.remove(j)
        order.append(j)
        indices.append(idx)
        curves.append(c)
        if idx >= 1 - params.tol:
            break
    cond = np.arange(n_conditions) if conditions is None else np.asarray(conditions)
    return CumulativeAblationResult(layer=params.layer, conditions=cond, intact_curve=intact,
                                    order=np.asarray(order, np.int64), index=np.asarray(indices),
                                    curves=np.asarray(curves).reshape(-1, n_conditions), kind=kind,
                                    output=output, params=params)


def dot_size_invariance(model: CompactModel, center, params: AblationParams | None = None,
                        dots: DotParams | None = None, output: int = 0, cumulative: bool = False, device=None):
    """DSI per filter of ``params.layer`` (or the cumulative ablation) for dot-size tuning at ``center``
    (y, x) px, over ``dots.radii``."""
    dots = dots or DotParams()
    stim = size_stimuli(model.spec.image_size, center, dots.radii, dots)
    fn = cumulative_ablation if cumulative else filter_invariance
    return fn(model, stim, len(dots.radii), params, output, conditions=np.asarray(dots.radii), kind="size",
              device=device)


def dot_number_invariance(model: CompactModel, center, radius: float, params: AblationParams | None = None,
                          dots: DotParams | None = None, output: int = 0, cumulative: bool = False, device=None):
    """Dot-number invariance per filter (or cumulative) for random placements near ``center``."""
    dots = dots or DotParams()
    stim = number_stimuli(model.spec.image_size, center, radius, dots)
    fn = cumulative_ablation if cumulative else filter_invariance
    return fn(model, stim, len(dots.counts), params, output, conditions=np.asarray(dots.counts), kind="number",
              device=device)

"""Pruning a compact model, deepest layer first (method.md §5).

The paper's procedure ("reconstruction" criterion), on held-out pruning images and the teacher's
responses to them:

- layer 4 (§5.3): each filter f contributes c_f(img) = sum_{x,y} B[x,y,f] A4[img,x,y,f] to the output
  (B: the dense readout maps). Filters are dropped in order of increasing SD of c_f while the squared
  correlation of the kept contributions with the teacher stays above ``tau`` x its baseline.
- layers 3, 2, 1, 0 (§5.4): layer l's filters are judged by how well layer l+1's linear output Y
  (depthwise then pointwise, no bias, before BN) is reconstructed without them. Filters are ordered by
  s_j = sum (D_j - image mean of D_j)^2 * ||W_pw[:, j]||^2 and the K lowest are dropped, where K is
  where fv(K) = 1 - SS(Y_K - Y) / SS(Y) (both centred per output channel) crosses ``tau``.
  Layer 0 is judged through layer 1's kernels.
- At least ``min_filters`` (3) filters stay in every layer. Dropped filters are zeroed in place
  (§5.2); the narrower network is rebuilt only at the end (``farm.models.compact.narrow``).

The alternative "ablation" criterion follows the paper's figure legend (Ext. Data Fig. 2h: drop filters
whose ablation barely changes the model's output): per layer, deepest first, filters are ranked by
how much the squared correlation with the teacher falls when each one alone is zeroed, and dropped in
that order while the correlation^2 stays within ``delta`` of its value at the start of that layer.

Every statistic streams over batches (float64 accumulators), so 5,000 images of 112 px never sit in
memory at once. All forwards run in eval mode (BatchNorm running statistics), without gradients.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from farm.dataclass_dict import from_dict, to_dict
from farm.models.input import eval_mode, recenter
from farm.models.compact import CompactModel, CompactSpec, narrow, same_pad

log = logging.getLogger(__name__)

CRITERIA = ("reconstruction", "ablation")
SEARCHES = ("first", "binary")
N_LAYERS = 5


@dataclass(frozen=True)
class PruneConfig:
    """How to prune (method.md §5).

    tau: fraction of each layer's output variance that the kept filters must explain (paper: 0.9).
        For layer 4 it is a fraction of the baseline squared correlation with the teacher.
    criterion: "reconstruction" (the paper's code, §5.3-5.4) or "ablation" (§5.6, see ``delta``).
    delta: "ablation" only. Within each layer, filters are dropped while the squared Pearson
        correlation of the model output with the teacher stays >= its value at the start of that
        layer minus ``delta``; over the 5 layers it falls by at most 5 * delta.
    min_filters: every layer keeps at least this many filters (paper: 3). A layer that is already
        this narrow is left alone.
    off_by_one: False (default) honours the stated rule: the kept filters explain >= tau. True
        reproduces the paper's code, which drops one filter more than that (the kept set explains
        slightly under tau; method.md §5.3, §5.4, §11.10), and so its published widths K0..K4.
        The default is False because tau is the number users set and sweep: with the paper's rule a
        sweep over tau would trace a curve that is systematically one filter per layer below what
        each tau promises. The difference is at most one filter per layer. "reconstruction" only.
    search: how layers 0-3 find the crossing of the fv curve. "first" (default): the first number of
        dropped filters whose fv falls below tau; "binary": the paper's bisection. Both see the whole
        fv curve (it costs nothing extra here) and agree whenever fv falls monotonically as filters
        are dropped; where it does not, "first" is the conservative one and keeps "a higher tau never
        keeps fewer filters" true. Layer 4 always uses the paper's greedy first-crossing loop.
    iterative: prune one layer, call the caller's ``retrain`` hook (a short retrain), then the next
        layer, instead of the paper's single round (§5.5).
    batch_size: images per forward pass.
    max_filters: None (default, the paper) or five ints K0..K4: each layer keeps at most that many
        filters, the ones its criterion ranks highest, even where fewer would pass tau (or delta). For
        a start wider than the size a user wants (e.g. a 50-filter shared model, of which each neuron
        keeps its own 34 per early layer): the criterion picks which filters, the cap how many.
    compensate: "reconstruction", layers 0-3 only. False (default, the paper): dropped filters are
        zeroed and the rest left as they are. True: before zeroing, layer l+1's pointwise kernel and
        bias absorb the least-squares estimate of what the dropped filters fed it from the kept ones
        (the dropped channels of D regressed on the kept ones over the pruning images and pixels;
        as in channel pruning by feature-map reconstruction, He et al. 2017 / ThiNet). The choice of
        filters is unchanged; the pruned model reconstructs layer l+1 better, so less is left for
        the retrain to repair.
    """

    tau: float = 0.9
    criterion: str = "reconstruction"
    delta: float = 0.01
    min_filters: int = 3
    off_by_one: bool = False
    search: str = "first"
    iterative: bool = False
    batch_size: int = 64
    max_filters: tuple[int, ...] | None = None
    compensate: bool = False

    def __post_init__(self):
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"PruneConfig.tau must be in (0, 1], got {self.tau}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"PruneConfig.criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if not self.delta >= 0.0:
            raise ValueError(f"PruneConfig.delta must be >= 0, got {self.delta}")
        if int(self.min_filters) != self.min_filters or self.min_filters < 1:
            raise ValueError(f"PruneConfig.min_filters must be an int >= 1, got {self.min_filters}")
        if self.search not in SEARCHES:
            raise ValueError(f"PruneConfig.search must be one of {SEARCHES}, got {self.search!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"PruneConfig.batch_size must be an int >= 1, got {self.batch_size}")
        if self.compensate and self.criterion != "reconstruction":
            raise ValueError("PruneConfig.compensate needs criterion 'reconstruction' (its regression comes from "
                             f"that criterion's statistics), got criterion {self.criterion!r}")
        if self.max_filters is not None:
            caps = self.max_filters
            if (isinstance(caps, (str, bytes)) or not hasattr(caps, "__len__") or len(caps) != N_LAYERS
                    or any(isinstance(c, bool) or int(c) != c or c < self.min_filters for c in caps)):
                raise ValueError(f"PruneConfig.max_filters must be null or {N_LAYERS} ints >= min_filters "
                                 f"({self.min_filters}), one per layer K0..K4, got {caps!r}")
            object.__setattr__(self, "max_filters", tuple(int(c) for c in caps))

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        return from_dict(cls, d)


@dataclass
class LayerPruning:
    """One layer's pruning decision (indices are the layer's filters in the model it was made on).

    order: the filters from least to most important (score ascending; ties by index).
    scores: importance per filter (index = filter): SD of c_f (layer 4), s_j (layers 0-3), or the
        fall in squared correlation with the teacher when the filter alone is ablated ("ablation").
    curve: curve[m] = fv (or r2 for "ablation") after dropping order[:m], for m = 0..len(curve)-1.
    remove: the filters to drop, ascending. keep: the rest, ascending.
    value: curve at the chosen number of dropped filters, as a fraction of ``baseline`` for layer 4.
    baseline: layer 4: squared correlation of the full readout with the teacher; "ablation": r2
        before this layer; layers 0-3: 1.0 (fv is already a fraction).
    """

    layer: int
    order: list[int]
    scores: list[float]
    curve: list[float]
    remove: list[int]
    keep: list[int]
    value: float
    baseline: float
    compensation: tuple | None = field(default=None, repr=False)  # (A, c): see ``compensate_``


@dataclass
class PruneResult:
    """What ``prune`` returns.

    model: the rebuilt narrow CompactModel (``narrow(masked, keep)``; retrained if iterative).
    masked: the full-width model with the dropped filters zeroed (§5.2); same outputs as ``model``.
        In iterative mode it holds the retrained weights at the kept filters' original positions.
    keep: 5 ascending lists of the kept filters of layers 0-4, as indices of the input model.
    history: one dict per step, in the order pruned (layers 4, 3, 2, 1, 0): layer, filters_before,
        filters_after, removed (input-model indices), criterion, fv (fraction of variance / of
        baseline correlation^2 kept; "reconstruction") or r2 and r2_threshold ("ablation"),
        r2_teacher_before and r2_teacher (squared Pearson r of the model output with the targets on
        the pruning images before / after the step; after the retrain hook in iterative mode, where
        r2_teacher_pruned is the value before it).
    filters: (K0, K1, K2, K3, K4) of ``model``.
    """

    model: CompactModel
    masked: CompactModel
    keep: list[list[int]]
    history: list[dict] = field(default_factory=list)
    filters: tuple[int, ...] = ()


# -- zeroing -----------------------------------------------------------------------------------------
def zero_filters_(model: CompactModel, layer: int, filters: Sequence[int]) -> CompactModel:
    """Zero filters of ``layer`` in place, as the paper does (method.md §5.2); returns ``model``.

    Zeroes each filter's output column (layer-0 conv kernel or pointwise kernel) and its bias, then
    what reads it: layer+1's depthwise kernel and pointwise input row, or for layer 4 the readout map
    (factorized readout: the mixing weights). BatchNorm is left alone: the channel becomes a constant
    that nothing downstream reads, so ``narrow`` without these filters gives the same outputs.
    """
    _check_layer(layer, range(N_LAYERS))
    idx = _filter_index(model, layer, filters)
    if idx.numel() == 0:
        return model
    with torch.no_grad():
        if layer == 0:
            model.layer0_conv.weight[idx] = 0
            model.layer0_conv.bias[idx] = 0
        else:
            model.pointwise(layer).weight[idx] = 0
            model.pointwise(layer).bias[idx] = 0
        if layer < N_LAYERS - 1:
            model.depthwise(layer + 1).weight[idx] = 0
            model.pointwise(layer + 1).weight[:, idx] = 0
        elif model.spec.readout == "dense":
            model.readout_maps()[:, :, idx] = 0
        else:
            model.mixing.weight[:, idx] = 0
    return model


def masked_copy(model: CompactModel, keep: Sequence[Sequence[int]]) -> CompactModel:
    """A deep copy of ``model`` with every filter not in ``keep`` (5 index lists) zeroed (§5.2)."""
    if len(keep) != N_LAYERS:
        raise ValueError(f"masked_copy(): keep needs {N_LAYERS} index lists (layers 0-4), got {len(keep)}")
    out = copy.deepcopy(model)
    for layer, kept in enumerate(keep):
        kept_set = {int(i) for i in kept}
        k = model.spec.filters[layer]
        if not kept_set or min(kept_set) < 0 or max(kept_set) >= k:
            raise ValueError(f"masked_copy(): layer {layer} keep indices must be non-empty and within 0..{k - 1}")
        zero_filters_(out, layer, [j for j in range(k) if j not in kept_set])
    return out


def _check_single_output(model: CompactModel, where: str) -> None:
    if model.spec.n_outputs != 1:
        raise ValueError(f"{where}: needs a single-output model (dense readout, or a factorized one with one "
                         f"output), got readout={model.spec.readout!r} with {model.spec.n_outputs} outputs")


# -- per-layer decisions -----------------------------------------------------------------------------
def prune_last_layer(model: CompactModel, images, targets, config: PruneConfig | None = None,
                     device: str | torch.device = "cpu") -> LayerPruning:
    """Which layer-4 filters to drop, by the teacher-correlation rule (method.md §5.3). Pure.

    images: uint8 (N, H, W, 3); targets: teacher responses (N,). Filter f's contribution
    c_f = sum_{x,y} B[x,y,f] A4[x,y,f] (dense readout maps B; the readout bias is ignored). Filters are
    sorted by SD of c_f ascending; fv_m = corr(sum of c over order[m:], targets)^2. Dropping continues
    while fv_m > tau * fv_0 (the paper's greedy loop); with ``off_by_one`` the filter whose removal
    first breaks the rule is dropped too, as in the paper's code.
    """
    config = config or PruneConfig()
    device = _device(device)
    with eval_mode(_on_device(model, device)) as model:
        return _last_layer_decision(model, images, targets, config, device)


def _last_layer_decision(model, images, targets, config: PruneConfig, device) -> LayerPruning:
    _check_single_output(model, "prune_last_layer()")
    targets = _check_inputs(model, images, targets)
    k4 = model.spec.filters[4]
    maps = model.readout_weights()  # (R, R, K4)
    contrib = np.empty((len(images), k4), dtype=np.float64)
    with torch.no_grad():
        for start, x in _batches(model, images, config.batch_size, device):
            a4 = _activation(model, x, 4)
            c = torch.einsum("nfxy,xyf->nf", a4.double(), maps.double())
            contrib[start:start + len(c)] = c.cpu().numpy()

    sd = contrib.std(axis=0)
    order = np.argsort(sd, kind="stable")
    # Sums of the kept contributions after dropping order[:m], m = 0..K4 (m = K4: nothing left).
    tail_sums = np.zeros((k4 + 1, len(images)))
    tail_sums[:k4] = np.cumsum(contrib[:, order[::-1]], axis=1).T[::-1]
    curve = np.array([_r2(s, targets) for s in tail_sums])
    baseline = float(curve[0])
    passes = curve > config.tau * baseline
    n_remove = _n_remove(passes, k4, config.min_filters, config.off_by_one, "first", _cap(config, 4))
    value = float(curve[n_remove] / baseline) if baseline > 0 else 0.0
    return _decision(4, order, sd, curve, n_remove, value, baseline)


def prune_layer(model: CompactModel, layer: int, images, config: PruneConfig | None = None,
                device: str | torch.device = "cpu") -> LayerPruning:
    """Which filters of ``layer`` (0-3) to drop, by reconstruction of layer+1 (method.md §5.4). Pure.

    images: uint8 (N, H, W, 3). With X = layer's activation, D = layer+1's depthwise conv of X (its
    stride, 'same' padding, no bias; one channel per filter j of ``layer``) and W = layer+1's pointwise
    kernel (K_{l+1}, K_l), Y = W D is layer+1's output before bias and BN. Filters are ordered by
    s_j = sum_{img,x,y} (D_j - mean over images of D_j)^2 * ||W[:, j]||^2, ascending, and
    fv(m) = 1 - SS(Y_m - Y) / SS(Y), where Y_m drops the m lowest and both are centred per output
    channel over images and pixels. Outputs of layer+1 that are already zeroed drop out through W.

    fv(m) for every m comes from the streamed channel covariance C of D: SS(Y_m - Y) is the sum of
    (C * W^T W) over the dropped filters. The paper drops the m where fv(m-1) >= tau > fv(m); without
    ``off_by_one``, m - 1 (the kept set explains >= tau). If Y has no variance, every filter may go.
    """
    config = config or PruneConfig()
    _check_layer(layer, range(N_LAYERS - 1))
    device = _device(device)
    with eval_mode(_on_device(model, device)) as model:
        return _reconstruction_decision(model, layer, images, config, device)


def _reconstruction_decision(model, layer: int, images, config: PruneConfig, device) -> LayerPruning:
    _check_images(model, images)
    n = model.spec.filters[layer]
    n_pix = px_mean = px_m2 = ch_mean = ch_m2 = None
    n_img = 0
    with torch.no_grad():
        for _, x in _batches(model, images, config.batch_size, device):
            d = _depthwise(model, layer + 1, _activation(model, x, layer)).double()  # (B, K_l, H', W')
            # Per-pixel moments over images, for s_j.
            b_mean = d.mean(dim=0)
            b_m2 = ((d - b_mean) ** 2).sum(dim=0)
            # Channel covariance over images and pixels, for fv.
            flat = d.permute(0, 2, 3, 1).reshape(-1, n)
            f_mean = flat.mean(dim=0)
            fc = flat - f_mean
            f_m2 = fc.T @ fc
            if n_img == 0:
                n_img, px_mean, px_m2 = len(d), b_mean, b_m2
                n_pix, ch_mean, ch_m2 = len(flat), f_mean, f_m2
            else:
                n_img, px_mean, px_m2 = _merge_moments(n_img, px_mean, px_m2, len(d), b_mean, b_m2, False)
                n_pix, ch_mean, ch_m2 = _merge_moments(n_pix, ch_mean, ch_m2, len(flat), f_mean, f_m2, True)
        w = model.pointwise(layer + 1).weight[:, :, 0, 0].double()  # (K_{l+1}, K_l)
        scores = px_m2.sum(dim=(1, 2)) * (w ** 2).sum(dim=0)
        contrib = (ch_m2 * (w.T @ w)).cpu().numpy()  # SS(Y - Y_R) = contrib[R][:, R].sum()

    scores = scores.cpu().numpy()
    order = np.argsort(scores, kind="stable")
    ordered = contrib[np.ix_(order, order)]
    dropped_ss = np.concatenate([[0.0], np.diagonal(ordered.cumsum(axis=0).cumsum(axis=1))])
    total = dropped_ss[-1]
    curve = 1.0 - dropped_ss / total if total > 0 else np.ones(n + 1)
    curve[0] = 1.0
    passes = curve >= config.tau
    n_remove = _n_remove(passes, n, config.min_filters, config.off_by_one, config.search, _cap(config, layer))
    decision = _decision(layer, order, scores, curve, n_remove, float(curve[n_remove]), 1.0)
    if config.compensate and decision.remove:
        decision.compensation = _least_squares(ch_mean.cpu().numpy(), (ch_m2 / n_pix).cpu().numpy(),
                                               decision.keep, decision.remove)
    return decision


def _least_squares(mean: np.ndarray, cov: np.ndarray, keep: list[int], remove: list[int]):
    """D_R ~ A D_K + c, the least-squares regression of the dropped channels on the kept ones
    (a tiny ridge keeps it defined for constant or collinear channels)."""
    ckk = cov[np.ix_(keep, keep)]
    ridge = 1e-6 * max(float(np.trace(ckk)) / max(len(keep), 1), 1e-12)
    a = np.linalg.solve(ckk + ridge * np.eye(len(keep)), cov[np.ix_(keep, remove)]).T  # (|R|, |K|)
    return a, mean[remove] - a @ mean[keep]


def compensate_(model: CompactModel, decision: LayerPruning) -> CompactModel:
    """Fold a reconstruction decision's least-squares compensation into layer l+1 in place: with
    W = layer l+1's pointwise kernel, W[:, K] += W[:, R] A and its bias += W[:, R] c, so that
    W[:, K] D_K + bias estimates W D + bias without the dropped filters R. Returns ``model``."""
    if decision.compensation is None:
        return model
    a, c = decision.compensation
    point = model.pointwise(decision.layer + 1)
    with torch.no_grad():
        w = point.weight[:, :, 0, 0]
        keep = _filter_index(model, decision.layer, decision.keep)
        remove = _filter_index(model, decision.layer, decision.remove)
        w_r = w[:, remove].double()
        w[:, keep] += (w_r @ torch.as_tensor(a, dtype=torch.float64, device=w.device)).to(w.dtype)
        point.bias += (w_r @ torch.as_tensor(c, dtype=torch.float64, device=w.device)).to(w.dtype)
    return model


def ablate_layer(model: CompactModel, layer: int, images, targets, config: PruneConfig | None = None,
                 device: str | torch.device = "cpu") -> LayerPruning:
    """Which filters of ``layer`` (0-4) to drop by the "ablation" criterion (see PruneConfig). Pure.

    Ablating filter j (zeroing it, §5.2) equals zeroing channel j of the layer's activation before the
    next layer reads it, so one pass over the images scores every filter: r2_j = squared correlation
    with ``targets`` of the output with j alone ablated. Filters are ordered by r2_start - r2_j
    ascending; a second pass gives r2 after ablating each prefix of that order, and the longest prefix
    whose r2 never falls below r2_start - delta is dropped (at most n - min_filters).
    """
    config = config or PruneConfig()
    _check_layer(layer, range(N_LAYERS))
    device = _device(device)
    with eval_mode(_on_device(model, device)) as model:
        return _ablation_decision(model, layer, images, targets, config, device)


def _ablation_decision(model, layer: int, images, targets, config: PruneConfig, device) -> LayerPruning:
    targets = _check_inputs(model, images, targets)
    n = model.spec.filters[layer]
    max_remove = max(n - config.min_filters, 0)
    eye = torch.eye(n, dtype=torch.bool)
    singles = torch.cat([torch.ones(1, n, dtype=torch.bool), ~eye])  # row 0: nothing ablated
    outs = _ablated_outputs(model, layer, images, singles, config.batch_size, device)
    r2_start = _r2(outs[0], targets)
    importance = r2_start - np.array([_r2(o, targets) for o in outs[1:]])
    order = np.argsort(importance, kind="stable")
    prefixes = torch.ones(max_remove + 1, n, dtype=torch.bool)
    for m in range(1, max_remove + 1):
        prefixes[m, torch.as_tensor(order[:m])] = False
    if max_remove > 0:
        outs = _ablated_outputs(model, layer, images, prefixes[1:], config.batch_size, device)
        curve = np.array([r2_start] + [_r2(o, targets) for o in outs])
    else:
        curve = np.array([r2_start])
    passes = curve >= r2_start - config.delta
    n_remove = _n_remove(passes, n, config.min_filters, False, "first", _cap(config, layer))
    return _decision(layer, order, importance, curve, n_remove, float(curve[n_remove]), float(r2_start))


# -- the whole procedure -----------------------------------------------------------------------------
def prune(model: CompactModel, images, targets, config: PruneConfig | None = None,
          device: str | torch.device = "cpu",
          progress: Callable[[str, dict], None] | None = None,
          retrain: Callable[[CompactModel], CompactModel] | None = None) -> PruneResult:
    """Prune ``model`` layer by layer, 4 -> 0 (method.md §5), and rebuild it narrower.

    model: a CompactModel with the dense readout (not modified: pruning works on a copy on ``device``).
    images: uint8 (N, H, W, 3) pruning images (paper: 5,000 held-out ones); targets: the teacher's
    responses to them, (N,). progress: optional ``progress(stage, info)``, called with "start",
    "layer" (info = that step's history entry), "retrain" and "done".
    retrain: required when ``config.iterative``: called once after each layer as
    ``retrain(narrow_model) -> model`` (same widths); pruning continues from what it returns.
    """
    config = config or PruneConfig()
    _check_single_output(model, "prune()")
    targets = _check_inputs(model, images, targets)
    if config.iterative and not callable(retrain):
        raise ValueError("prune(): PruneConfig.iterative=True needs a retrain(model) -> model callable")
    full_spec = model.spec
    device = _device(device)
    current = copy.deepcopy(model).to(device).eval()
    # Input-model index of each filter of ``current``, per layer.
    original = [list(range(k)) for k in full_spec.filters]
    r2_now = _r2(_outputs(current, images, config.batch_size, device), targets)
    _report(progress, "start", {"filters": full_spec.filters, "r2_teacher": r2_now})
    history = []
    for layer in range(N_LAYERS - 1, -1, -1):
        before = len(original[layer])
        if config.criterion == "ablation":
            decision = ablate_layer(current, layer, images, targets, config, device)
        elif layer == N_LAYERS - 1:
            decision = prune_last_layer(current, images, targets, config, device)
        else:
            decision = prune_layer(current, layer, images, config, device)
        compensate_(current, decision)
        zero_filters_(current, layer, decision.remove)
        entry = {"layer": layer, "filters_before": before, "filters_after": len(decision.keep),
                 "removed": [original[layer][j] for j in decision.remove], "criterion": config.criterion,
                 "r2_teacher_before": r2_now}
        if config.criterion == "ablation":
            entry.update(r2=decision.value, r2_threshold=decision.baseline - config.delta)
        else:
            entry["fv"] = decision.value
            if layer == N_LAYERS - 1:
                entry["fv_baseline"] = decision.baseline
        original[layer] = [original[layer][j] for j in decision.keep]
        if config.iterative:
            widths = [list(range(k)) for k in current.spec.filters]
            widths[layer] = decision.keep
            current = narrow(current, widths).eval()
            entry["r2_teacher_pruned"] = _r2(_outputs(current, images, config.batch_size, device), targets)
            _report(progress, "retrain", {"layer": layer, "filters": current.spec.filters})
            current = _checked_retrained(retrain(current), current.spec, device)
        r2_now = _r2(_outputs(current, images, config.batch_size, device), targets)
        entry["r2_teacher"] = r2_now
        history.append(entry)
        log.debug("pruned layer %d: %s", layer, entry)
        _report(progress, "layer", dict(entry))

    keep = [sorted(k) for k in original]
    if config.iterative:
        final = current
        masked = _widen(current, full_spec, keep)
    else:
        masked = current
        final = narrow(masked, keep).eval()
    _report(progress, "done", {"filters": final.spec.filters, "r2_teacher": r2_now})
    return PruneResult(model=final, masked=masked, keep=keep, history=history,
                       filters=tuple(final.spec.filters))


# -- helpers -----------------------------------------------------------------------------------------
def _cap(config: PruneConfig, layer: int) -> int | None:
    return None if config.max_filters is None else config.max_filters[layer]


def _n_remove(passes: np.ndarray, n: int, min_filters: int, off_by_one: bool, search: str,
              max_keep: int | None = None) -> int:
    """How many of the ordered filters to drop, from passes[m] = (dropping the first m is acceptable).

    The crossing m* is the first m that fails (len(passes) if none). The stated rule drops m* - 1, the
    paper's code m* (off_by_one). At least n - max_keep where a cap is given; never more than
    n - min_filters.
    """
    n_curve = len(passes)
    if search == "first":
        failing = np.flatnonzero(~passes)
        crossing = int(failing[0]) if len(failing) else n_curve
    elif not passes[0]:
        crossing = 0
    else:  # bisection keeping passes[lo] and not passes[hi] (hi = n_curve: past the end)
        lo, hi = 0, n_curve
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if passes[mid] else (lo, mid)
        crossing = hi
    n_remove = crossing if off_by_one else crossing - 1
    if max_keep is not None:
        n_remove = max(n_remove, n - max_keep)
    return int(max(0, min(n_remove, n - min_filters, n_curve - 1)))


def _decision(layer, order, scores, curve, n_remove, value, baseline) -> LayerPruning:
    order = [int(j) for j in order]
    remove = sorted(order[:n_remove])
    return LayerPruning(layer=layer, order=order, scores=[float(s) for s in scores],
                        curve=[float(c) for c in curve], remove=remove,
                        keep=sorted(order[n_remove:]), value=value, baseline=baseline)


def _merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b, outer: bool):
    """Chan et al.'s pairwise merge of (count, mean, centred second moments): exact, no cancellation."""
    n = n_a + n_b
    delta = mean_b - mean_a
    cross = torch.outer(delta, delta) if outer else delta * delta
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + cross * (n_a * n_b / n)


def _r2(output: np.ndarray, targets: np.ndarray) -> float:
    """Squared Pearson r of two (N,) float64 vectors; 0 where either is constant."""
    o = output - output.mean()
    t = targets - targets.mean()
    denom = float(np.sqrt((o @ o) * (t @ t)))
    return float((o @ t) ** 2 / denom ** 2) if denom > 0 else 0.0


def _model_dtype(model: CompactModel) -> torch.dtype:
    return next(model.parameters()).dtype


def _device(device) -> torch.device:
    """``device`` normalised ("cuda" -> "cuda:0") so that it compares equal to a tensor's device."""
    return torch.empty(0, device=device).device


def _on_device(model: CompactModel, device) -> CompactModel:
    """``model`` itself when it already lives on ``device``, else a copy there (the caller's model
    is never moved)."""
    if not isinstance(model, CompactModel):
        raise TypeError(f"expected a CompactModel, got {type(model).__name__}")
    on = next(model.parameters()).device == device
    return model if on else copy.deepcopy(model).to(device)


def _batches(model: CompactModel, images, batch_size: int, device):
    dtype = _model_dtype(model)
    for start in range(0, len(images), batch_size):
        yield start, recenter(images[start:start + batch_size], device).to(dtype)


def _activation(model: CompactModel, x: torch.Tensor, layer: int) -> torch.Tensor:
    for l in range(layer + 1):
        x = model.layer_act(l, x)
    return x


def _depthwise(model: CompactModel, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Layer ``layer``'s depthwise conv of ``x`` (stride, Keras 'same' padding, no bias)."""
    s, ks = model.spec.strides[layer], model.spec.kernel_size
    return F.conv2d(same_pad(x, ks, s), model.depthwise(layer).weight, None, s, 0, 1, x.shape[1])


def _outputs(model: CompactModel, images, batch_size: int, device) -> np.ndarray:
    """Model outputs (N,) float64 on ``images``."""
    out = np.empty(len(images), dtype=np.float64)
    with torch.no_grad():
        for start, x in _batches(model, images, batch_size, device):
            y = model(x)[:, 0]
            out[start:start + len(y)] = y.double().cpu().numpy()
    return out


def _ablated_outputs(model: CompactModel, layer: int, images, masks: torch.Tensor, batch_size: int,
                     device) -> np.ndarray:
    """Outputs (V, N) with the layer's activation channels where masks[v] is False set to 0."""
    out = np.empty((len(masks), len(images)), dtype=np.float64)
    dtype = _model_dtype(model)
    masks = masks.to(device=device, dtype=dtype)[:, None, :, None, None]
    with torch.no_grad():
        for start, x in _batches(model, images, batch_size, device):
            a = _activation(model, x, layer)
            for v, mask in enumerate(masks):
                h = a * mask
                for l in range(layer + 1, N_LAYERS):
                    h = model.layer_act(l, h)
                out[v, start:start + len(h)] = model.head(h)[:, 0].double().cpu().numpy()
    return out


def _widen(model: CompactModel, full_spec: CompactSpec, keep: Sequence[Sequence[int]]) -> CompactModel:
    """The inverse of ``narrow``: a full-width model with ``model``'s weights at the ``keep`` positions
    and every other filter zeroed (§5.2), so that ``narrow(result, keep)`` equals ``model``."""
    p = next(model.parameters())
    wide = CompactModel(full_spec).to(device=p.device, dtype=p.dtype)
    idx = [torch.as_tensor(k, dtype=torch.long, device=p.device) for k in keep]
    src = model.state_dict()
    dst = wide.state_dict()
    with torch.no_grad():
        for name, t in dst.items():
            if not name.endswith("num_batches_tracked") and "_bn." not in name:
                t.zero_()
        dst["layer0_conv.weight"][idx[0]] = src["layer0_conv.weight"]
        dst["layer0_conv.bias"][idx[0]] = src["layer0_conv.bias"]
        for l in range(1, N_LAYERS):
            dst[f"layer{l}_depth.weight"][idx[l - 1]] = src[f"layer{l}_depth.weight"]
            dst[f"layer{l}_point.weight"][idx[l][:, None], idx[l - 1][None, :]] = src[f"layer{l}_point.weight"]
            dst[f"layer{l}_point.bias"][idx[l]] = src[f"layer{l}_point.bias"]
        for l in range(N_LAYERS):
            for name in ("weight", "bias", "running_mean", "running_var"):
                dst[f"layer{l}_bn.{name}"][idx[l]] = src[f"layer{l}_bn.{name}"]
            dst[f"layer{l}_bn.num_batches_tracked"].copy_(src[f"layer{l}_bn.num_batches_tracked"])
        if full_spec.readout == "dense":
            r = full_spec.readout_size
            dst["readout.weight"].view(r, r, full_spec.filters[4])[:, :, idx[4]] = \
                src["readout.weight"].view(r, r, len(keep[4]))
            dst["readout.bias"].copy_(src["readout.bias"])
        else:
            dst["mixing.weight"][:, idx[4]] = src["mixing.weight"]
            for name in ("mixing.bias", "spatial", "spatial_bias"):
                dst[name].copy_(src[name])
    wide.load_state_dict(dst)
    return wide.eval()


def _checked_retrained(model, spec: CompactSpec, device) -> CompactModel:
    if not isinstance(model, CompactModel):
        raise TypeError(f"prune(): the retrain hook must return a CompactModel, got {type(model).__name__}")
    if model.spec.filters != spec.filters:
        raise ValueError(f"prune(): the retrain hook changed the widths {spec.filters} -> {model.spec.filters}")
    return model.to(torch.device(device)).eval()


def _report(progress, stage: str, info: dict) -> None:
    if progress is not None:
        progress(stage, info)


def _check_layer(layer: int, allowed: range) -> None:
    if layer not in allowed:
        raise ValueError(f"layer must be in {allowed.start}..{allowed.stop - 1}, got {layer}")


def _filter_index(model: CompactModel, layer: int, filters: Sequence[int]) -> torch.Tensor:
    k = model.spec.filters[layer]
    idx = sorted({int(j) for j in filters})
    if idx and (idx[0] < 0 or idx[-1] >= k):
        raise ValueError(f"layer {layer} has filters 0..{k - 1}, got indices {idx}")
    return torch.as_tensor(idx, dtype=torch.long, device=next(model.parameters()).device)


def _check_images(model: CompactModel, images) -> None:
    shape = tuple(images.shape) if hasattr(images, "shape") else None
    size = model.spec.image_size
    if shape is None or len(shape) != 4 or shape[1:] != (size, size, 3):
        raise ValueError(f"images must be uint8 (N, {size}, {size}, 3) for this model "
                         f"(spec.image_size={size}), got shape {shape}")
    if len(images) < 2:
        raise ValueError(f"pruning needs at least 2 images, got {len(images)}")
    if images.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"images must be uint8 RGB 0-255, got dtype {images.dtype}")


def _check_inputs(model: CompactModel, images, targets) -> np.ndarray:
    _check_images(model, images)
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.shape != (len(images),):
        raise ValueError(f"targets must be the teacher's responses, shape ({len(images)},) like images, "
                         f"got {targets.shape}")
    if not np.isfinite(targets).all():
        raise ValueError("targets contain NaN or inf")
    return targets

"""Pruning (method.md §5): the paper's claims about it, checked on small real models.

Models here are "calibrated": their BatchNorm running statistics come from the images (with random
perturbations and random affine parameters), as in a trained network, so every layer's activations are
of order 1 and the zeroed channels are non-zero constants after BN.
"""

from __future__ import annotations

import copy
import re
import zipfile
from io import BytesIO

import numpy as np
import pytest
import torch

from farm.models.input import recenter
from farm.models.compact import CompactSpec, build_compact, narrow
from farm.prune import (
    PruneConfig,
    ablate_layer,
    compensate_,
    masked_copy,
    prune,
    prune_last_layer,
    prune_layer,
    zero_filters_,
)
from farm.prune import _depthwise  # layer+1's depthwise conv with its stride and 'same' padding

SIZE = 24
FILTERS = (12, 10, 11, 9, 8)  # unequal widths catch index mix-ups between layers


# -- helpers -----------------------------------------------------------------------------------------
def _images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields plus pixel noise: uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    coarse = torch.as_tensor(rng.uniform(0, 255, (n, 3, size // 4, size // 4)), dtype=torch.float32)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    img = smooth.permute(0, 2, 3, 1).numpy() + rng.normal(0, 20, (n, size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _calibrate_(model, images, seed: int = 0):
    """Set BN running stats from the images' pre-activations (perturbed) and random BN affine."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        x = recenter(images)
        for l in range(5):
            pre = model.layer_pre(l, x)
            mean, var = pre.mean(dim=(0, 2, 3)), pre.var(dim=(0, 2, 3))
            k = len(mean)
            bn = model.bn(l)
            bn.running_mean.copy_(mean + 0.3 * var.sqrt() * torch.randn(k, generator=gen))
            bn.running_var.copy_(var * (0.5 + 1.5 * torch.rand(k, generator=gen)))
            bn.weight.copy_(0.5 + torch.rand(k, generator=gen))
            bn.bias.copy_(0.3 * torch.randn(k, generator=gen))
            x = model.layer_act(l, x)
    return model


def _model(filters=FILTERS, images=None, seed: int = 0):
    model = build_compact(CompactSpec(filters=filters, image_size=SIZE), seed=seed)
    return _calibrate_(model, _images(120, seed=99) if images is None else images, seed)


def _outputs(model, images) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(recenter(images))[:, 0].double().numpy()


def _r2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1] ** 2)


def _teacher(model, images, noise: float = 0.3, seed: int = 1) -> np.ndarray:
    """Targets: the model's own output plus Gaussian noise of ``noise`` x its SD."""
    out = _outputs(model, images)
    return out + noise * out.std() * np.random.default_rng(seed).normal(size=len(out))


def _fv_brute(state, layer: int, removed, images) -> float:
    """fv of §5.4 computed directly: layer+1's linear output (no bias) with and without the removed
    filters' pointwise rows, each centred per channel over images and pixels."""
    dropped = copy.deepcopy(state)
    with torch.no_grad():
        dropped.pointwise(layer + 1).weight[:, list(removed)] = 0
        x = state.embed(recenter(images))[layer].double()
        ys = []
        for m in (state, dropped):
            m = copy.deepcopy(m).double()
            y = m.layer_pre(layer + 1, x) - m.pointwise(layer + 1).bias[None, :, None, None]
            ys.append(y - y.mean(dim=(0, 2, 3), keepdim=True))
    y, y_kept = ys
    return float(1 - ((y_kept - y) ** 2).sum() / (y ** 2).sum())


def _state_before(model, keep, layer: int):
    """The masked model as it stood when ``layer`` was pruned: deeper layers pruned, the rest whole."""
    return masked_copy(model, [keep[l] if l > layer else range(k) for l, k in enumerate(model.spec.filters)])


def _assert_same_outputs(a, b, images, atol=1e-5):
    oa, ob = _outputs(a, images), _outputs(b, images)
    assert np.abs(oa - ob).max() <= atol * max(1.0, np.abs(oa).max())


@pytest.fixture(scope="module")
def images():
    return _images(160)


@pytest.fixture(scope="module")
def model(images):
    return _model(images=images)


@pytest.fixture(scope="module")
def targets(model, images):
    return _teacher(model, images)


@pytest.fixture(scope="module")
def result(model, images, targets):
    return prune(model, images, targets, PruneConfig())


@pytest.fixture(scope="module")
def result_paper(model, images, targets):
    return prune(model, images, targets, PruneConfig(off_by_one=True))


# -- zeroing and rebuilding --------------------------------------------------------------------------
def test_zeroing_a_filter_zeroes_exactly_what_reads_it_and_leaves_bn_alone(model):
    m = copy.deepcopy(model)
    bn_before = {k: v.clone() for k, v in m.state_dict().items() if "_bn." in k}
    zero_filters_(m, 0, [2])
    zero_filters_(m, 2, [1, 3])
    zero_filters_(m, 4, [5])
    assert (m.layer0_conv.weight[2] == 0).all() and m.layer0_conv.bias[2] == 0
    assert (m.layer1_depth.weight[2] == 0).all() and (m.layer1_point.weight[:, 2] == 0).all()
    assert (m.layer2_point.weight[[1, 3]] == 0).all() and (m.layer2_point.bias[[1, 3]] == 0).all()
    assert (m.layer3_depth.weight[[1, 3]] == 0).all() and (m.layer3_point.weight[:, [1, 3]] == 0).all()
    assert (m.pointwise(4).weight[5] == 0).all() and m.pointwise(4).bias[5] == 0
    assert (m.readout_maps()[:, :, 5] == 0).all()
    # Nothing else was touched: the other filters' weights and every BN tensor are as before.
    assert torch.equal(m.layer0_conv.weight[3], model.layer0_conv.weight[3])
    assert torch.equal(m.readout_maps()[:, :, 4], model.readout_maps()[:, :, 4])
    assert all(torch.equal(v, bn_before[k]) for k, v in m.state_dict().items() if "_bn." in k)
    with pytest.raises(ValueError, match="layer 2 has filters 0..10"):
        zero_filters_(m, 2, [11])


@pytest.mark.parametrize("which", ["result", "result_paper"])
def test_the_rebuilt_model_equals_the_masked_model(which, request, model, images):
    res = request.getfixturevalue(which)
    assert res.filters == tuple(len(k) for k in res.keep) == res.model.spec.filters
    assert sum(res.filters) < sum(FILTERS)  # something was pruned
    fresh = _images(40, seed=7)  # images pruning never saw
    _assert_same_outputs(res.model, res.masked, fresh)
    _assert_same_outputs(narrow(res.masked, res.keep), res.masked, fresh)
    # The masked model is the input model with exactly the dropped filters zeroed.
    _assert_same_outputs(masked_copy(model, res.keep), res.masked, fresh)
    # The zeroed channels are non-zero constants after the calibrated BN, yet nothing reads them.
    with torch.no_grad():
        a0 = res.masked.embed(recenter(fresh))[0]
    dropped0 = [j for j in range(FILTERS[0]) if j not in res.keep[0]]
    assert dropped0 and a0[:, dropped0].abs().max() > 0


# -- the 90% rule --------------------------------------------------------------------------------------
def test_pruning_keeps_at_least_tau_of_each_layers_output_variance(result, model, images, targets):
    tau = PruneConfig().tau
    assert [h["layer"] for h in result.history] == [4, 3, 2, 1, 0]
    for h in result.history:
        layer = h["layer"]
        removed = [j for j in range(FILTERS[layer]) if j not in result.keep[layer]]
        assert sorted(h["removed"]) == removed
        if layer == 4:
            # Teacher-correlation rule: corr^2 of the kept readout vs the full one, both measured directly.
            kept_only = masked_copy(model, [range(k) for k in FILTERS[:4]] + [result.keep[4]])
            fv = _r2(_outputs(kept_only, images), targets) / _r2(_outputs(model, images), targets)
        else:
            fv = _fv_brute(_state_before(model, result.keep, layer), layer, removed, images)
        assert fv >= tau
        assert h["fv"] == pytest.approx(fv, abs=1e-4)


def test_the_papers_rule_keeps_slightly_under_tau(result_paper, result, model, images, targets):
    """method.md §5.3/§5.4/§11.10: the paper's code drops one filter more than tau allows."""
    tau = PruneConfig().tau
    for h in result_paper.history:
        layer = h["layer"]
        if h["filters_after"] == PruneConfig().min_filters:
            continue  # the floor of 3, not the rule, decided this layer
        removed = [j for j in range(FILTERS[layer]) if j not in result_paper.keep[layer]]
        if layer == 4:
            kept_only = masked_copy(model, [range(k) for k in FILTERS[:4]] + [result_paper.keep[4]])
            fv = _r2(_outputs(kept_only, images), targets) / _r2(_outputs(model, images), targets)
        else:
            fv = _fv_brute(_state_before(model, result_paper.keep, layer), layer, removed, images)
        assert fv < tau
    # Same model, same layer-4 decision input: exactly one filter fewer (unless at the floor).
    honest, paper = result.history[0], result_paper.history[0]
    assert paper["filters_after"] == max(honest["filters_after"] - 1, PruneConfig().min_filters)


def _route_signal_(model, layer: int, signal, tiny, images):
    """Make only ``signal`` filters of ``layer`` feed layer+1, each through its own output channel with
    an equal share of layer+1's output variance; ``tiny`` filters feed it with 1e-6 of a share."""
    with torch.no_grad():
        x = model.embed(recenter(images))[layer]
        d = torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, (2, 2, 2, 2)), model.depthwise(layer + 1).weight, groups=x.shape[1])
        ss = ((d - d.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum(dim=(0, 2, 3))
        assert (ss[list(signal)] > 0).all()
        w = model.pointwise(layer + 1).weight
        w.zero_()
        for o, j in enumerate(signal):
            w[o, j] = ss[j].rsqrt()
        for j in tiny:
            w[len(signal), j] = 1e-3 * ss[j].rsqrt()
    return model


@pytest.mark.parametrize("signal", [(1, 4, 6, 8), (2, 9)])
def test_only_the_filters_that_carry_signal_are_kept(signal, images):
    """Layer 2 feeds layer 3 only through ``signal`` (layer 3 is stride 1, so padding is symmetric)."""
    model = _model(images=images)
    tiny = (0, 5)
    _route_signal_(model, 2, signal, tiny, images)
    kept = prune_layer(model, 2, images, PruneConfig()).keep
    if len(signal) >= 3:
        assert kept == sorted(signal)
    else:
        assert set(signal) <= set(kept) and len(kept) == 3
        assert set(kept) - set(signal) <= set(tiny)  # the floor is filled by the next-best filter


def test_off_by_one_keeps_exactly_one_filter_fewer(images):
    model = _model(images=images)
    signal = (1, 4, 6, 8)
    _route_signal_(model, 2, signal, (0, 5), images)
    honest = prune_layer(model, 2, images, PruneConfig(min_filters=1))
    paper = prune_layer(model, 2, images, PruneConfig(min_filters=1, off_by_one=True))
    assert honest.keep == sorted(signal)
    assert len(paper.keep) == len(signal) - 1 and set(paper.keep) < set(signal)
    assert honest.value >= 0.9 > paper.value == pytest.approx(0.75, abs=1e-6)  # each carries 1/4


def _decorrelated_readout_(model, signal, tiny, images):
    """Readout maps such that only ``signal`` layer-4 filters contribute, with uncorrelated equal-SD
    contributions c_f; ``tiny`` filters contribute 1e-3 of that SD; the rest nothing."""
    rng = np.random.default_rng(3)
    with torch.no_grad():
        a4 = model.embed(recenter(images))[4].double().numpy()  # (N, K4, R, R)
    a4 = a4 - a4.mean(axis=0)
    maps = np.zeros(a4.shape[2:] + (a4.shape[1],))
    contribs = []
    for f in list(signal) + list(tiny):
        a = a4[:, f].reshape(len(a4), -1)
        b = rng.choice([-1.0, 1.0], size=a.shape[1])
        if contribs:  # no covariance with the earlier signal contributions: b orthogonal to a^T c
            v = a.T @ np.stack(contribs[:len(signal)], axis=1)
            b = b - v @ np.linalg.lstsq(v, b, rcond=None)[0]
        c = a @ b
        scale = (1.0 if f in signal else 1e-3) / c.std()
        contribs.append(c * scale)
        maps[:, :, f] = (b * scale).reshape(a4.shape[2:])
    with torch.no_grad():
        model.readout_maps().copy_(torch.as_tensor(maps, dtype=torch.float32))
    return model


def test_last_layer_keeps_the_filters_the_readout_uses(images):
    model = _model(images=images)
    signal, tiny = (0, 3, 5, 6), (2, 7)
    _decorrelated_readout_(model, signal, tiny, images)
    targets = _outputs(model, images)
    res = prune(model, images, targets, PruneConfig())
    assert res.keep[4] == sorted(signal)
    # Without any one of 4 uncorrelated equal contributions, corr^2 = 3/4 < 0.9: the paper's rule drops it.
    paper = prune_last_layer(model, images, targets, PruneConfig(off_by_one=True))
    assert len(paper.keep) == 3 and set(paper.keep) < set(signal)
    assert paper.value == pytest.approx(0.75, abs=0.02)


# -- monotonicity, floors, purity ----------------------------------------------------------------------
def test_a_higher_tau_never_keeps_fewer_filters(model, images, targets, result):
    taus = [0.5, 0.8, 0.9, 0.99]
    per_layer = []
    for tau in taus:
        cfg = PruneConfig(tau=tau)
        per_layer.append([len(prune_layer(model, l, images, cfg).keep) for l in range(4)]
                         + [len(prune_last_layer(model, images, targets, cfg).keep)])
    per_layer = np.array(per_layer)
    assert (np.diff(per_layer, axis=0) >= 0).all()
    assert per_layer[-1].sum() > per_layer[0].sum()
    # The whole cascade (each layer judged on the already-pruned deeper layers) on this model.
    totals = [prune(model, images, targets, PruneConfig(tau=0.5)).model.filter_count(),
              result.model.filter_count(),  # tau = 0.9
              prune(model, images, targets, PruneConfig(tau=0.99)).model.filter_count()]
    assert totals == sorted(totals)


def test_binary_search_agrees_with_first_crossing_where_fv_falls_monotonically(model, images):
    for l in range(4):
        first = prune_layer(model, l, images, PruneConfig(search="first"))
        binary = prune_layer(model, l, images, PruneConfig(search="binary"))
        if (np.diff(first.curve) <= 1e-12).all():
            assert binary.keep == first.keep
        assert binary.value >= 0.9  # any crossing the bisection finds honours tau


def test_min_filters_is_respected(images, targets, model):
    res = prune(model, images, targets, PruneConfig(tau=0.2, min_filters=5))
    assert min(res.filters) >= 5 and 5 in res.filters
    narrow_model = _model(filters=(4, 4, 4, 4, 4), images=images)
    res = prune(narrow_model, images, _teacher(narrow_model, images), PruneConfig(min_filters=5))
    assert res.filters == (4, 4, 4, 4, 4) and all(h["removed"] == [] for h in res.history)


def test_max_filters_caps_each_layer_and_keeps_the_criterions_best(images, targets, model):
    """A cap keeps at most that many filters per layer, and they are the ones the criterion ranks highest:
    the uncapped decision's ranking, cut at the cap (tau 1.0 alone keeps every filter)."""
    caps = (7, 6, 8, 5, 4)
    for criterion in ("reconstruction", "ablation"):
        res = prune(model, images, targets, PruneConfig(tau=1.0, delta=0.0, criterion=criterion, max_filters=caps))
        assert res.filters == caps, criterion
    uncapped = prune_layer(model, 2, images, PruneConfig(tau=1.0))
    capped = prune_layer(model, 2, images, PruneConfig(tau=1.0, max_filters=caps))
    assert len(uncapped.keep) == FILTERS[2] and len(capped.keep) == caps[2]
    assert capped.keep == sorted(uncapped.order[FILTERS[2] - caps[2]:])
    assert capped.value == pytest.approx(uncapped.curve[FILTERS[2] - caps[2]])
    last = prune_last_layer(model, images, targets, PruneConfig(tau=1.0, max_filters=caps))
    assert last.keep == sorted(last.order[FILTERS[4] - caps[4]:])
    # a cap above what tau keeps changes nothing
    loose = prune(model, images, targets, PruneConfig(tau=0.9, max_filters=FILTERS))
    assert loose.filters == prune(model, images, targets, PruneConfig(tau=0.9)).filters
    for bad in ((7, 6, 8, 5), (7, 6, 8, 5, 2), (7, 6, 8, 5, 4.5), "77777"):
        with pytest.raises(ValueError, match="max_filters"):
            PruneConfig(max_filters=bad)


def test_compensation_is_the_least_squares_reconstruction_of_the_next_layer(model, images, targets):
    """With ``compensate``, layer l+1's output (pre-BN, with bias) without the dropped filters is the
    least-squares fit of the full one from the kept filters (and a constant): the best any change of
    layer l+1's pointwise kernel and bias can do, and far better than zeroing alone."""
    cfg = PruneConfig(tau=1.0, max_filters=(6, 5, 6, 5, 4), compensate=True)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        acts = model.embed(recenter(images))
        for layer in range(4):
            decision = prune_layer(model, layer, images, cfg)
            assert decision.compensation is not None and len(decision.keep) == cfg.max_filters[layer]
            x = acts[layer]
            y = model.layer_pre(layer + 1, x).double()
            zeroed = zero_filters_(copy.deepcopy(model), layer, decision.remove)
            fixed = zero_filters_(compensate_(copy.deepcopy(model), decision), layer, decision.remove)
            err_zeroed = float(((zeroed.layer_pre(layer + 1, x).double() - y) ** 2).sum())
            err_fixed = float(((fixed.layer_pre(layer + 1, x).double() - y) ** 2).sum())
            # the optimum: regress y on the kept channels of the depthwise output and a constant
            d = _depthwise(model, layer + 1, x).double().permute(0, 2, 3, 1).reshape(-1, FILTERS[layer])
            design = torch.cat([d[:, decision.keep], torch.ones(len(d), 1, dtype=torch.float64)], dim=1)
            yf = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
            err_best = float(((design @ torch.linalg.lstsq(design, yf).solution - yf) ** 2).sum())
            assert err_fixed == pytest.approx(err_best, rel=1e-4), layer
            assert err_fixed < 0.9 * err_zeroed, layer
    # the same filters either way (the compensation changes the weights, not the choice)
    plain = prune(model, images, targets, PruneConfig(tau=1.0, max_filters=cfg.max_filters))
    comp = prune(model, images, targets, cfg)
    assert comp.keep == plain.keep
    assert not torch.equal(comp.model.pointwise(1).weight, plain.model.pointwise(1).weight)
    assert prune_layer(model, 2, images, PruneConfig(tau=1.0, max_filters=cfg.max_filters)).compensation is None
    with pytest.raises(ValueError, match="compensate"):
        PruneConfig(criterion="ablation", compensate=True)


def test_the_input_model_is_not_modified_and_pruning_is_deterministic(model, images, targets, result):
    m = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    again = prune(m, images, targets, PruneConfig())
    assert m.training
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert again.keep == result.keep and again.history == result.history
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in result.model.state_dict().items())


def test_streaming_over_batches_does_not_change_the_decisions(model, images, targets, result):
    res = prune(model, images, targets, PruneConfig(batch_size=23))
    assert res.keep == result.keep
    for a, b in zip(res.history, result.history):
        assert a["fv"] == pytest.approx(b["fv"], abs=1e-9)
        assert a["r2_teacher"] == pytest.approx(b["r2_teacher"], abs=1e-6)


def test_history_reports_each_step_and_progress_sees_it(model, images, targets, result):
    seen = []
    prune(model, images, targets, PruneConfig(), progress=lambda stage, info: seen.append((stage, info)))
    assert [s for s, _ in seen] == ["start"] + ["layer"] * 5 + ["done"]
    assert [info for s, info in seen if s == "layer"] == result.history
    r2 = [result.history[0]["r2_teacher_before"]] + [h["r2_teacher"] for h in result.history]
    assert r2[0] == pytest.approx(_r2(_outputs(model, images), targets), abs=1e-9)
    assert r2[-1] == pytest.approx(_r2(_outputs(result.model, images), targets), abs=1e-6)
    for h, before in zip(result.history, r2):
        assert h["r2_teacher_before"] == before and h["filters_after"] <= h["filters_before"]


# -- the ablation criterion ----------------------------------------------------------------------------
def test_ablation_drops_filters_that_do_not_matter_within_delta_per_layer():
    """Each layer may lower r2 to the teacher by at most delta (so 5 * delta in all)."""
    imgs = _images(100, seed=5)
    model = _model(filters=(6, 6, 7, 7, 7), images=imgs)
    dead3, dead4 = [1, 4], [0, 2, 5]
    with torch.no_grad():
        model.pointwise(4).weight[:, dead3] = 0  # layer 4 ignores these layer-3 filters
        model.readout_maps()[:, :, dead4] = 0    # the readout ignores these layer-4 filters
    targets = _teacher(model, imgs, noise=0.2)
    delta = 0.01
    res = prune(model, imgs, targets, PruneConfig(criterion="ablation", delta=delta))
    assert not set(dead4) & set(res.keep[4]) and not set(dead3) & set(res.keep[3])
    for h in res.history:
        assert h["r2_teacher"] >= h["r2_teacher_before"] - delta - 1e-9
        assert h["r2"] == pytest.approx(h["r2_teacher"], abs=1e-6)
    r2_start = _r2(_outputs(model, imgs), targets)
    assert _r2(_outputs(res.model, imgs), targets) >= r2_start - 5 * delta - 1e-6
    _assert_same_outputs(res.model, res.masked, imgs)
    # A filter whose ablation alone costs more than delta is kept.
    layer4 = ablate_layer(model, 4, imgs, targets, PruneConfig(criterion="ablation", delta=delta))
    costly = [f for f, cost in enumerate(layer4.scores) if cost > delta]
    assert costly and set(costly) <= set(layer4.keep)


# -- iterative pruning ---------------------------------------------------------------------------------
def test_iterative_pruning_retrains_once_per_layer(images, targets, model):
    calls = []

    def retrain(m):
        """A short real retrain: 4 Adam steps of MSE on the pruning pairs (BN in training mode)."""
        calls.append(m.spec.filters)
        gen = torch.Generator().manual_seed(len(calls))
        opt = torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-7)
        y = torch.as_tensor(targets, dtype=torch.float32)
        m.train()
        for _ in range(4):
            idx = torch.randperm(len(images), generator=gen)[:32]
            loss = ((m(recenter(images[idx.numpy()]))[:, 0] - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return m

    res = prune(model, images, targets, PruneConfig(iterative=True), retrain=retrain)
    assert len(calls) == 5
    # Call i sees layers 4..4-i already narrowed to their final widths and the others whole.
    for i, widths in enumerate(calls):
        done = range(4 - i, 5)
        assert widths == tuple(res.filters[l] if l in done else FILTERS[l] for l in range(5))
    assert calls[-1] == res.filters
    _assert_same_outputs(res.model, res.masked, _images(40, seed=7))
    # The result is the retrained network, not the input's surviving weights.
    assert not torch.equal(res.model.layer0_conv.weight, narrow(model, res.keep).layer0_conv.weight)
    assert all("r2_teacher_pruned" in h for h in res.history)
    with pytest.raises(ValueError, match="retrain"):
        prune(model, images, targets, PruneConfig(iterative=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pruning_on_a_gpu_decides_as_on_the_cpu(model, images, targets, result):
    res = prune(model, images, targets, PruneConfig(), device="cuda")
    assert res.keep == result.keep
    assert next(res.model.parameters()).is_cuda and not next(model.parameters()).is_cuda
    for a, b in zip(res.history, result.history):
        assert a["fv"] == pytest.approx(b["fv"], abs=1e-5)
    _assert_same_outputs(res.model.cpu(), result.model, images[:40], atol=1e-4)


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_message(model, images, targets):
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, 24, 24, 3\)"):
        prune(model, images[:, :16, :16], targets)
    with pytest.raises(ValueError, match=r"targets must be .* shape \(160,\)"):
        prune(model, images, targets[:10])
    with pytest.raises(ValueError, match="NaN"):
        prune(model, images, np.full(len(images), np.nan))
    with pytest.raises(ValueError, match="uint8"):
        prune(model, images.astype(np.float32), targets)
    with pytest.raises(ValueError, match="tau"):
        PruneConfig(tau=1.5)
    with pytest.raises(ValueError, match="criterion"):
        PruneConfig(criterion="magnitude")
    with pytest.raises(ValueError, match="min_filters"):
        PruneConfig(min_filters=0)
    with pytest.raises(ValueError, match="layer must be in 0..3"):
        prune_layer(model, 4, images)
    shared = build_compact(CompactSpec(filters=(4, 4, 4, 4, 4), image_size=SIZE, readout="factorized",
                                       n_outputs=2), seed=0)
    with pytest.raises(ValueError, match="dense"):
        prune(shared, images, targets)


# -- a published model ---------------------------------------------------------------------------------
def _session_images(v4_dir, session: str, n: int) -> np.ndarray:
    """The first ``n`` images (imageK.jpg, K = 1..n) of a session zip, looked up by name."""
    from PIL import Image

    with zipfile.ZipFile(v4_dir / "images" / f"images_{session}.zip") as z:
        by_number = {int(m.group(1)): name for name in z.namelist()
                     if (m := re.search(r"image(\d+)\.jpg$", name))}
        return np.stack([np.asarray(Image.open(BytesIO(z.read(by_number[k]))).convert("RGB"))
                         for k in range(1, n + 1)])


@pytest.mark.slow  # about 30 s of CPU: 300 images of 112 px through a 48-filter network, 11 passes
def test_repruning_a_published_compact_model(published_dir, v4_dir):
    from farm.models.published import load_published_compact

    pt = published_dir / "compact_models" / "models_torch" / "compact_model_190923_neuron0.pt"
    model = load_published_compact(pt)
    imgs = _session_images(v4_dir, "190923", 300)
    targets = _outputs(model, imgs)
    res = prune(model, imgs, targets, PruneConfig(batch_size=100))
    assert [h["layer"] for h in res.history] == [4, 3, 2, 1, 0]
    assert all(h["filters_after"] <= h["filters_before"] for h in res.history)
    assert all(a <= b for a, b in zip(res.filters, model.spec.filters))
    assert all(h["fv"] >= 0.9 for h in res.history)
    assert res.history[0]["r2_teacher_before"] == pytest.approx(1.0, abs=1e-9)
    _assert_same_outputs(res.model, res.masked, imgs[:50], atol=1e-4)


def test_a_factorized_single_output_model_prunes_as_its_dense_slice(images):
    """A one-output model with the shared models' factorized readout (spatial map x channel mixing:
    farm.specialize's ``readout: factorized``) makes the decisions its exact dense slice makes, and
    the rebuilt model stays factorized and computes the same function."""
    from farm.models.compact import output_slice

    spec = CompactSpec(filters=FILTERS, image_size=SIZE, readout="factorized", n_outputs=1, neuron_ids=("s:0",))
    fact = _calibrate_(build_compact(spec, seed=3), images, 3)
    with torch.no_grad():  # a readout map with structure, so filters differ in what they carry
        fact.spatial.normal_(generator=torch.Generator().manual_seed(4))
    dense = output_slice(fact, 0)
    assert torch.allclose(fact.readout_weights(), dense.readout_maps(), atol=1e-6)
    targets = _outputs(dense, images)
    a, b = prune(fact, images, targets, PruneConfig()), prune(dense, images, targets, PruneConfig())
    assert a.keep == b.keep and sum(a.filters) < sum(FILTERS)
    assert a.model.spec.readout == "factorized" and a.model.spec.param_count() < b.model.spec.param_count()
    fresh = _images(40, seed=7)
    _assert_same_outputs(a.model, b.model, fresh, atol=1e-4)
    _assert_same_outputs(a.model, a.masked, fresh)
    shared = build_compact(CompactSpec(filters=FILTERS, image_size=SIZE, readout="factorized", n_outputs=2), seed=0)
    with pytest.raises(ValueError, match="single-output model"):
        prune(shared, images, np.zeros((len(images), 2)), PruneConfig())

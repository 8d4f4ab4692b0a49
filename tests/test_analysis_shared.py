"""Shared compact models: build, distill from a many-neuron teacher, sweep K, compare with per-neuron models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.analysis import (SharedTrainParams, build_shared, compare_with_per_neuron, r2_to_teacher, sweep_shared_k,
                           train_shared)
from farm.data.images import natural_like
from farm.models.base import CompactTeacher
from farm.models.compact import CompactSpec, build_compact


SIZE = 32
N_NEURONS = 3


@pytest.fixture(scope="module")
def data():
    """A teacher of 3 neurons (tiny per-neuron compact models) and its responses to 320 + 96 images."""
    rng = np.random.default_rng(0)
    neurons = [build_compact(CompactSpec(filters=(4, 4, 3, 3, 3), image_size=SIZE, neuron_ids=(f"t:{i}",)),
                             seed=10 + i) for i in range(N_NEURONS)]
    teacher = CompactTeacher(neurons)
    train, held = natural_like(SIZE, 320, rng), natural_like(SIZE, 96, rng)
    return teacher, train, teacher.predict(train), held, teacher.predict(held)


def test_build_shared_has_the_papers_layout():
    m = build_shared(5, 219, image_size=112, late_filters=100)
    assert m.spec.filters == (5, 5, 5, 100, 100)
    assert m.spec.readout == "factorized" and m.spec.n_outputs == 219
    assert m.spec.param_count() == 208_909  # method.md §8.2, K_e = 5
    assert m(torch.zeros(2, 3, 112, 112)).shape == (2, 219)


def test_distillation_fits_the_teacher_better_than_the_untrained_model(data):
    teacher, train, targets, held, held_targets = data
    # 60 steps: lr raised from the paper's 1e-4, BN statistics recalibrated (they need ~500 steps otherwise)
    params = SharedTrainParams(late_filters=8, passes=6, batch_size=32, lr=3e-3, recalibrate_bn_images=320, seed=0)
    model = build_shared(4, N_NEURONS, image_size=SIZE, late_filters=8, seed=0)
    before = r2_to_teacher(model, held, held_targets)
    res = train_shared(model, train, targets, params, log_every=10)
    after = r2_to_teacher(res.model, held, held_targets)
    assert res.steps == 60
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert np.mean(after) > np.mean(before) + 0.1
    assert not res.model.training


def test_frozen_early_kernels_stay_at_their_init(data):
    _, train, targets, _, _ = data
    model = build_shared(3, N_NEURONS, image_size=SIZE, late_filters=4, seed=1)
    init = [model.layer0_conv.weight.detach().clone(), model.depthwise(1).weight.detach().clone(),
            model.depthwise(2).weight.detach().clone()]
    late = model.depthwise(3).weight.detach().clone()
    train_shared(model, train[:64], targets[:64],
                 SharedTrainParams(late_filters=4, passes=1, batch_size=32, lr=1e-2, freeze_early_kernels=True))
    for w, w0 in zip([model.layer0_conv.weight, model.depthwise(1).weight, model.depthwise(2).weight], init):
        assert torch.equal(w, w0)
    assert not torch.equal(model.depthwise(3).weight, late)  # the rest trains (and is smoothed)


def test_sweep_over_k_and_comparison_table(data):
    teacher, train, _, held, held_targets = data
    params = SharedTrainParams(late_filters=6, passes=2, batch_size=32, lr=3e-3, recalibrate_bn_images=128)
    sweep = sweep_shared_k([2, 4], train, teacher=teacher, eval_images=held, params=params)
    assert sweep.r2.shape == (2, N_NEURONS)
    assert sweep.neuron_ids == teacher.neuron_ids
    assert np.all(np.isfinite(sweep.r2)) and np.all((sweep.r2 >= 0) & (sweep.r2 <= 1))
    # the teacher responses it scored against are the teacher's own on the evaluation images
    assert sweep.param_counts[1] > sweep.param_counts[0]
    assert sweep.filter_counts.tolist() == [4 * 2 + 12 + 3, 4 * 4 + 12 + 3]
    per_neuron = np.array([0.9, 0.2, 0.5])
    table = compare_with_per_neuron(sweep, per_neuron, per_neuron_params=[100, 200, 300])
    assert [row["model"] for row in table] == ["shared K=2", "shared K=4", "per-neuron compact"]
    assert table[-1]["median_r2"] == pytest.approx(0.5) and table[-1]["params_total"] == 600
    for row, r in zip(table, sweep.r2):
        assert row["frac_shared_better"] == pytest.approx(np.mean(r >= per_neuron))
        assert row["median_diff"] == pytest.approx(np.median(r - per_neuron))
    with pytest.raises(ValueError, match="one value per neuron"):
        compare_with_per_neuron(sweep, per_neuron[:2])
    with pytest.raises(ValueError, match="train_targets or a teacher"):
        sweep_shared_k([2], train)


def test_recalibrate_bn_sets_running_statistics_to_the_image_averages(data):
    from farm.analysis.shared import recalibrate_bn
    from farm.models.input import recenter

    _, train, _, _, _ = data
    model = build_shared(3, N_NEURONS, image_size=SIZE, late_filters=4, seed=2).eval()
    recalibrate_bn(model, train[:64], batch_size=64)  # one batch: the statistics are that batch's
    pre = model.layer_pre(0, recenter(train[:64]))
    torch.testing.assert_close(model.bn(0).running_mean, pre.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(model.bn(0).running_var, pre.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-3)
    assert not model.training and model.bn(0).momentum == model.spec.bn_momentum

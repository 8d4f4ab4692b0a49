"""The simulated V4 population: ground-truth compact neurons, Poisson repeats, sessions, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.data.images import natural_like
from farm.models.input import recenter
from farm.data.simulate import (
    GroundTruth,
    SimulationConfig,
    load_ground_truth,
    load_population,
    session_roles,
    simulate_population,
    write_population,
)
from farm.models.base import Teacher
from farm.models.compact import load_compact

SMALL = dict(n_neurons=5, n_sessions=3, n_images=150, image_size=32, repeats=(2, 5), n_calibration=64)


@pytest.fixture(scope="module")
def pop():
    return simulate_population(SimulationConfig(seed=3, **SMALL))


def test_same_seed_gives_the_same_population_and_another_seed_a_different_one(pop):
    again = simulate_population(SimulationConfig(seed=3, **SMALL))
    for a, b in zip(pop.sessions, again.sessions):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.responses, b.responses)  # NaN == NaN here
        np.testing.assert_array_equal(pop.true_rates[a.session_id], again.true_rates[b.session_id])
    for m, n in zip(pop.ground_truth.models, again.ground_truth.models):
        for (k, v), w in zip(m.state_dict().items(), n.state_dict().values()):
            assert torch.equal(v, w), k
    other = simulate_population(SimulationConfig(seed=4, **SMALL))
    assert not np.array_equal(pop.sessions[0].images, other.sessions[0].images)
    assert not np.allclose(pop.true_rates["sim2"], other.true_rates["sim2"])


def test_sessions_have_roles_ids_shapes_and_nan_padded_unequal_repeats(pop):
    assert [s.session_id for s in pop.sessions] == ["sim0", "sim1", "sim2"]
    assert [s.role for s in pop.sessions] == ["train", "validation", "test"]
    for s in pop.sessions:
        s.validate()
        assert s.images.shape == (150, 32, 32, 3) and s.images.dtype == np.uint8
        assert s.responses.dtype == np.float32 and s.responses.shape[:2] == (5, 150)
        assert s.neuron_ids == tuple(f"{s.session_id}:{i}" for i in range(5))
        counts = s.repeat_counts()
        assert counts.min() >= 2 and counts.max() <= 5 and len(np.unique(counts)) > 1
        assert s.responses.shape[2] == counts.max()
        nan = np.isnan(s.responses)
        expected = np.arange(s.responses.shape[2])[None, :] >= counts[:, None]
        assert np.array_equal(nan, np.broadcast_to(expected, nan.shape))  # trailing, same for all neurons
        finite = s.responses[~nan]
        assert np.all(finite == np.round(finite)) and finite.min() >= 0  # spike counts
    kinds = [set(s.image_kinds) for s in pop.sessions]
    assert kinds[0] == {"normal", "gaudy"} and kinds[1] == kinds[2] == {"normal"}
    gaudy_images = pop.sessions[0].images[pop.sessions[0].image_kinds == "gaudy"]
    assert len(gaudy_images) == 30 and set(np.unique(gaudy_images)) <= {0, 255}


def test_session_roles_follow_the_real_data():
    assert session_roles(1) == ["test"]
    assert session_roles(2) == ["train", "test"]
    assert session_roles(5) == ["train", "train", "train", "validation", "test"]
    with pytest.raises(ValueError):
        session_roles(0)


def test_repeat_averages_track_the_true_rates(pop):
    for s in pop.sessions:
        rates = pop.true_rates[s.session_id]
        means = s.mean_responses()
        assert np.corrcoef(rates.ravel(), means.ravel())[0, 1] > 0.8
        # Poisson: counts are unbiased for the rate
        total_counts = np.nansum(s.responses)
        expected = float((rates * s.repeat_counts()[None, :]).sum())
        assert abs(total_counts / expected - 1) < 0.05


def test_neurons_are_compact_models_with_known_filters_and_realistic_rates(pop):
    gt = pop.ground_truth
    assert isinstance(gt, Teacher)
    assert len(gt.neuron_ids) == 15
    for nid, widths in gt.filters.items():
        assert all(3 <= k <= 12 for k in widths) and len(widths) == 5
        assert gt.filter_counts[nid] == 2 * widths[0] + sum(widths[1:])
    rates = np.concatenate([pop.true_rates[s.session_id] for s in pop.sessions])
    mean_rates = rates.mean(axis=1)
    assert mean_rates.min() > 0.5 and mean_rates.max() < 15  # config: 1-10 spikes / 100 ms
    assert rates.min() >= 0


def test_neurons_are_not_trivial(pop):
    rates = pop.true_rates["sim2"]  # test session: natural_like images only
    cv = rates.std(axis=1) / rates.mean(axis=1)
    assert cv.min() > 0.15  # responses vary across images
    corr = np.corrcoef(rates)
    assert np.abs(corr[np.triu_indices(len(rates), 1)]).max() < 0.95  # neurons differ


def test_neurons_respond_to_image_structure_not_pixel_noise(pop):
    images = natural_like(32, 200, np.random.default_rng(0))
    noisy = np.clip(images + np.random.default_rng(1).normal(0, 8, images.shape), 0, 255).astype(np.uint8)
    gt = pop.ground_truth
    clean, perturbed = gt.drive(images), gt.drive(noisy)
    r = [np.corrcoef(clean[:, i], perturbed[:, i])[0, 1] for i in range(clean.shape[1])]
    assert np.median(r) > 0.9


@pytest.mark.parametrize("size", [32, 30, 34])
def test_packed_evaluation_equals_each_model_alone(size):
    pop_ = simulate_population(SimulationConfig(n_neurons=3, n_sessions=1, n_images=8, image_size=size,
                                                n_calibration=16, seed=size))
    gt = pop_.ground_truth
    images = natural_like(size, 10, np.random.default_rng(5))
    with torch.inference_mode():
        alone = torch.cat([m(recenter(images)) for m in gt.models], dim=1).numpy()
    np.testing.assert_allclose(gt.drive(images), alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=f"{size}x{size}"):
        gt.predict(natural_like(size + 2, 2, np.random.default_rng(0)))


def test_write_then_load_reproduces_sessions_and_rates(pop, tmp_path):
    out = write_population(pop, tmp_path / "sim")
    assert sorted(p.name for p in (out / "sessions").iterdir()) == ["sim0.parquet", "sim1.parquet", "sim2.parquet"]
    assert (out / "ground_truth" / "sim1_4" / "spec.json").is_file()
    truth = load_ground_truth(out)
    assert truth.neuron_ids == pop.ground_truth.neuron_ids
    assert truth.filter_counts == pop.ground_truth.filter_counts
    test_session = pop.sessions[2]
    rates = truth.subset(test_session.neuron_ids).predict(test_session.images)
    np.testing.assert_allclose(rates.T, pop.true_rates["sim2"], rtol=1e-5, atol=1e-6)
    single = load_compact(out / "ground_truth" / "sim2_0")
    assert single.spec.neuron_ids == ("sim2:0",) and single.spec.image_size == 32

    back = load_population(out)
    assert back.config == pop.config
    for a, b in zip(pop.sessions, back.sessions):
        assert (a.session_id, a.role, a.neuron_ids) == (b.session_id, b.role, b.neuron_ids)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.responses, b.responses)
        np.testing.assert_array_equal(a.image_kinds, b.image_kinds)


def test_missing_or_bad_files_and_configs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="population.json"):
        load_ground_truth(tmp_path)
    (tmp_path / "population.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="corrupt"):
        load_ground_truth(tmp_path)
    with pytest.raises(ValueError, match="repeats"):
        SimulationConfig(repeats=(5, 2))
    with pytest.raises(ValueError, match=r"SimulationConfig: unknown key\(s\) \[.n_neuron.\] \(.n_neuron. -> did you mean .n_neurons.\?\)"):
        SimulationConfig.from_dict({"n_neuron": 3})
    with pytest.raises(ValueError, match="match"):
        GroundTruth([], ["a:0"], [])

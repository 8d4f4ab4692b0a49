"""Metrics (method.md §6): r²_ER recovers a known explained variance where raw R² cannot."""

from __future__ import annotations

import numpy as np
import pytest

from farm.metrics import (
    AveragedOnlyError,
    bootstrap_median_ci,
    coefficient_of_determination,
    evaluate_predictions,
    noise_ceiling_snr,
    pearson_r,
    r2_er,
    r2_raw,
    r2_split_half,
)

MAX_REPEATS = 8
# Repeat counts 2..6, right-skewed like session 201016 (5..9, mode 6): median 4, harmonic mean 4.03.
SKEWED_REPEATS = {2: 0.05, 3: 0.15, 4: 0.40, 5: 0.20, 6: 0.20}
FLAT_REPEATS = {2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2, 6: 0.2}  # median 4, harmonic mean 3.45


def simulate_population(seed, repeat_probs, noise="poisson", n_neurons=600, n_images=300):
    """Simulated neurons whose true explained variance by a prediction is known.

    Returns raw (neurons, images, MAX_REPEATS) NaN-padded, pred (neurons, images), and the true r²:
    the squared correlation, over the same images, between pred and the noise-free rate.
    """
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((n_neurons, n_images))
    explained = rng.uniform(0.1, 0.9, (n_neurons, 1))
    model_error = rng.standard_normal((n_neurons, n_images))
    pred = np.sqrt(explained) * signal + np.sqrt(1 - explained) * model_error
    # Single-trial SNR (stimulus variance / trial noise variance) 0.3-1.5, the range of real V4 units.
    trial_snr = rng.uniform(0.3, 1.5, (n_neurons, 1))
    if noise == "poisson":
        mean_rate = rng.uniform(3, 10, (n_neurons, 1))
        spread = np.sqrt(trial_snr / mean_rate)
        # Log-normal rates stay positive with mean mean_rate and variance ~ trial_snr * mean_rate.
        rate = mean_rate * np.exp(spread * signal - spread**2 / 2)
        trials = rng.poisson(rate[..., None], (n_neurons, n_images, MAX_REPEATS)).astype(np.float64)
    else:
        gain = rng.uniform(0.5, 2.0, (n_neurons, 1))
        rate = 5.0 + gain * signal
        noise_sd = gain / np.sqrt(trial_snr)
        trial_noise = rng.standard_normal((n_neurons, n_images, MAX_REPEATS))
        trials = rate[..., None] + noise_sd[..., None] * trial_noise
    counts = rng.choice(list(repeat_probs), size=n_images, p=list(repeat_probs.values()))
    trials[:, np.arange(MAX_REPEATS)[None, :] >= counts[:, None]] = np.nan
    true_r2 = pearson_r(rate, pred) ** 2
    return trials, pred, true_r2


@pytest.mark.parametrize("noise", ["poisson", "gaussian"])
def test_r2_er_is_unbiased_where_raw_r2_is_biased_low(noise):
    raw, pred, true_r2 = simulate_population(seed=0, repeat_probs=SKEWED_REPEATS, noise=noise)
    er_bias = np.mean(r2_er(raw, pred) - true_r2)
    raw_bias = np.mean(r2_raw(raw, pred) - true_r2)  # against the repeat-averaged responses
    assert abs(er_bias) < 0.02
    assert raw_bias < -0.08
    assert abs(raw_bias) > 4 * abs(er_bias)


def test_r2_er_median_repeat_count_under_corrects_flat_repeat_distributions():
    # method.md §6.1 takes n = median repeat count; the noise of the averages goes as mean(1/k), which
    # exceeds 1/median(k) when counts spread widely, so r²_ER is then biased low (still far less than
    # raw R²).
    raw, pred, true_r2 = simulate_population(seed=1, repeat_probs=FLAT_REPEATS, noise="gaussian")
    er_bias = np.mean(r2_er(raw, pred) - true_r2)
    raw_bias = np.mean(r2_raw(raw, pred) - true_r2)
    assert -0.05 < er_bias < -0.01
    assert raw_bias < 3 * er_bias


def test_split_half_r2_is_unbiased_with_equal_even_repeats():
    raw, pred, true_r2 = simulate_population(
        seed=2, repeat_probs={4: 1.0}, noise="poisson", n_neurons=500, n_images=200
    )
    bias = np.mean(r2_split_half(raw, pred, n_splits=20, rng=0) - true_r2)
    assert abs(bias) < 0.02


def test_r2_er_hand_computed_case():
    # 1 neuron, 4 images, 3 repeats, image 2 has a missing repeat.
    raw = np.array([[1, 2, 3], [4, 6, np.nan], [2, 2, 5], [0, 1, 2]], dtype=np.float64)
    pred = np.array([1.0, 3.0, 2.0, 0.0])
    # repeat counts 3, 2, 3, 3 -> n = median = 3
    # ȳ = [2, 5, 3, 1], mean 2.75 -> y = [-0.75, 2.25, 0.25, -1.75], Σy² = 8.75
    # ddof=1 variances: [1, 2, 3, 1] -> σ̂² = 7/4, σ̂²/n = 7/12
    # ŷ mean 1.5 -> x = [-0.5, 1.5, 0.5, -1.5], Σx² = 5, Σxy = 6.5
    # numerator   = 6.5² - (7/12)·5       = 42.25 - 35/12 = 118/3
    # denominator = 5·8.75 - (7/12)·3·5   = 43.75 - 8.75  = 35
    # r²_ER = 118/105 (> 1: allowed for a small noisy sample)
    assert r2_er(raw, pred) == pytest.approx([118 / 105], abs=1e-10)
    # raw R² = (Σxy)² / (Σx² Σy²) = 42.25 / 43.75 = 169/175
    assert r2_raw(raw, pred) == pytest.approx([169 / 175], abs=1e-10)
    # SNR (§6.4): var(ȳ) = 8.75/4 = 35/16; σ²_stim = 35/16 - (3/4)(7/12) = 35/16 - 7/16 = 7/4; SNR = 1
    assert noise_ceiling_snr(raw) == pytest.approx([1.0], abs=1e-10)


def test_r2_er_is_vectorized_over_neurons_with_their_own_missing_repeats():
    raw, pred, _ = simulate_population(seed=3, repeat_probs=SKEWED_REPEATS, n_neurons=5, n_images=40)
    raw[2, :10, 1:] = np.nan  # neuron 2 alone lost repeats on 10 images (one repeat left there)
    raw[4, 7, :] = np.nan  # neuron 4 has no response at all on image 7: left out for that neuron
    one_at_a_time = np.concatenate([r2_er(raw[i], pred[i]) for i in range(5)])
    np.testing.assert_allclose(r2_er(raw, pred), one_at_a_time, rtol=1e-12)
    without_image_7 = r2_er(np.delete(raw[4], 7, axis=0), np.delete(pred[4], 7))
    np.testing.assert_allclose(r2_er(raw, pred)[4], without_image_7[0], rtol=1e-12)
    split_half = r2_split_half(raw, pred, n_splits=5, rng=0)
    assert np.isfinite(split_half).all()
    alone = r2_split_half(raw[4], pred[4], n_splits=5, rng=0)
    np.testing.assert_allclose(split_half[4], alone[0], rtol=1e-12)


def _split_half_by_the_text(raw, pred, n_splits, rng):
    """§6.2 read literally, one image at a time (raw's missing-repeat pattern shared by all neurons)."""
    averaged = np.nanmean(raw, axis=2)
    r_model = pearson_r(averaged, pred)
    r_runs = []
    for _ in range(n_splits):
        first, second = np.empty(averaged.shape), np.empty(averaged.shape)
        for image in range(raw.shape[1]):
            present = np.flatnonzero(~np.isnan(raw[0, image]))
            shuffled = rng.permutation(present)
            half = len(present) // 2
            first[:, image] = raw[:, image, shuffled[:half]].mean(axis=1)
            second[:, image] = raw[:, image, shuffled[half : 2 * half]].mean(axis=1)
        r_runs.append(pearson_r(first, second))
    r_split = np.mean(r_runs, axis=0)
    return r_model**2 / (2 * r_split / (1 + r_split))


def test_split_half_agrees_with_a_literal_per_image_reading_of_the_method():
    raw, pred, _ = simulate_population(seed=4, repeat_probs=SKEWED_REPEATS, n_neurons=20, n_images=60)
    literal = _split_half_by_the_text(raw, pred, n_splits=200, rng=np.random.default_rng(0))
    vectorized = r2_split_half(raw, pred, n_splits=200, rng=1)
    # Different random splits: they agree up to the Monte-Carlo error of averaging 200 splits.
    np.testing.assert_allclose(vectorized, literal, atol=0.02)
    assert np.max(np.abs(vectorized - literal)) > 0  # genuinely independent draws


def test_noise_free_repeats_make_every_r2_the_raw_r2():
    rng = np.random.default_rng(5)
    rate = rng.standard_normal((10, 50))
    pred = rate + rng.standard_normal((10, 50))
    raw = np.repeat(rate[..., None], 4, axis=2)
    expected = pearson_r(rate, pred) ** 2
    np.testing.assert_allclose(r2_er(raw, pred), expected, rtol=1e-10)
    np.testing.assert_allclose(r2_split_half(raw, pred, n_splits=2, rng=0), expected, rtol=1e-10)


@pytest.mark.parametrize("scale, shift", [(3.7, 0.0), (1.0, -12.5), (-1.0, 0.0), (-0.02, 4.0)])
def test_r2_metrics_invariant_to_affine_changes_of_prediction(scale, shift):
    raw, pred, _ = simulate_population(seed=6, repeat_probs=SKEWED_REPEATS, n_neurons=30, n_images=80)
    changed = scale * pred + shift
    np.testing.assert_allclose(r2_er(raw, changed), r2_er(raw, pred), rtol=1e-9)
    np.testing.assert_allclose(r2_raw(raw, changed), r2_raw(raw, pred), rtol=1e-9)
    np.testing.assert_allclose(
        r2_split_half(raw, changed, n_splits=5, rng=1), r2_split_half(raw, pred, n_splits=5, rng=1), rtol=1e-9
    )


def test_pearson_r_flips_sign_with_the_prediction():
    # r²_ER cannot tell an anti-correlated model from a good one (method.md §6.1): the sign is checked here.
    raw, pred, _ = simulate_population(seed=7, repeat_probs=SKEWED_REPEATS, n_neurons=30, n_images=80)
    averaged = np.nanmean(raw, axis=2)
    r = pearson_r(averaged, pred)
    assert (r > 0).all()
    np.testing.assert_allclose(pearson_r(averaged, -pred), -r, rtol=1e-12)
    np.testing.assert_allclose(r2_er(raw, -pred), r2_er(raw, pred), rtol=1e-9)
    scores = evaluate_predictions(raw, -pred, has_repeats=True)
    assert (scores["r"] < 0).all() and (scores["r2_er"] > 0).all()


def test_coefficient_of_determination_is_scale_sensitive():
    rng = np.random.default_rng(8)
    y = rng.standard_normal((4, 100))
    assert coefficient_of_determination(y, y) == pytest.approx([1.0] * 4)
    mean_pred = np.repeat(y.mean(axis=1, keepdims=True), 100, axis=1)
    assert coefficient_of_determination(y, mean_pred) == pytest.approx([0.0] * 4, abs=1e-12)
    # Same correlation, wrong scale: R² collapses (Ext. Data Fig. 4c's -26 vs 0.2), raw R² does not.
    assert (coefficient_of_determination(y, 10 * y) < -50).all()
    np.testing.assert_allclose(r2_raw(y, 10 * y), 1.0)


def test_appended_all_nan_repeat_columns_change_nothing():
    raw, pred, _ = simulate_population(seed=9, repeat_probs=SKEWED_REPEATS, n_neurons=20, n_images=60)
    padded = np.concatenate([raw, np.full(raw.shape[:2] + (3,), np.nan)], axis=2)
    np.testing.assert_allclose(r2_er(padded, pred), r2_er(raw, pred), rtol=1e-12)
    np.testing.assert_allclose(r2_raw(padded, pred), r2_raw(raw, pred), rtol=1e-12)
    np.testing.assert_allclose(noise_ceiling_snr(padded), noise_ceiling_snr(raw), rtol=1e-12)
    # The split permutes only present repeats, so padding leaves the (seeded) split halves alone too.
    np.testing.assert_allclose(
        r2_split_half(padded, pred, n_splits=4, rng=2),
        r2_split_half(raw, pred, n_splits=4, rng=2),
        rtol=1e-12,
    )


def test_split_half_is_deterministic_given_the_rng():
    raw, pred, _ = simulate_population(seed=10, repeat_probs=SKEWED_REPEATS, n_neurons=20, n_images=60)
    first = r2_split_half(raw, pred, n_splits=5, rng=123)
    again = r2_split_half(raw, pred, n_splits=5, rng=np.random.default_rng(123))
    other = r2_split_half(raw, pred, n_splits=5, rng=124)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_averaged_only_data_is_refused_by_noise_corrected_metrics():
    rng = np.random.default_rng(11)
    averaged = rng.standard_normal((5, 40, 1))
    pred = rng.standard_normal((5, 40))
    with pytest.raises(AveragedOnlyError, match="repeat"):
        r2_er(averaged, pred)
    with pytest.raises(AveragedOnlyError):
        r2_split_half(averaged, pred, rng=0)
    with pytest.raises(AveragedOnlyError):
        r2_er(averaged[..., 0], pred)  # (neurons, images) given as raw
    with pytest.raises(AveragedOnlyError):
        evaluate_predictions(averaged[..., 0], pred, has_repeats=True)
    one_repeat_each = np.concatenate([averaged, np.full((5, 40, 3), np.nan)], axis=2)
    with pytest.raises(AveragedOnlyError, match="2 or more"):
        r2_er(one_repeat_each, pred)
    with pytest.raises(AveragedOnlyError):
        noise_ceiling_snr(averaged)
    # Raw R² needs no repeats, and AveragedOnlyError is a ValueError for callers that catch those.
    assert np.isfinite(r2_raw(averaged, pred)).all()
    assert issubclass(AveragedOnlyError, ValueError)
    assert set(evaluate_predictions(averaged[..., 0], pred, has_repeats=False)) == {"r2_raw", "r"}


def test_shape_mismatches_name_the_argument_and_expected_shape():
    raw = np.ones((3, 10, 4))
    with pytest.raises(ValueError, match=r"pred must have shape \(neurons, images\) = \(3, 10\)"):
        r2_er(raw, np.ones((3, 9)))
    with pytest.raises(ValueError, match=r"raw must be \(images, repeats\)"):
        r2_er(raw, np.ones(10))
    pred_with_nan = np.arange(30.0).reshape(3, 10)
    pred_with_nan[1, 4] = np.nan
    with pytest.raises(ValueError, match="pred has 1 non-finite"):
        r2_er(raw, pred_with_nan)
    with pytest.raises(ValueError, match=r"pred must have shape \(neurons, images\) = \(3, 10\)"):
        r2_raw(np.ones((3, 10)), np.ones((10, 3)))


def test_bootstrap_ci_contains_the_median_and_is_seeded():
    rng = np.random.default_rng(12)
    values = rng.normal(0.5, 0.2, 219)
    values[::17] = np.nan
    median, lo, hi = bootstrap_median_ci(values, n_boot=1000, ci=0.90, rng=0)
    assert median == pytest.approx(np.nanmedian(values))
    assert lo < median < hi
    # 90 % CI of a median of ~200 values with sd 0.2: a few hundredths wide.
    assert 0.01 < hi - lo < 0.2
    assert bootstrap_median_ci(values, n_boot=1000, ci=0.90, rng=0) == (median, lo, hi)
    assert bootstrap_median_ci(values, n_boot=1000, ci=0.90, rng=1) != (median, lo, hi)
    _, lo_wide, hi_wide = bootstrap_median_ci(values, n_boot=1000, ci=0.99, rng=0)
    assert lo_wide <= lo and hi_wide >= hi
    with pytest.raises(ValueError, match="no finite"):
        bootstrap_median_ci([np.nan, np.nan])


def _split_repeats(raw):
    """Per image, the first ⌊k/2⌋ present repeats (half A) and the rest (half B), NaN elsewhere."""
    counts = np.sum(~np.isnan(raw[0]), axis=1)
    slot = np.arange(raw.shape[2])[None, None, :]
    half = (counts // 2)[None, :, None]
    return np.where(slot < half, raw, np.nan), np.where(slot >= half, raw, np.nan), counts


def test_real_session_201016_half_average_predicts_other_half_as_its_reliability(v4_dir):
    raw = np.load(v4_dir / "responses_raw" / "responses_201016.npy")
    half_a, half_b, counts = _split_repeats(raw)
    # n = median repeat count is a good stand-in for the harmonic mean here (§6.1's approximation).
    assert 1 / np.median(counts) == pytest.approx(np.mean(1 / counts), rel=0.01)

    pred = np.nanmean(half_a, axis=2)
    scores = evaluate_predictions(half_b, pred, has_repeats=True)
    assert all(np.isfinite(v).all() for v in scores.values())
    assert (scores["r"] > 0).all()
    # The noise correction lifts every neuron above its raw R².
    assert (scores["r2_er"] > scores["r2_raw"]).all()
    # Against the noise-free rate, a ⌊k/2⌋-repeat average explains its reliability SNR·n/(SNR·n + 1);
    # estimate that from half A's own repeats only, independently of half B.
    snr_a = noise_ceiling_snr(half_a)
    n_a = np.median(counts // 2)
    reliability_a = snr_a * n_a / (snr_a * n_a + 1)
    assert np.median(scores["r2_er"]) == pytest.approx(np.median(reliability_a), abs=0.05)
    assert np.corrcoef(scores["r2_er"], reliability_a)[0, 1] > 0.7
    assert 0.3 < np.median(scores["r2_er"]) < 0.9

    split_half = r2_split_half(half_b, pred, n_splits=10, rng=0)
    assert np.isfinite(split_half).all()

    # An unrelated prediction explains nothing.
    noise = np.random.default_rng(13).standard_normal(pred.shape)
    assert abs(np.median(r2_er(raw, noise))) < 0.02

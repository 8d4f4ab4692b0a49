"""Prediction metrics for neural responses (method.md §6), vectorized over neurons.

Conventions shared by every function here:
  raw repeats   (neurons, images, repeats), spikes per 100 ms, NaN where a repeat is missing
                (trailing NaN padding in the data releases; any NaN position is accepted)
  responses     (neurons, images), repeat-averaged, spikes per 100 ms
  predictions   (neurons, images), any affine scale (r²_ER, raw R² and the split-half R² do not
                care about the prediction's scale, shift or sign; the Pearson r does care about sign)
A single neuron may be given without the neuron axis: pred (images,) with raw (images, repeats) or
responses (images,). Per-neuron results are then arrays of shape (1,).

Everything is computed in float64. Images whose response is missing for a neuron (no repeats at all)
are left out for that neuron; predictions must be finite.

Metrics:
  r2_er            unbiased noise-corrected R² of Pospisil & Bair (2021), the paper's headline metric
  r2_split_half    BrainScore-style split-half corrected R² (Spearman-Brown, denominator not squared)
  r2_raw           squared Pearson r (used for student vs teacher, and when raw repeats are unavailable)
  pearson_r        row-wise Pearson r (signed; the only sign-sensitive score here)
  coefficient_of_determination   1 - SS_res / SS_tot (scale-sensitive, not in the reference pipeline)
  noise_ceiling_snr              unbiased stimulus-variance SNR (§6.4)
  bootstrap_median_ci            median over neurons with a percentile bootstrap CI
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "AveragedOnlyError",
    "r2_er",
    "r2_split_half",
    "r2_raw",
    "pearson_r",
    "coefficient_of_determination",
    "noise_ceiling_snr",
    "bootstrap_median_ci",
    "evaluate_predictions",
]

RngLike = np.random.Generator | int | None


class AveragedOnlyError(ValueError):
    """A noise-corrected metric was asked of data without raw repeats (repeat-averaged only)."""


# --------------------------------------------------------------------------------------------------
# input handling


def _as_float(array, name: str) -> np.ndarray:
    try:
        out = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array; got {type(array).__name__}") from err
    if np.isinf(out).any():
        raise ValueError(f"{name} contains infinite values; use NaN only for missing repeats")
    return out


def _check_pred_finite(pred: np.ndarray, name: str) -> None:
    bad = int(np.count_nonzero(~np.isfinite(pred)))
    if bad:
        raise ValueError(f"{name} has {bad} non-finite values; predictions must be finite")


def _raw_and_pred(raw, pred, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and reshape to raw (neurons, images, repeats), pred (neurons, images), float64.

    Raises AveragedOnlyError when the data hold no repeated measurements, ValueError on shape mismatch.
    """
    raw = _as_float(raw, "raw")
    pred = _as_float(pred, "pred")
    if pred.ndim == 1:
        if raw.ndim == 1:
            raise AveragedOnlyError(
                f"{metric} needs raw repeats: for one neuron raw must be (images, repeats) = "
                f"({pred.shape[0]}, repeats); got a 1-D raw of shape {raw.shape} (repeat-averaged?)"
            )
        if raw.ndim != 2:
            raise ValueError(
                f"{metric}: pred is 1-D (one neuron, images={pred.shape[0]}), so raw must be "
                f"(images, repeats) = ({pred.shape[0]}, repeats); got raw shape {raw.shape}"
            )
        raw, pred = raw[None], pred[None]
    elif pred.ndim == 2:
        if raw.ndim == 2 and raw.shape == pred.shape:
            raise AveragedOnlyError(
                f"{metric} needs raw repeats (neurons, images, repeats); raw has the shape of pred "
                f"{pred.shape} (neurons, images), i.e. repeat-averaged data; use r2_raw instead"
            )
        if raw.ndim != 3:
            raise ValueError(
                f"{metric}: raw must be (neurons, images, repeats) = ({pred.shape[0]}, "
                f"{pred.shape[1]}, repeats) to match pred {pred.shape}; got raw shape {raw.shape}"
            )
    else:
        raise ValueError(f"{metric}: pred must be (neurons, images) or (images,); got shape {pred.shape}")
    if raw.shape[:2] != pred.shape:
        raise ValueError(
            f"{metric}: pred must have shape (neurons, images) = {raw.shape[:2]} to match raw "
            f"{raw.shape} (neurons, images, repeats); got pred shape {pred.shape}"
        )
    _check_pred_finite(pred, "pred")
    if raw.shape[2] < 2:
        raise AveragedOnlyError(
            f"{metric} needs raw repeats: raw has a repeat axis of size {raw.shape[2]} "
            f"(shape {raw.shape}), i.e. repeat-averaged data only; use r2_raw instead"
        )
    if not (np.count_nonzero(~np.isnan(raw), axis=2) >= 2).any():
        raise AveragedOnlyError(
            f"{metric} needs raw repeats: no image of any neuron has 2 or more non-NaN repeats "
            f"(raw shape {raw.shape})"
        )
    return raw, pred


def _as_rows(a, name: str) -> np.ndarray:
    """(neurons, images) float64; a 1-D (images,) array is one neuron."""
    a = _as_float(a, name)
    if a.ndim == 1:
        return a[None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (neurons, images) or (images,); got shape {a.shape}")
    return a


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the shape of {name_a}, (neurons, images) = {a.shape}; got {b.shape}"
        )


def _as_generator(rng: RngLike) -> np.random.Generator:
    # default_rng returns a Generator unchanged, seeds one from an int, or from OS entropy for None.
    return np.random.default_rng(rng)


# --------------------------------------------------------------------------------------------------
# repeat statistics


def _repeat_stats(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-neuron repeat statistics of raw (neurons, images, repeats).

    Returns
      counts   (neurons, images) int, non-NaN repeats per image
      mean     (neurons, images) repeat average ȳ, NaN where an image has no repeat
      sigma2   (neurons,) mean over images of the ddof=1 repeat variance (images with < 2 repeats
               skipped), spikes² per 100 ms²; NaN for a neuron with no such image
      n        (neurons,) median over images (with at least one repeat) of the repeat count
    """
    present = ~np.isnan(raw)
    counts = present.sum(axis=2)
    filled = np.where(present, raw, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=2) / counts
        sq_dev = np.where(present, raw - mean[..., None], 0.0) ** 2
        var = sq_dev.sum(axis=2) / (counts - 1)
    has_var = counts >= 2
    n_var = has_var.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma2 = np.where(has_var, var, 0.0).sum(axis=1) / n_var
    # nanmedian warns on an all-NaN row (a neuron with no data); the NaN result is what we want.
    counts_or_nan = np.where(counts >= 1, counts, np.nan).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        n = np.nanmedian(counts_or_nan, axis=1)
    return counts, mean, sigma2, n


def _repeat_mean(raw: np.ndarray) -> np.ndarray:
    """nanmean over the last axis without the empty-slice warning; NaN where nothing is present."""
    present = ~np.isnan(raw)
    counts = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, raw, 0.0).sum(axis=-1) / counts


def _centered(values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values minus their row mean over valid entries, 0 elsewhere; also the valid count per row."""
    count = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_mean = np.where(valid, values, 0.0).sum(axis=1) / count
    return np.where(valid, values - row_mean[:, None], 0.0), count


def _masked_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r over the columns where both a and b are finite; NaN if degenerate."""
    valid = np.isfinite(a) & np.isfinite(b)
    x, _ = _centered(a, valid)
    y, _ = _centered(b, valid)
    sxy = (x * y).sum(axis=1)
    sxx = (x * x).sum(axis=1)
    syy = (y * y).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sxy / np.sqrt(sxx * syy)


# --------------------------------------------------------------------------------------------------
# metrics


def r2_er(raw, pred) -> np.ndarray:
    """Unbiased noise-corrected R² (r²_ER, Pospisil & Bair 2021), per neuron (method.md §6.1).

    Estimates the squared correlation between the prediction and the neuron's *expected* response
    (the noise-free mean over infinitely many repeats) over the given images, removing the downward
    bias that trial-to-trial noise puts on the raw R². With m images, per neuron:
      n  = median over images of the number of non-NaN repeats
      σ̂² = mean over images of the ddof=1 repeat variance (images with one repeat skipped)
      x = ŷ - mean(ŷ), y = ȳ - mean(ȳ), ȳ = repeat average
      r²_ER = [(Σxy)² - (σ̂²/n) Σx²] / [Σx² Σy² - (σ̂²/n)(m-1) Σx²]

    The reference code takes n from neuron 0 for all neurons; here n is per neuron, which is the same
    whenever all neurons share their trials (true of recorded sessions, where one trial records every
    neuron). Images with no repeat for a neuron are left out of that neuron's m and sums.

    The value can exceed 1 or fall below 0 for noisy neurons, and it is invariant to scale, shift and
    sign of ``pred``: check the sign with ``pearson_r``.

    Args:
      raw: (neurons, images, repeats) spikes per 100 ms, NaN-padded; or (images, repeats) for one neuron.
      pred: (neurons, images) predictions (finite); or (images,) for one neuron.
    Returns:
      (neurons,) float64; NaN where the prediction or the responses are constant.
    Raises:
      AveragedOnlyError: raw has no repeated measurements (repeat axis of size 1, or fewer than 2
        repeats on every image, or raw given with the shape of pred).
      ValueError: shapes do not match.
    """
    raw, pred = _raw_and_pred(raw, pred, "r2_er")
    counts, mean, sigma2, n = _repeat_stats(raw)
    valid = counts >= 1
    x, _ = _centered(pred, valid)
    y, m = _centered(mean, valid)
    sxy = (x * y).sum(axis=1)
    sxx = (x * x).sum(axis=1)
    syy = (y * y).sum(axis=1)
    noise = sigma2 / n
    numerator = sxy**2 - noise * sxx
    denominator = sxx * syy - noise * (m - 1) * sxx
    with np.errstate(invalid="ignore", divide="ignore"):
        out = numerator / denominator
    return np.where(denominator == 0, np.nan, out)


def r2_split_half(raw, pred, n_splits: int = 50, rng: RngLike = None) -> np.ndarray:
    """BrainScore-style split-half corrected R², per neuron (method.md §6.2).

      r_model = Pearson(ȳ, ŷ) with ȳ the repeat average over all repeats
      for each of n_splits splits: per image, randomly permute its k non-NaN repeats, average the first
        ⌊k/2⌋ and the next ⌊k/2⌋ (one repeat dropped when k is odd), r = Pearson of the two half-means
        across images (images with k < 2 left out)
      r_split = mean r over splits; r_SB = 2 r_split / (1 + r_split) (Spearman-Brown)
      R²_BS = r_model² / r_SB   (the denominator is deliberately not squared)

    The per-image permutation is shared by all neurons (a trial records every neuron at once). R²_BS
    can exceed 1, especially with few repeats; it is sign/scale/shift invariant in ``pred``.

    Args:
      raw: (neurons, images, repeats) spikes per 100 ms, NaN-padded; or (images, repeats) for one neuron.
      pred: (neurons, images) finite predictions; or (images,) for one neuron.
      n_splits: number of random split halves averaged (50 in the reference).
      rng: np.random.Generator or int seed; the result is deterministic given it.
    Returns:
      (neurons,) float64; NaN where r_SB is 0 or undefined.
    Raises:
      AveragedOnlyError, ValueError: as for ``r2_er``.
    """
    raw, pred = _raw_and_pred(raw, pred, "r2_split_half")
    if int(n_splits) < 1:
        raise ValueError(f"n_splits must be >= 1; got {n_splits}")
    generator = _as_generator(rng)
    counts, mean, _, _ = _repeat_stats(raw)
    r_model = _masked_pearson(mean, np.where(counts >= 1, pred, np.nan))

    n_images = raw.shape[1]
    missing = np.isnan(raw)
    # Recorded neurons share their trials, hence their missing-repeat pattern: rank once for all.
    rank_pattern = missing[:1] if (missing == missing[:1]).all() else missing
    half = (counts // 2)[..., None]
    filled = np.where(missing, 0.0, raw)
    r_splits = np.empty((int(n_splits), raw.shape[0]))
    # Keys go to present repeats in order of appearance, so NaN padding (its width or position) does not
    # change which repeats a seeded split draws.
    present_slot = np.maximum(np.cumsum(~rank_pattern, axis=2) - 1, 0)
    max_present = max(int(counts.max()), 1)
    for split in range(int(n_splits)):
        keys = generator.random((n_images, max_present))
        keys = np.broadcast_to(keys, rank_pattern.shape[:2] + (max_present,))
        keys = np.take_along_axis(keys, present_slot, axis=2)
        # Missing repeats sort last, so the rank of a present repeat is its slot in a random
        # permutation of that image's present repeats.
        keys = np.where(rank_pattern, np.inf, keys)
        rank = np.argsort(np.argsort(keys, axis=2), axis=2)
        first = rank < half
        second = (rank >= half) & (rank < 2 * half)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_first = np.where(first, filled, 0.0).sum(axis=2) / half[..., 0]
            mean_second = np.where(second, filled, 0.0).sum(axis=2) / half[..., 0]
        r_splits[split] = _masked_pearson(mean_first, mean_second)
    r_split = r_splits.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_sb = 2.0 * r_split / (1.0 + r_split)
        out = r_model**2 / r_sb
    return np.where(r_sb == 0, np.nan, out)


def r2_raw(responses, pred) -> np.ndarray:
    """Raw R²: the squared Pearson r per neuron (method.md §6.3); no noise correction.

    Args:
      responses: (neurons, images) repeat-averaged, or raw (neurons, images, repeats) which is
        nan-averaged over repeats first; for one neuron (images,) or (images, repeats) with a 1-D pred.
      pred: (neurons, images) finite predictions; or (images,) for one neuron.
    Returns:
      (neurons,) float64 in [0, 1]; NaN where either side is constant. Sign/scale/shift invariant.
    """
    return _pearson_against_responses(responses, pred) ** 2


def _pearson_against_responses(responses, pred) -> np.ndarray:
    averaged = _averaged_responses(responses, pred)
    pred = _as_rows(pred, "pred")
    if averaged.shape != pred.shape:
        raise ValueError(
            f"pred must have shape (neurons, images) = {averaged.shape} to match responses "
            f"{np.shape(responses)}; got pred shape {pred.shape}"
        )
    _check_pred_finite(pred, "pred")
    return _masked_pearson(averaged, pred)


def _averaged_responses(responses, pred) -> np.ndarray:
    """Repeat-averaged (neurons, images) responses matching pred, from averaged or raw input."""
    responses = _as_float(responses, "responses")
    pred_ndim = np.ndim(pred)
    if pred_ndim == 1:
        if responses.ndim == 2:
            responses = _repeat_mean(responses)
        elif responses.ndim != 1:
            raise ValueError(
                "responses must be (images,) or (images, repeats) for a 1-D pred (one neuron); "
                f"got shape {responses.shape}"
            )
        return responses[None]
    if responses.ndim == 3:
        return _repeat_mean(responses)
    if responses.ndim != 2:
        raise ValueError(
            "responses must be (neurons, images) repeat-averaged or (neurons, images, repeats) raw; "
            f"got shape {responses.shape}"
        )
    return responses


def pearson_r(a, b) -> np.ndarray:
    """Row-wise Pearson correlation between a and b (neurons, images) -> (neurons,).

    Images where either value is NaN are left out of that row (a response may be missing); NaN where a
    row is constant or has fewer than 2 shared images. 1-D inputs are one neuron -> shape (1,).
    """
    a = _as_rows(a, "a")
    b = _as_rows(b, "b")
    _same_shape(a, b, "a", "b")
    return _masked_pearson(a, b)


def coefficient_of_determination(y, pred) -> np.ndarray:
    """1 - SS_res / SS_tot per neuron, the scale-sensitive R² (method.md §6.3; e.g. Ext. Data Fig. 4c).

    Args:
      y: (neurons, images) observed (repeat-averaged) responses; NaN images are left out of that row.
      pred: (neurons, images) finite predictions in the units of y.
    Returns:
      (neurons,) float64, at most 1 and unbounded below; NaN where y is constant.
    """
    y = _as_rows(y, "y")
    pred = _as_rows(pred, "pred")
    _same_shape(y, pred, "y", "pred")
    _check_pred_finite(pred, "pred")
    valid = np.isfinite(y)
    centered, _ = _centered(y, valid)
    ss_tot = (centered**2).sum(axis=1)
    ss_res = (np.where(valid, y - pred, 0.0) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 1.0 - ss_res / ss_tot
    return np.where(ss_tot == 0, np.nan, out)


def noise_ceiling_snr(raw) -> np.ndarray:
    """Unbiased signal-to-noise ratio per neuron (method.md §6.4; not used in the pipeline).

      σ²_stim = var(ȳ) - ((m - 1) / m) σ̂² / n      (var with ddof=0 over the m images)
      SNR     = σ²_stim / σ̂²
    with ȳ, σ̂², n as in ``r2_er``. The reference suggests excluding neurons below about 0.15.

    Args:
      raw: (neurons, images, repeats) NaN-padded, or (images, repeats) for one neuron.
    Returns:
      (neurons,) float64, dimensionless; can be negative for a neuron with no stimulus drive.
    """
    raw = _as_float(raw, "raw")
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3:
        raise ValueError(f"raw must be (neurons, images, repeats) or (images, repeats); got {raw.shape}")
    if raw.shape[2] < 2 or not (np.count_nonzero(~np.isnan(raw), axis=2) >= 2).any():
        raise AveragedOnlyError(
            f"noise_ceiling_snr needs raw repeats with 2 or more per image; got raw shape {raw.shape}"
        )
    counts, mean, sigma2, n = _repeat_stats(raw)
    centered, m = _centered(mean, counts >= 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        var_mean = (centered**2).sum(axis=1) / m
        stim_var = var_mean - ((m - 1) / m) * sigma2 / n
        return stim_var / sigma2


def bootstrap_median_ci(
    values, n_boot: int = 1000, ci: float = 0.90, rng: RngLike = None
) -> tuple[float, float, float]:
    """Median of ``values`` (NaN ignored) with a percentile-bootstrap confidence interval.

    Resamples the finite values with replacement ``n_boot`` times; (lo, hi) are the (1-ci)/2 and
    (1+ci)/2 quantiles of the resampled medians (the paper: 90 % CIs of median r²_ER over neurons).

    Args:
      values: any shape (flattened), e.g. per-neuron r²_ER; NaN entries are ignored.
      n_boot: number of bootstrap resamples.
      ci: coverage in (0, 1).
      rng: np.random.Generator or int seed; deterministic given it.
    Returns:
      (median, lo, hi) as floats.
    """
    values = _as_float(values, "values").ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("bootstrap_median_ci: values has no finite entries")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1); got {ci}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    generator = _as_generator(rng)
    resampled = values[generator.integers(0, values.size, size=(int(n_boot), values.size))]
    medians = np.median(resampled, axis=1)
    lo, hi = np.quantile(medians, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return float(np.median(values)), float(lo), float(hi)


def evaluate_predictions(responses, pred, has_repeats: bool) -> dict[str, np.ndarray]:
    """The standard per-neuron scores of a prediction, for compression and reporting.

    Args:
      responses: raw (neurons, images, repeats) NaN-padded when ``has_repeats``; otherwise
        repeat-averaged (neurons, images) (raw input is also accepted and averaged).
      pred: (neurons, images) finite predictions (or (images,) for one neuron).
      has_repeats: whether ``responses`` holds raw repeats; only then is r²_ER computed.
    Returns:
      {"r2_er": (neurons,) (only when has_repeats), "r2_raw": (neurons,), "r": (neurons,)} with
      r2_raw and r against the repeat-averaged responses.
    Raises:
      AveragedOnlyError: has_repeats is True but ``responses`` has no repeats.
    """
    scores: dict[str, np.ndarray] = {}
    if has_repeats:
        scores["r2_er"] = r2_er(responses, pred)
    r = _pearson_against_responses(responses, pred)
    scores["r2_raw"] = r**2
    scores["r"] = r
    return scores

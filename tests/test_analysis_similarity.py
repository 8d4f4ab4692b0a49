"""Similarity across models: CKA, kernel similarity, signal correlation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from farm.analysis import kernel_similarity, layer_cka, linear_cka, matched_cosine, signal_correlation
from farm.analysis.similarity import cka_from_grams, layer_grams, random_kernel_baseline
from farm.data.images import natural_like
from farm.models.compact import CompactSpec, build_compact


SIZE = 32


def test_cka_is_one_for_orthogonal_transforms_and_near_zero_for_independent_features():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 20))
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.7 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-10)  # isotropic scale, offset
    # independent Gaussian features: E[CKA] ~ sqrt(p q) / n = 0.02 here
    y = rng.standard_normal((500, 10))
    z = rng.standard_normal((500, 10))
    assert linear_cka(y, z) < 0.06
    # the Gram (n < p) and feature (n > p) forms agree
    wide_x, wide_y = rng.standard_normal((30, 200)), rng.standard_normal((30, 150))
    wide_y[:, :50] += wide_x[:, :50]
    k = wide_x - wide_x.mean(0)
    l = wide_y - wide_y.mean(0)
    want = np.linalg.norm(l.T @ k) ** 2 / (np.linalg.norm(k.T @ k) * np.linalg.norm(l.T @ l))
    assert linear_cka(wide_x, wide_y) == pytest.approx(want, rel=1e-10)
    assert cka_from_grams(k @ k.T, l @ l.T) == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, y)


def test_layer_cka_of_a_model_with_itself_is_one_and_the_sketch_keeps_cka():
    images = natural_like(SIZE, 60, np.random.default_rng(1))
    a = build_compact(CompactSpec(filters=(6, 5, 4, 4, 3), image_size=SIZE), seed=1)
    b = build_compact(CompactSpec(filters=(6, 5, 4, 4, 3), image_size=SIZE), seed=2)
    res = layer_cka([a, copy.deepcopy(a), b], images, n_pairs=None)
    assert res.cka.shape == (3, 5)
    np.testing.assert_allclose(res.cka[0], 1.0, atol=1e-9)  # (a, copy of a)
    assert np.all((res.cka >= 0) & (res.cka <= 1 + 1e-9))
    # count sketch to 512 features vs exact (layer 0 has 6 * 32 * 32 = 6144 features)
    exact = layer_grams(a, images, sketch_dim=10 ** 6)
    sketched = layer_grams(a, images, sketch_dim=512)
    other = layer_grams(b, images, sketch_dim=10 ** 6)
    for l in range(5):
        assert cka_from_grams(exact[l], sketched[l]) > 0.97
        assert cka_from_grams(sketched[l], other[l]) == pytest.approx(cka_from_grams(exact[l], other[l]), abs=0.05)


def test_kernel_similarity_of_a_model_with_itself_is_one_and_above_the_random_baseline():
    a = build_compact(CompactSpec(filters=(6, 5, 4, 4, 3), image_size=SIZE), seed=1)
    b = copy.deepcopy(a)
    with torch.no_grad():  # permuted, sign-flipped, rescaled kernels are the same filters
        b.depthwise(1).weight.copy_(-2.0 * a.depthwise(1).weight.flip(0))
    res = kernel_similarity([a, b], n_pairs=None, n_baseline_draws=10)
    assert res.similarity.shape == (1, 5)
    np.testing.assert_allclose(res.similarity, 1.0, atol=1e-12)
    assert np.all(res.baseline < 0.9)
    # layer 1 kernels have 75 numbers, deeper ones 25: random matches are worse for 75
    assert res.baseline[0, 0] < res.baseline[0, 1]


def test_matched_cosine_properties():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 25))
    assert matched_cosine(a, a[::-1] * -3) == pytest.approx(1.0)
    assert matched_cosine(a, np.vstack([a[:2], np.zeros((1, 25))])) < 1.0
    assert np.isnan(matched_cosine(a, np.zeros((2, 25))))
    mean, sd = random_kernel_baseline(5, 5, 25, n_draws=30, rng=1)
    assert 0 < mean < 1 and sd > 0
    with pytest.raises(ValueError):
        matched_cosine(a, a[:, :10])


def test_signal_correlation_of_identical_and_negated_models():
    images = natural_like(SIZE, 50, np.random.default_rng(2))
    a = build_compact(CompactSpec(filters=(4, 4, 3, 3, 3), image_size=SIZE), seed=3)
    neg = copy.deepcopy(a)
    with torch.no_grad():
        neg.readout.weight.neg_()
    c = build_compact(CompactSpec(filters=(4, 4, 3, 3, 3), image_size=SIZE), seed=4)
    res = signal_correlation([a, neg, c], images)
    assert res.r[0, 1] == pytest.approx(-1.0, abs=1e-9)
    assert res.r.shape == (3, 3)
    assert res.mean_r2 == pytest.approx((1.0 + res.r[0, 2] ** 2 + res.r[1, 2] ** 2) / 3)

"""Image analyses on tiny random compact models: synthesized, natural and adversarial images, blur."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.analysis import (AdversarialParams, NaturalParams, SynthParams, adversarial_images, concat_columns,
                           delta_in_sd, fit_affine, gaussian_blur, iter_array_shards, merge_topk, percent_delta_r,
                           pixel_distance, predict, rank_natural_images, synthesize)
from farm.analysis.natural import hash_priority
from farm.data.images import natural_like
from farm.models.compact import CompactSpec, build_compact


SIZE = 40


@pytest.fixture(scope="module")
def model():
    return build_compact(CompactSpec(filters=(6, 6, 4, 4, 3), image_size=SIZE), seed=1).eval()


@pytest.fixture(scope="module")
def bank():
    return natural_like(SIZE, 240, np.random.default_rng(0))


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(0).normal(size=(2, 3, 9, 13))
    for sigma in (0.5, 1.0, 3.0):
        got = gaussian_blur(torch.as_tensor(x), sigma).numpy()
        want = ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=4.0)
        np.testing.assert_allclose(got, want, atol=1e-10)
    t = torch.as_tensor(x)
    assert torch.equal(gaussian_blur(t, 0), t) and torch.equal(gaussian_blur(t, -1.0), t)  # sigma <= 0: x


def test_maximizing_images_beat_the_99th_percentile_of_the_bank(model, bank):
    p99 = np.percentile(predict(model, bank), 99)
    res = synthesize(model, SynthParams(n_steps=30, n_restarts=2, seed=0))
    assert res.images.shape == (2, SIZE, SIZE, 3) and res.images.dtype == np.uint8
    assert np.all(res.responses > p99)
    # reported responses are the uint8 images' own
    np.testing.assert_allclose(res.responses, predict(model, res.images))
    assert res.traces.shape == (2, 30)
    lo = synthesize(model, SynthParams(direction="min", n_steps=30, n_restarts=2))
    p01 = np.percentile(predict(model, bank), 1)
    assert np.all(lo.responses < p01)


def test_synthesis_is_reproducible_and_keeps_the_best_image(model):
    a = synthesize(model, SynthParams(n_steps=12, seed=5))
    b = synthesize(model, SynthParams(n_steps=12, seed=5))
    np.testing.assert_array_equal(a.images, b.images)
    # the best-so-far image is at least as good as the last step's
    assert a.float_responses[0] >= a.traces[0, -1] - 1e-9
    assert a.float_responses[0] == pytest.approx(a.traces[0].max())


def test_rank_natural_images_is_the_sorted_bank(model, bank):
    r = rank_natural_images(model, iter_array_shards(bank, 50), params=NaturalParams(top_k=10, n_random=30))
    resp = predict(model, bank)
    order = np.argsort(-resp, kind="stable")[:10]
    assert r.top_ids[0].tolist() == [str(i) for i in order]
    np.testing.assert_allclose(r.top_responses[0], resp[order], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(r.top_images[0], bank[order])
    assert r.n_images == len(bank)
    assert r.mean()[0] == pytest.approx(resp.mean(), abs=1e-6)
    assert r.sd()[0] == pytest.approx(resp.std(), rel=1e-5)
    assert len(r.sample_ids) == 30
    np.testing.assert_allclose(r.sample_responses[0], resp[r.sample_ids.astype(int)], rtol=1e-6, atol=1e-6)


def test_merge_topk_over_shards_equals_one_pass(model, bank):
    p = NaturalParams(top_k=7, n_random=20, seed=2)
    whole = rank_natural_images(model, [(np.arange(len(bank)), bank)], params=p)
    parts = [rank_natural_images(model, [(ids, imgs)], params=p)
             for ids, imgs in iter_array_shards(bank, 37)]
    merged = merge_topk(parts[::-1])  # order of the shards does not matter
    np.testing.assert_array_equal(merged.top_ids, whole.top_ids)
    np.testing.assert_allclose(merged.top_responses, whole.top_responses)
    np.testing.assert_array_equal(merged.top_images, whole.top_images)
    np.testing.assert_array_equal(merged.sample_ids, whole.sample_ids)  # the same random normal images
    assert merged.n_images == whole.n_images
    np.testing.assert_allclose(merged.response_sum, whole.response_sum)
    # a second model over the same shards joins as more columns
    other = build_compact(CompactSpec(filters=(4, 4, 3, 3, 3), image_size=SIZE), seed=9)
    both = concat_columns([whole, rank_natural_images(other, [(np.arange(len(bank)), bank)], params=p)])
    assert both.n_columns == 2 and both.top_ids.shape == (2, 7)
    with pytest.raises(ValueError, match="different columns"):
        merge_topk([whole, both])


def test_rank_natural_images_filters_kinds_and_checks_input(model, bank):
    kinds = np.array(["natural", "gaudy"] * (len(bank) // 2))
    r = rank_natural_images(model, [(np.arange(len(bank)), bank, kinds)],
                            params=NaturalParams(top_k=5, kinds=("natural",)))
    assert r.n_images == len(bank) // 2
    assert all(int(i) % 2 == 0 for i in r.top_ids[0])
    with pytest.raises(ValueError, match="px"):
        rank_natural_images(model, [(np.arange(2), bank[:2, :20, :20])])
    with pytest.raises(ValueError, match="uint8"):
        rank_natural_images(model, [(np.arange(2), bank[:2].astype(np.float32))])


def test_hash_priority_depends_on_id_and_seed_only():
    a = hash_priority(["1", "2", "3"], 0)
    assert np.all((a >= 0) & (a < 1))
    np.testing.assert_array_equal(a[1:], hash_priority(["2", "3"], 0))
    assert not np.array_equal(a, hash_priority(["1", "2", "3"], 1))


def test_percent_delta_r_and_calibration():
    assert percent_delta_r([3.0, 3.0], [1.0, 2.0, 1.5]) == pytest.approx(100.0)
    assert np.isnan(percent_delta_r([1.0], [-1.0, -0.5]))
    assert delta_in_sd([2.0], [0.0, 2.0]) == pytest.approx(1.0)
    x = np.array([-1.0, 0.0, 1.0, 2.0])
    slope, intercept = fit_affine(x, 3 * x + 5)
    assert slope == pytest.approx(3) and intercept == pytest.approx(5)


@pytest.mark.parametrize("norm", ["rms", "linf"])
def test_adversarial_plus_raises_and_minus_lowers_within_budget(model, bank, norm):
    base = bank[:4]
    plus = adversarial_images(model, base, AdversarialParams(direction="max", norm=norm, budget=4.0))
    minus = adversarial_images(model, base, AdversarialParams(direction="min", norm=norm, budget=4.0))
    assert np.all(plus.responses > plus.base_responses)
    assert np.all(minus.responses < minus.base_responses)
    for r in (plus, minus):
        assert r.reached.all()
        assert np.all(r.distances <= 4.0 + 1e-9)
        np.testing.assert_allclose(r.distances, pixel_distance(r.images, base, norm))
        # the budget is used: the change is more than rounding noise
        assert np.all(r.distances > 2.0)
        np.testing.assert_allclose(r.responses, predict(model, r.images))
    np.testing.assert_array_equal(plus.base_images, base)


def test_bad_parameters_raise_clear_errors(model):
    with pytest.raises(ValueError, match="direction"):
        SynthParams(direction="up")
    with pytest.raises(ValueError, match="norm"):
        AdversarialParams(norm="l2")
    with pytest.raises(ValueError, match="output"):
        synthesize(model, SynthParams(n_steps=1), output=1)
    with pytest.raises(ValueError, match="px"):
        adversarial_images(model, np.zeros((1, 8, 8, 3), np.uint8))

"""Dot stimuli, tuning and filter ablation on a hand-built dot detector whose answers are known.

The detector (``dot_detector``) is a CompactModel of 48 px input with 2 filters per layer whose weights
are set by hand; BN is the identity (running mean 0, running var 1 - eps, gamma 1, beta 0):

  layer 0 (5x5 conv, only the centre tap used):
    filter 0 = luminance: 1/3 of each recentered channel + bias mean(RGB_MEANS) -> raw grey level (>= 0);
    filter 1 = red - green + 128 (an "unrelated" channel: a white dot and a grey background differ in
      it by at most 7 levels, against 147 in luminance).
  layers 1, 2 (stride 2): depthwise taps (1..2, 1..2) = 1/4, pointwise identity. Keras 'same' padding
    puts tap k of output i on input 2i - 1 + k, so each is an exact 2x2 block average: layer 2 holds
    4x4-pixel block means on a 12 x 12 grid (block i = pixels 4i .. 4i+3).
  layer 3 (stride 1): channel 0 depthwise = centre-surround over blocks: +1 on the centre block, -1/8 on
    each of its 8 neighbours (zero-sum, so uniform grey gives 0); channel 1 centre tap 1; pointwise
    identity; ReLU keeps only "centre brighter than surround".
  layer 4: identity (centre taps 1, pointwise identity).
  readout: weight 1 on channel 0 and 0.01 on channel 1 at block (6, 6) = pixels 24..27, centre 25.5.

Known answers:
  - preferred location: the location grid point (25.5, 25.5) (grid centres 1.5 + 4 i);
  - preferred radius 2.5 px: a disc centred at 25.5 holds the pixels within r of the centre; the
    block's corner pixels are 2.12 px away and the nearest surround pixels 2.55 px, so only radii in
    [2.12, 2.55) fill the centre block without touching the surround; from DEFAULT_RADII that is 2.5;
  - ablating layer-0 filter 0 (luminance) leaves a constant channel: only channel 1's <= 0.07 variation
    is left of a 147-level range, DSI > 0.999; ablating filter 1 removes only that variation, DSI < 0.001.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.analysis import (AblationParams, DotParams, SaliencyParams, ablate, cumulative_ablation, dot_size_invariance,
                           dot_tuning, invariance_index, n_filters, predict, saliency_map, smooth_minus)
from farm.analysis.dots import location_grid, number_stimuli, size_stimuli
from farm.data.images import RGB_MEANS, dots
from farm.models.compact import CompactSpec, build_compact


CENTER = (25.5, 25.5)


def dot_detector():
    model = build_compact(CompactSpec(filters=(2, 2, 2, 2, 2), image_size=48), seed=0).eval()
    eps = model.spec.bn_eps
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for l in range(5):
            bn = model.bn(l)
            bn.weight.fill_(1.0)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - eps)
        w0 = model.layer0_conv.weight
        w0[0, :, 2, 2] = 1.0 / 3.0
        model.layer0_conv.bias[0] = float(RGB_MEANS.mean())
        w0[1, 0, 2, 2], w0[1, 1, 2, 2] = 1.0, -1.0
        model.layer0_conv.bias[1] = 128.0 + float(RGB_MEANS[0] - RGB_MEANS[1])
        for l in (1, 2):
            model.depthwise(l).weight[:, 0, 1:3, 1:3] = 0.25
        dog = torch.full((3, 3), -1.0 / 8.0)
        dog[1, 1] = 1.0
        model.depthwise(3).weight[0, 0, 1:4, 1:4] = dog
        model.depthwise(3).weight[1, 0, 2, 2] = 1.0
        model.depthwise(4).weight[:, 0, 2, 2] = 1.0
        for l in range(1, 5):
            model.pointwise(l).weight[:, :, 0, 0] = torch.eye(2)
        maps = model.readout_maps()
        maps[6, 6, 0] = 1.0
        maps[6, 6, 1] = 0.01
    return model


@pytest.fixture(scope="module")
def detector():
    return dot_detector()


def test_detector_is_a_block_centre_surround_unit(detector):
    # the construction above, checked directly: grey gives the channel-1 offset only, a 4x4 white block
    # at pixels 24..27 gives (255 - grey luminance) + that offset
    grey = dots(48, [np.zeros((0, 2))])
    block = grey.copy()
    block[0, 24:28, 24:28] = 255
    r_grey, r_block = predict(detector, np.concatenate([grey, block]))
    lum = float(np.mean(grey[0, 0, 0]))
    assert r_grey == pytest.approx(0.01 * (128 + int(grey[0, 0, 0, 0]) - int(grey[0, 0, 0, 1])), abs=1e-3)
    assert r_block - r_grey == pytest.approx((255 - lum) - 0.01 * (grey[0, 0, 0, 0] - grey[0, 0, 0, 1]), abs=1e-3)


def test_dot_tuning_finds_the_preferred_location_and_size(detector):
    res = dot_tuning(detector, DotParams(counts=(1, 2, 4), n_per_count=4))
    assert res.location_map.shape == (12, 12)
    np.testing.assert_allclose(res.preferred_location, CENTER)
    assert res.preferred_radius == 2.5
    i = list(res.radii).index(2.5)
    # strictly preferred over its neighbours on the radius axis, and far above large dots
    assert res.size_responses[i] > res.size_responses[i - 1] + 10
    assert res.size_responses[i] > res.size_responses[i + 1] + 10
    assert res.size_responses[-1] < 0.1 * res.size_responses[i]
    assert res.number_responses.shape == (3, 4)


def test_location_grid_is_the_papers_28_by_28_at_112_px():
    g = location_grid(112, 4)
    assert len(g) == 28 and g[0] == 1.5 and g[-1] == 109.5


def test_ablating_the_dot_filter_gives_dsi_one_and_the_unrelated_filter_zero(detector):
    res = dot_size_invariance(detector, CENTER, AblationParams(layer=1))
    assert res.curves.shape == (2, len(res.conditions))
    assert res.index[0] > 0.999
    assert res.index[1] < 0.001
    # the same through the deeper kernels that carry the dot signal: depthwise of code layer 3 and the
    # readout map of channel 0
    for layer in (4, 6):
        r = dot_size_invariance(detector, CENTER, AblationParams(layer=layer))
        assert r.index[0] > 0.999 and r.index[1] < 0.001


def test_ablation_runner_matches_a_fully_ablated_copy(detector):
    # the cached partial forward pass gives the same curve as running an ablated copy end to end
    res = dot_size_invariance(detector, CENTER, AblationParams(layer=3))
    stim = size_stimuli(48, CENTER, DotParams().radii, DotParams())
    for j in range(n_filters(detector, 3)):
        np.testing.assert_allclose(res.curves[j], predict(ablate(detector, 3, [j]), stim), rtol=1e-5, atol=1e-4)


def test_cumulative_ablation_removes_the_unrelated_filter_first(detector):
    stim = size_stimuli(48, CENTER, DotParams().radii, DotParams())
    res = cumulative_ablation(detector, stim, len(DotParams().radii), AblationParams(layer=1))
    assert res.order.tolist() == [1, 0]
    assert res.index[0] < 0.001 and res.index[-1] == pytest.approx(1.0)
    assert res.n_to_invariance() == 2


def test_invariance_index_anchors():
    intact = np.array([0.0, 2.0, 1.0])
    assert invariance_index(intact, np.full(3, 5.0)) == 1.0
    assert invariance_index(intact, intact + 3) == 0.0
    assert invariance_index(intact, 2 * intact) == 0.0  # larger range: clipped
    assert invariance_index(intact, 0.5 * intact) == pytest.approx(0.5)
    assert np.isnan(invariance_index(np.ones(3), intact))
    with pytest.raises(ValueError):
        invariance_index(intact, intact[:2])


def test_ablate_zeroes_only_the_chosen_kernels(detector):
    m = ablate(detector, 2, [1])
    assert torch.all(m.depthwise(1).weight[1] == 0)
    assert torch.equal(m.depthwise(1).weight[0], detector.depthwise(1).weight[0])
    assert torch.any(detector.depthwise(1).weight[1] != 0)  # the original is untouched
    with pytest.raises(ValueError, match="paper layer"):
        ablate(detector, 7, [0])
    with pytest.raises(ValueError, match="filters 0..1"):
        ablate(detector, 1, [2])


def test_number_stimuli_place_the_requested_dots_near_the_centre():
    p = DotParams(counts=(1, 3), n_per_count=2, number_spread=8.0, seed=3)
    stim = number_stimuli(48, CENTER, 1.0, p)
    assert stim.shape == (4, 48, 48, 3)
    white = np.all(stim == 255, axis=-1)
    ys, xs = np.nonzero(white.any(0))
    assert np.all(np.hypot(ys - CENTER[0], xs - CENTER[1]) <= 8.0 + 1.0 + 1e-9)
    # a 1 px dot is the centre pixel plus up to 4 neighbours: more dots, more white pixels
    assert white[2:].sum() > white[:2].sum()


def test_saliency_of_a_dot_is_at_the_dot(detector):
    image = dots(48, [CENTER], 2.5)[0]
    p = SaliencyParams(patch_radius=3, blur_sigma=2.0, stride=4, n_patches=2, n_controls=4)
    sal = saliency_map(detector, image, p)
    iy, ix = np.unravel_index(np.argmin(sal.heatmap), sal.heatmap.shape)
    assert abs(sal.centers_y[iy] - CENTER[0]) <= 2 and abs(sal.centers_x[ix] - CENTER[1]) <= 2
    assert sal.heatmap.min() < -0.3 * sal.base_response
    # the unit reads pixels 20..31 only: a patch of radius 3 centred at (2, 2) leaves it unchanged
    assert sal.heatmap[0, 0] == 0.0
    sm = smooth_minus(detector, image, p)
    assert sm.trace[-1] < sm.trace[0] - 0.3 * sm.trace[0]
    assert np.all(np.diff(sm.trace) <= 1e-9) or sm.trace[-1] < sm.trace[0]
    # controls smooth the same number of pixels (whole interior patches only) and change far less
    disk = sum(1 for dy in range(-3, 4) for dx in range(-3, 4) if dy * dy + dx * dx <= 9)
    assert sm.n_pixels == len(sm.centers) * disk
    assert len(sm.control_responses) == 4
    assert abs(np.mean(sm.control_responses) - sm.trace[0]) < abs(sm.trace[-1] - sm.trace[0])

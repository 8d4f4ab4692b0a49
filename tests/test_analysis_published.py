"""The analyses on the paper's published compact models of session 190923 (../shared/models/published)
with that session's natural images (../shared/data/v4)."""

from __future__ import annotations

import numpy as np
import pytest

from farm.analysis import (AdversarialParams, AnalysisConfig, DotParams, NaturalParams, SaliencyParams, SynthParams,
                           fit_affine, predict, run_all_analyses, run_population_analyses, saliency_map, synthesize)


def _model(published_dir, i):
    from farm.models.published import load_published_compact

    d = published_dir / "compact_models"
    return load_published_compact(d / "models_torch" / f"compact_model_190923_neuron{i}.pt",
                                  d / "nums_filters" / f"compact_model_190923_neuron{i}.npy")


@pytest.fixture(scope="module")
def session_images(v4_dir):
    from farm.data.v4release import read_v4_images

    return read_v4_images(v4_dir / "images" / "images_190923.zip", 1200)


def test_published_model_quick_synth_and_coarse_saliency(published_dir, session_images):
    model = _model(published_dir, 0)
    bank = session_images[::10]  # 120 natural images
    resp = predict(model, bank, batch_size=16)
    res = synthesize(model, SynthParams(n_steps=20, seed=0))
    assert res.responses[0] > np.percentile(resp, 99)
    sal = saliency_map(model, bank[int(np.argmax(resp))], SaliencyParams(stride=16))
    assert sal.heatmap.shape == (7, 7) and np.all(np.isfinite(sal.heatmap))
    assert sal.heatmap.min() < 0  # smoothing some part of the best natural image lowers the response


@pytest.mark.slow
def test_published_model_all_analyses(published_dir, v4_dir, session_images):
    model = _model(published_dir, 0)
    bank = session_images[::4]  # 300 images
    # model output -> spike counts, fitted on the first (readout-fitting) half of the session
    recorded = np.load(v4_dir / "responses_repeat_averaged" / "responses_190923.npy")[0]
    first = session_images[:600:3]
    calib = fit_affine(predict(model, first, batch_size=16), recorded[:600:3])
    cfg = AnalysisConfig(synth=SynthParams(n_steps=100, n_restarts=3), natural=NaturalParams(top_k=20, n_random=300),
                         adversarial=AdversarialParams(), saliency=SaliencyParams(stride=8, n_patches=5, n_controls=5),
                         dots=DotParams(location_stride=8, counts=(1, 2, 4, 8), n_per_count=5),
                         n_base_images=5, ablation_layers=(1, 4, 6), cumulative_layer=4)
    out = run_all_analyses(model, bank, cfg, calibration=calib)
    m, res = out["metrics"], out["results"]
    assert m["synth_beats_natural_p99"] == 1.0
    assert np.all(res["adversarial_plus"].responses > res["adversarial_plus"].base_responses)
    assert np.all(res["adversarial_minus"].responses < res["adversarial_minus"].base_responses)
    assert np.all(res["adversarial_plus"].distances <= cfg.adversarial.budget + 1e-9)
    assert m["smooth_minus_change"] < 0
    assert m["smooth_minus_change"] < m["smooth_random_change"]
    for layer in (1, 4, 6):
        idx = res[f"dsi_layer{layer}"].index
        assert np.all((idx >= 0) & (idx <= 1))
    assert res["dsi_cumulative_layer4"].index[-1] <= 1
    assert m["pct_synth_max"] > m["pct_natural_max"] > 0


@pytest.mark.slow
def test_published_models_population(published_dir, session_images):
    models = [_model(published_dir, i) for i in range(4)]
    out = run_population_analyses(models, session_images[::6], AnalysisConfig(cka_images=200, n_pairs=None))
    ks, cka = out["results"]["kernel_similarity"], out["results"]["cka"]
    assert ks.similarity.shape == (6, 5) and cka.cka.shape == (6, 5)
    # the paper: kernels match better than random ones (Fig. 3b) and outputs are weakly correlated
    assert np.nanmean(ks.similarity[:, 1:]) > np.nanmean(ks.baseline[:, 1:])
    assert np.all((cka.cka >= 0) & (cka.cka <= 1 + 1e-9))
    assert 0 <= out["metrics"]["signal_correlation_mean_r2"] <= 1

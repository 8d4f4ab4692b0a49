"""run_all_analyses / run_population_analyses end to end on tiny models; configs; figures and result files."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from farm.analysis import (AnalysisConfig, DotParams, NaturalParams, SaliencyParams, SynthParams, predict,
                           result_arrays, run_all_analyses, run_population_analyses, save_figure, save_result_npz)
from farm.data.images import natural_like
from farm.models.compact import CompactSpec, build_compact


SIZE = 32

TINY = AnalysisConfig(
    synth=SynthParams(n_steps=15, n_restarts=2),
    natural=NaturalParams(top_k=8, n_random=60),
    saliency=SaliencyParams(patch_radius=4, stride=8, n_patches=2, n_controls=2),
    dots=DotParams(radii=(1, 2, 3, 5, 8), counts=(1, 2, 4), n_per_count=2),
    n_base_images=3, n_shown=4, ablation_layers=(1, 6), cumulative_layer=3, number_invariance=True)


@pytest.fixture(scope="module")
def images():
    return natural_like(SIZE, 120, np.random.default_rng(0))


def test_run_all_analyses_on_a_shared_models_output(images):
    # a 2-output (shared, factorized) model: every analysis works on the chosen output
    model = build_compact(CompactSpec(filters=(5, 5, 4, 4, 3), image_size=SIZE, readout="factorized", n_outputs=2,
                                      neuron_ids=("s:0", "s:1")), seed=3).eval()
    out = run_all_analyses(model, images, TINY, output=1)
    res, metrics, figs = out["results"], out["metrics"], out["figures"]
    assert {"natural", "synth_max", "synth_min", "adversarial_plus", "adversarial_minus", "saliency", "smooth_minus",
            "dots", "dsi_layer1", "dsi_layer6", "dni_layer1", "dsi_cumulative_layer3"} <= set(res)
    assert all(isinstance(f, Figure) for f in figs.values()) and "dots" in figs and "synth_max" in figs
    assert all(np.isfinite(v) for v in metrics.values())
    resp = predict(model, images, output=1)
    assert metrics["natural_top1"] == pytest.approx(resp.max(), abs=1e-5)
    assert res["synth_max"].responses.max() > metrics["natural_p99"]
    assert res["adversarial_plus"].output == 1 and res["dsi_layer6"].curves.shape[0] == 3
    assert metrics["adversarial_plus_mean_change"] > 0 > metrics["adversarial_minus_mean_change"]
    assert out["params"]["synth_max"]["n_steps"] == 15
    assert model.training is False


def test_run_all_analyses_subset_and_calibration(images):
    model = build_compact(CompactSpec(filters=(4, 4, 3, 3, 3), image_size=SIZE), seed=4).eval()
    resp = predict(model, images)
    calib = (2.0, 5.0 - 2.0 * resp.min())  # responses mapped to >= 5 "spikes": %Δr is defined
    cfg = AnalysisConfig(**{**TINY.__dict__, "analyses": ("natural",)})
    out = run_all_analyses(model, images, cfg, calibration=calib)
    assert set(out["results"]) == {"natural"}
    top = np.sort(resp)[::-1][:4]
    normal = out["results"]["natural"].sample_responses[0]
    want = 100 * (np.mean(2 * top + calib[1]) - np.mean(2 * normal + calib[1])) / np.mean(2 * normal + calib[1])
    assert out["metrics"]["pct_natural_max"] == pytest.approx(want, rel=1e-5)


def test_population_analyses_and_gallery(images):
    models = [build_compact(CompactSpec(filters=(4, 4, 3, 3, 3), image_size=SIZE, neuron_ids=(f"n:{i}",)), seed=i)
              for i in range(3)]
    synth = [run_all_analyses(m, images, AnalysisConfig(**{**TINY.__dict__, "analyses": ("synth",)}))["results"]
             ["synth_max"] for m in models]
    out = run_population_analyses(models, images, AnalysisConfig(cka_images=50, n_pairs=None), synth_results=synth)
    assert out["results"]["cka"].cka.shape == (3, 5)
    assert out["results"]["kernel_similarity"].similarity.shape == (3, 5)
    assert out["results"]["signal_correlation"].r.shape == (3, 3)
    assert {"gallery", "cka", "kernel_similarity"} <= set(out["figures"])
    assert "cka_layer0" in out["metrics"]


def test_figures_and_arrays_are_written_atomically(images, tmp_path):
    model = build_compact(CompactSpec(filters=(4, 4, 3, 3, 3), image_size=SIZE), seed=5).eval()
    out = run_all_analyses(model, images, AnalysisConfig(**{**TINY.__dict__, "analyses": ("dots",)}))
    path = save_figure(out["figures"]["dots"], tmp_path / "figs" / "dots.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    npz = save_result_npz(out["results"]["dots"], tmp_path / "dots.npz")
    with np.load(npz) as f:
        np.testing.assert_array_equal(f["size_responses"], out["results"]["dots"].size_responses)
        assert set(f.files) == set(result_arrays(out["results"]["dots"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dots.npz", "figs"]  # no temp files left
    with pytest.raises(ValueError, match="suffix"):
        save_figure(out["figures"]["dots"], tmp_path / "noformat")


def test_config_from_dict_round_trip_and_errors():
    cfg = AnalysisConfig.from_dict({"synth": {"n_steps": 7}, "analyses": ["dots"], "ablation_layers": [2, 3]})
    assert cfg.synth.n_steps == 7 and cfg.synth.n_restarts == 9 and cfg.analyses == ("dots",)
    assert AnalysisConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"AnalysisConfig: unknown key\(s\) \[.synthh.\] \(.synthh. -> did you mean .synth.\?\)"):
        AnalysisConfig.from_dict({"synthh": {}})
    with pytest.raises(ValueError, match=r"AnalysisConfig.synth: unknown key\(s\) \[.steps.\]"):
        AnalysisConfig.from_dict({"synth": {"steps": 3}})
    with pytest.raises(ValueError, match="unknown"):
        AnalysisConfig(analyses=("nope",))
    with pytest.raises(ValueError, match="paper layers"):
        AnalysisConfig(ablation_layers=(0,))


def test_without_images_only_the_model_only_analyses_run():
    model = build_compact(CompactSpec(filters=(4, 4, 3, 3, 3), image_size=SIZE), seed=6).eval()
    cfg = AnalysisConfig(**{**TINY.__dict__, "analyses": ("synth", "natural", "saliency", "dots")})
    out = run_all_analyses(model, None, cfg)
    assert set(out["results"]) == {"synth_max", "synth_min", "dots"}
    assert "pct_synth_max" not in out["metrics"] and "synth_max_best" in out["metrics"]

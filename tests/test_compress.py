"""compress_neuron: distill -> prune -> narrow -> retrain -> evaluate, on the simulated population
(ground-truth neurons of known width) and on real V4 data (slow)."""

import json

import numpy as np
import pytest
import torch

from farm.compress import (CompressConfig, CompressionResult, RealData, compress_neuron, compress_neurons,
                           distill_neuron,
                           prune_and_retrain)
from farm.data.images import natural_like
from farm.data.simulate import SimulationConfig, simulate_population
from farm.distill import DistillConfig, predict, squared_pearson
from farm.teacher_responses import split_heldout
from farm.models.compact import CompactSpec
from farm.prune import PruneConfig

SIZE = 16  # px


@pytest.fixture(scope="module")
def sim():
    """4 ground-truth neurons with 3 filters per layer (true filter count 18), their session
    (Poisson repeats) and a bank of 5000 natural_like images labelled with the true rates."""
    pop = simulate_population(SimulationConfig(n_neurons=4, n_sessions=1, n_images=200, image_size=SIZE,
                                               filters=(3, 3), seed=0))
    images = natural_like(SIZE, 5000, np.random.default_rng(1))
    rates = pop.ground_truth.predict(images)  # (N, neurons), spikes per 100 ms
    train, held = split_heldout(len(images), 500, seed=0)
    return {"pop": pop, "train_images": images[train], "train_rates": rates[train],
            "held_images": images[held], "held_rates": rates[held]}


def tiny_config(seed=0, distill_steps=150, retrain_steps=50, **prune):
    """A 6-filter student trained for a few hundred steps of 32 images (~6 s on one core)."""
    return CompressConfig(
        student_filters=(6,) * 5, output_units="spikes/100ms", seed=seed,
        distill=DistillConfig(n_images=distill_steps * 32, batch_size=32, lr=3e-3, bn_recalibrate_images=256,
                              eval_every_images=50 * 32),
        retrain=DistillConfig(n_images=retrain_steps * 32, batch_size=32, lr=1e-3, bn_recalibrate_images=256),
        prune=PruneConfig(**prune))


def compress(sim, i, config, **kw):
    return compress_neuron(sim["pop"].neuron_ids[i], sim["train_images"], sim["train_rates"][:, i],
                           sim["held_images"], sim["held_rates"][:, i], config, **kw)


def test_compress_config_round_trip_and_errors():
    cfg = CompressConfig(student_filters=(12,) * 5, distill=DistillConfig(passes=3), prune=PruneConfig(tau=0.8),
                         seed=4)
    back = CompressConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    # Sections may be partial (the job YAML gives only what it changes).
    partial = CompressConfig.from_dict({"student_filters": [8] * 5, "distill": {"passes": 2},
                                        "prune": {"tau": 0.95}})
    assert partial.distill.passes == 2 and partial.distill.lr == 1e-4 and partial.prune.tau == 0.95
    assert CompressConfig().student_filters == (100,) * 5 and CompressConfig().prune.off_by_one is False
    with pytest.raises(ValueError, match=r"compress: unknown key\(s\) \[.filters.\] \(.filters. -> did you mean .student_filters.\?\)"):
        CompressConfig.from_dict({"filters": [3] * 5})
    with pytest.raises(ValueError, match=r"compress.retrain: unknown key\(s\) \[.epochs.\]"):
        CompressConfig.from_dict({"retrain": {"epochs": 3}})
    with pytest.raises(ValueError, match=r"compress.prune: unknown key\(s\) \[.threshold.\]"):
        CompressConfig.from_dict({"prune": {"threshold": 0.9}})
    with pytest.raises(ValueError, match="student_filters"):
        CompressConfig(student_filters=(3, 3))


def test_compress_neuron_end_to_end_small(sim, tmp_path):
    """Fast end to end: a tiny student is distilled, pruned, rebuilt, retrained and scored against
    the teacher and against the session's Poisson repeats; the result saves and loads."""
    session = sim["pop"].sessions[0]
    real = RealData(images=session.images, responses=session.responses[2], has_repeats=True)
    stages = []
    result = compress(sim, 2, tiny_config(), real=real, progress=lambda stage, info: stages.append(stage))
    assert result.neuron_id == "sim0:2"
    assert all(1 <= k <= 6 for k in result.filters) and sum(result.filters) < 30
    assert result.total_filters == 2 * result.filters[0] + sum(result.filters[1:])
    model = result.model()
    assert model.spec.filters == result.filters and model.spec.neuron_ids == ("sim0:2",)
    assert result.param_count == model.param_count() and result.trainable_params == model.trainable_param_count()
    assert [h["layer"] for h in result.history] == [4, 3, 2, 1, 0]
    assert [len(k) for k in result.keep] == list(result.filters)
    # Scores are what they say they are.
    pred = predict(model, sim["held_images"])
    assert result.r2_teacher_heldout == pytest.approx(squared_pearson(sim["held_rates"][:, 2], pred), abs=1e-9)
    assert result.r2_teacher_heldout > 0.5 and result.r2_teacher_distilled > 0.4
    assert result.r2_er is not None and result.r2_raw is not None and result.r_real > 0.3
    assert {"distill", "prune", "retrain", "done"} <= set(stages)
    assert set(result.timings) >= {"distill_s", "prune_s", "retrain_s"}
    # Save / load round trip.
    json.dumps(result.to_dict())
    result.save(tmp_path / "r")
    back = CompressionResult.load(tmp_path / "r")
    assert back.to_dict() == result.to_dict()
    np.testing.assert_array_equal(predict(back.model(), sim["held_images"]), pred)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["result.json", "spec.json", "state_dict.pt"]
    result.save(tmp_path / "r")  # overwriting an earlier result leaves no temporary folders behind
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_compress_neuron_is_deterministic_for_a_seed(sim):
    a = compress(sim, 3, tiny_config(seed=5, distill_steps=40, retrain_steps=20))
    b = compress(sim, 3, tiny_config(seed=5, distill_steps=40, retrain_steps=20))
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k
    assert a.to_dict() | {"timings": None, "distill_history": None, "retrain_history": None} == \
        b.to_dict() | {"timings": None, "distill_history": None, "retrain_history": None}
    assert [h["loss"] for h in a.distill_history] == [h["loss"] for h in b.distill_history]
    other = distill_neuron("sim0:3", sim["train_images"], sim["train_rates"][:, 3],
                           tiny_config(seed=6, distill_steps=40))
    same = distill_neuron("sim0:3", sim["train_images"], sim["train_rates"][:, 3],
                          tiny_config(seed=5, distill_steps=40))
    assert not torch.equal(other.readout.weight, same.readout.weight)
    # Each neuron of a job has its own initialization under the job's one seed.
    neighbour = distill_neuron("sim0:4", sim["train_images"], sim["train_rates"][:, 3],
                               tiny_config(seed=5, distill_steps=40))
    assert not torch.equal(neighbour.readout.weight, same.readout.weight)


def test_compress_neurons_packs_the_distillation_and_matches_one_at_a_time(sim):
    """compress_neurons distills 2 neurons as one packed network: the first neuron's distilled model is
    the one compress_neuron trains alone (same init and batch order, up to float rounding); the second
    starts from its own init; pruning, retraining and scores are per neuron."""
    cfg = tiny_config(seed=3, distill_steps=60, retrain_steps=20)
    ids = [sim["pop"].neuron_ids[i] for i in (0, 1)]
    packed = compress_neurons(ids, sim["train_images"], sim["train_rates"][:, :2], sim["held_images"],
                              sim["held_rates"][:, :2], cfg)
    alone = compress(sim, 0, cfg)
    assert [r.neuron_id for r in packed] == ids
    assert packed[0].r2_teacher_distilled == pytest.approx(alone.r2_teacher_distilled, abs=2e-3)
    for j, r in enumerate(packed):
        model = r.model()
        assert model.spec.neuron_ids == (ids[j],)
        assert squared_pearson(sim["held_rates"][:, j], predict(model, sim["held_images"])) == pytest.approx(
            r.r2_teacher_heldout, rel=1e-4, abs=1e-6)
        assert all(np.isscalar(h["loss"]) for h in r.distill_history)  # this neuron's own loss
    one = compress_neurons(ids[:1], sim["train_images"], sim["train_rates"][:, :1], sim["held_images"],
                           sim["held_rates"][:, :1], cfg)[0]
    for k, v in alone.state_dict.items():
        assert torch.equal(v, one.state_dict[k]), k
    with pytest.raises(ValueError, match=r"\(images, neurons\)"):
        compress_neurons(ids, sim["train_images"], sim["train_rates"][:, 0], sim["held_images"],
                         sim["held_rates"][:, :2], cfg)
    with pytest.raises(ValueError, match="duplicate"):
        compress_neurons([ids[0], ids[0]], sim["train_images"], sim["train_rates"][:, :2], sim["held_images"],
                         sim["held_rates"][:, :2], cfg)


def test_higher_tau_never_keeps_fewer_filters(sim):
    """One distilled model pruned at several thresholds (the sweep's distill-once, prune-many)."""
    nid = sim["pop"].neuron_ids[0]
    cfg = tiny_config()
    distilled = distill_neuron(nid, sim["train_images"], sim["train_rates"][:, 0], cfg)
    before = {k: v.clone() for k, v in distilled.state_dict().items()}
    totals, r2 = [], []
    for tau in (0.5, 0.7, 0.9, 0.97, 1.0):
        cfg_tau = CompressConfig.from_dict({**cfg.to_dict(), "prune": {"tau": tau},
                                            "retrain": {"n_images": 32, "batch_size": 32}})
        result = prune_and_retrain(distilled, nid, sim["train_images"], sim["train_rates"][:, 0],
                                   sim["held_images"], sim["held_rates"][:, 0], cfg_tau)
        totals.append(result.total_filters)
        r2.append(result.r2_teacher_distilled)
    assert totals == sorted(totals), totals
    assert totals[0] < totals[-1]
    assert len(set(r2)) == 1  # the same distilled model every time ...
    for k, v in distilled.state_dict().items():  # ... and pruning never modified it
        assert torch.equal(v, before[k]), k


def test_averaged_only_real_data_gives_raw_r2(sim):
    session = sim["pop"].sessions[0]
    averaged = np.nanmean(session.responses[1], axis=1)
    real = RealData(images=session.images, responses=averaged[:, None], has_repeats=False)
    result = compress(sim, 1, tiny_config(), real=real)
    assert result.r2_er is None and result.r2_raw is not None
    assert result.r2_raw == pytest.approx(result.r_real ** 2)


def test_compress_rejects_bad_input(sim, tmp_path):
    session = sim["pop"].sessions[0]
    with pytest.raises(ValueError, match="RealData.responses"):
        RealData(images=session.images, responses=session.responses[0][:10], has_repeats=True)
    with pytest.raises(ValueError, match="RealData.images"):
        RealData(images=session.images.astype(float), responses=session.responses[0], has_repeats=True)
    with pytest.raises(ValueError, match="heldout_targets"):
        compress_neuron("sim0:0", sim["train_images"], sim["train_rates"][:, 0], sim["held_images"],
                        sim["held_rates"][:10, 0], tiny_config())
    with pytest.raises(ValueError, match="image_size"):
        compress_neuron("sim0:0", sim["train_images"], sim["train_rates"][:, 0], sim["held_images"],
                        sim["held_rates"][:, 0], CompressConfig(image_size=32))
    with pytest.raises(FileNotFoundError, match="result.json"):
        CompressionResult.load(tmp_path)


@pytest.mark.slow
def test_compression_recovers_small_ground_truth_neurons(sim):
    """Neurons whose true model has 3 filters per layer (18 filters in the paper's count): a
    12-filter student, distilled, pruned at tau 0.9 and retrained, predicts the true rates with
    R² >= 0.8 on held-out images and keeps <= 3x the true filter count."""
    cfg = CompressConfig(
        student_filters=(12,) * 5, output_units="spikes/100ms", seed=0,
        distill=DistillConfig(n_images=500 * 64, lr=3e-3, eval_every_images=100 * 64),
        retrain=DistillConfig(n_images=400 * 64, lr=1e-3, eval_every_images=100 * 64))
    truth = sim["pop"].ground_truth
    for i in (2, 3):
        nid = sim["pop"].neuron_ids[i]
        result = compress(sim, i, cfg)
        summary = (nid, result.filters, result.r2_teacher_distilled, result.r2_teacher_heldout)
        assert result.r2_teacher_heldout >= 0.8, summary
        assert result.total_filters <= 3 * truth.filter_counts[nid], summary
        assert result.total_filters < CompressConfig.from_dict(cfg.to_dict()).student_filters[0] * 6


# -- real data --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compress_real_190923_neurons_from_the_shared_compact_teacher(v4_dir, published_dir, tmp_path):
    """CPU-sized compression of 3 real V4 neurons (190923:0-2; test session 190923 is never in the bank).

    Teacher: the published shared compact model distilled from the paper's ensemble (200 filters).
    Bank: 2,000 crops of TRAINING-session images only, 400 held out for pruning. Student: 8 filters
    per layer at 112 px; 6 passes of distillation and 2 of retraining. Evaluation: raw R² and r
    against the repeat-averaged responses of 190923's second half (its raw repeats are not public),
    next to the published compact models of the same neurons (benchmarks/compress_real_190923.py;
    larger runs and their numbers: benchmarks/README.md). With 1,600 training images the students
    overfit (train R² to the teacher ~0.45, held-out ~0.2), so the claim tested is modest: every
    compressed model correlates positively with the real responses, and the median r is beyond what
    chance gives for 600 images (r > 0.134 is p < 0.001).
    """
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compress_real_190923.py"
    spec = importlib.util.spec_from_file_location("compress_real_190923", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(v4_dir, published_dir, tmp_path, n_bank=2000, n_heldout=400, filters=8,
                     distill_passes=6, retrain_passes=2, lr=1e-3)
    print("\n" + bench.table(rows))
    assert [r["neuron"] for r in rows] == list(bench.NEURONS)
    student_params = CompactSpec(filters=(8,) * 5, image_size=112).param_count()
    for r in rows:
        assert r["r"] > 0, r  # r² is sign-blind: check the sign (method.md §10)
        assert max(r["filters"]) <= 8 and r["params"] < student_params, r
    assert np.median([r["r"] for r in rows]) > 0.134

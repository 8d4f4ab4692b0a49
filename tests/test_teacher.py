"""The deep-ensemble teacher (method.md §2): backbone cut, member shapes and Keras padding, readouts,
ridge algebra, save/load, determinism, and training on a simulated population against its ground truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from farm import metrics
from farm.data.simulate import SimulationConfig, simulate_population, write_population
from farm.models.base import Teacher
from farm.models.ensemble import (
    BackboneSpec,
    FactorizedReadout,
    FeatureCache,
    MemberSpec,
    RidgeSolver,
    SeparableConv2d,
    build_backbone,
    build_member,
    choose_ridge_alpha,
    fold_blocks,
    readout_init_weights,
)
from farm.teacher import EnsembleTeacher
from farm.teacher_config import TeacherConfig
from farm.teacher_readout import evaluate_teacher, fit_session_readout
from farm.teacher_training import run_teacher_training, train_teacher

REPO = Path(__file__).resolve().parents[1]

# A small, fast teacher for the simulated population (32 px images, resnet18 cut early).
SMALL = dict(backbone="resnet18", backbone_layer="layer1.1", input_size=32, n_members=2, member_width=16,
             block_width=8, n_blocks=1, epochs=2, readout_units=20, readout_reset_scale=0.05,
             validation_folds=4, feature_batch_size=128, threads=1)


@pytest.fixture(scope="module")
def population():
    """4 simulated sessions (2 train, validation, test) of 6 neurons x 160 images at 32 px."""
    return simulate_population(SimulationConfig(n_sessions=4, n_neurons=6, n_images=160, image_size=32,
                                                n_calibration=64, repeats=(4, 6), seed=3))


@pytest.fixture(scope="module")
def small_teacher(population):
    train = [s for s in population.sessions if s.role == "train"]
    val = next(s for s in population.sessions if s.role == "validation")
    return train_teacher(train, val, TeacherConfig(**SMALL))


# ------------------------------------------------------------------------------------------------
# members and padding (§2.2)


def test_paper_member_has_the_papers_parameter_count():
    member = build_member(MemberSpec(), seed=0)
    trainable = sum(p.numel() for p in member.parameters())
    bn_stats = sum(b.numel() for n, b in member.named_buffers() if "running" in n)
    # §2.2: 2,144,768 per member without the readout, 5,120 of them BN statistics.
    assert trainable + bn_stats == 2_144_768
    assert bn_stats == 5_120


def test_member_maps_14x14x1024_to_7x7x512():
    member = build_member(MemberSpec(), seed=0).eval()
    with torch.no_grad():
        out = member(torch.randn(2, 1024, 14, 14))
    assert out.shape == (2, 512, 7, 7)


def test_small_member_shapes_scale_with_config():
    member = build_member(MemberSpec(in_channels=32, width=24, block_width=8, n_blocks=2), seed=1).eval()
    with torch.no_grad():
        assert member(torch.randn(3, 32, 14, 14)).shape == (3, 24, 7, 7)
        assert member(torch.randn(3, 32, 7, 7)).shape == (3, 24, 4, 4)
    assert len(member.blocks) == 2


def test_stride2_separable_conv_pads_like_keras():
    """Keras 'same' for a stride-2 3x3 on 14x14 pads 0 before and 1 after: F.pad (0, 1, 0, 1)."""
    torch.manual_seed(0)
    conv = SeparableConv2d(4, 5, 3, stride=2)
    conv.reset_parameters()
    x = torch.randn(2, 4, 14, 14)
    with torch.no_grad():
        got = conv(x)
        depth = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.depthwise.weight, None, 2, 0, 1, 4)
        keras = conv.pointwise(depth)
        symmetric = conv.pointwise(F.conv2d(x, conv.depthwise.weight, None, 2, 1, 1, 4))
    assert got.shape == (2, 5, 7, 7)
    torch.testing.assert_close(got, keras)
    assert not torch.allclose(got, symmetric, atol=1e-4)  # PyTorch's padding=1 shifts by a pixel


# ------------------------------------------------------------------------------------------------
# backbone (§2.1)


def test_resnet50_cut_at_layer3_3_gives_14x14x1024_at_224px():
    bb = build_backbone(BackboneSpec(input_size=224))
    assert bb.out_shape == (1024, 14, 14)
    assert not bb.pretrained
    assert len(bb.net.layer3) == 4 and not hasattr(bb.net, "layer4")
    small = build_backbone(BackboneSpec(input_size=64))
    feats = small.features(np.zeros((2, 112, 112, 3), np.uint8))
    assert feats.shape == (2, 1024, 4, 4)
    assert (feats >= 0).all()  # the cut is after the block's ReLU (Keras conv4_block4_out)


def test_random_backbone_is_reproducible_from_its_seed():
    a = build_backbone(BackboneSpec(name="resnet18", layer="layer1", input_size=32, seed=5))
    b = build_backbone(BackboneSpec(name="resnet18", layer="layer1", input_size=32, seed=5))
    c = build_backbone(BackboneSpec(name="resnet18", layer="layer1", input_size=32, seed=6))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(a.features(images), b.features(images))


def test_backbone_loads_a_local_torchvision_weights_file(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pt"
    torch.save(reference.state_dict(), path)
    bb = build_backbone(BackboneSpec(input_size=64, weights_path=str(path)))
    assert bb.pretrained and bb.spec.weights_sha256 is not None
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = bb.preprocess(images, "cpu")
    with torch.no_grad():
        r = reference
        want = r.layer3[:4](r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))))
    np.testing.assert_allclose(bb.features(images), want.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sha256"):
        build_backbone(BackboneSpec(input_size=64, weights_path=str(path), weights_sha256="0" * 64))
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_backbone(BackboneSpec(input_size=64, weights_path=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="layer9"):
        build_backbone(BackboneSpec(name="resnet18", input_size=64, layer="layer9.1"))


def test_feature_cache_writes_and_reuses_npy(tmp_path):
    bb = build_backbone(BackboneSpec(name="resnet18", layer="layer1", input_size=32))
    images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    cache = FeatureCache(tmp_path)
    first = cache.get(bb, "s1", images)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and bb.key in files[0].name and "s1" in files[0].name
    again = FeatureCache(tmp_path).get(bb, "s1", images)  # a new cache reads the file
    np.testing.assert_array_equal(first, again)
    other = cache.get(bb, "s1", images[:3])  # different images -> different key
    assert other.shape[0] == 3 and len(list(tmp_path.glob("*.npy"))) == 2


# ------------------------------------------------------------------------------------------------
# readouts


def test_ridge_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    for n, d in ((400, 30), (60, 300)):  # primal and dual forms
        x = rng.normal(size=(n, d))
        w = rng.normal(size=(d, 3))
        y = x @ w + np.array([1.0, -2.0, 0.5])
        solver = RidgeSolver(x, y)
        w_hat, b_hat = solver.coef(1e-8)
        if n > d:
            np.testing.assert_allclose(w_hat, w, atol=1e-6)
            np.testing.assert_allclose(b_hat, [1.0, -2.0, 0.5], atol=1e-6)
        # Any penalty: the closed form (Xc^T Xc + a I)^-1 Xc^T Yc.
        xc, yc = x - x.mean(0), y - y.mean(0)
        want = np.linalg.solve(xc.T @ xc + 3.0 * np.eye(d), xc.T @ yc)
        np.testing.assert_allclose(solver.coef(3.0)[0], want, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(solver.predict(x[:5], [3.0])[0], x[:5] @ want + y.mean(0) - x.mean(0) @ want,
                                   rtol=1e-6, atol=1e-8)


def test_cv_alpha_prefers_small_penalties_for_clean_data_and_large_for_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(160, 20))
    clean = x @ rng.normal(size=(20, 4))
    noise = rng.normal(size=(160, 4))
    (_, g_clean), s_clean = choose_ridge_alpha([x], clean)
    (_, g_noise), s_noise = choose_ridge_alpha([x], noise)
    assert s_clean > 0.99 and s_noise < 0.2
    assert g_clean < g_noise


def test_fold_blocks_follow_the_reference_scheme():
    folds = fold_blocks(80, 8)
    assert len(folds) == 8
    tested = np.concatenate([t for _, t in folds])
    np.testing.assert_array_equal(np.sort(tested), np.arange(80))
    train0, test0 = folds[0]
    assert not set(train0) & set(test0) and not set(train0) & set(range(70, 80))  # validation block out


def test_readout_reset_is_small_shuffled_glorot_not_zero():
    gen = torch.Generator().manual_seed(0)
    init_mix, init_sp = readout_init_weights(width=8, side=3, units=20, generator=gen)
    assert init_mix.abs().max() <= math.sqrt(6 / (8 + 20))
    a = FactorizedReadout.reset_from(init_mix, init_sp, 5, gen, scale=1e-3)
    b = FactorizedReadout.reset_from(init_mix, init_sp, 5, gen, scale=1e-3)
    assert a.mixing.shape == (5, 8) and a.spatial.shape == (5, 3, 3)
    assert (a.mixing_bias == 0).all() and (a.spatial_bias == 0).all()
    assert (a.mixing != 0).any() and (a.spatial != 0).any()
    # Every value is 1e-3 x some element of the initial kernels (an element shuffle) ...
    pool = set(np.round(1e-3 * init_mix.flatten().numpy(), 12))
    assert set(np.round(a.mixing.detach().flatten().numpy(), 12)) <= pool
    # ... and each reset draws a new shuffle: nothing is carried over between session visits.
    assert not torch.equal(a.mixing, b.mixing)
    with pytest.raises(ValueError, match="readout_units"):
        FactorizedReadout.reset_from(init_mix, init_sp, 21, gen)


# ------------------------------------------------------------------------------------------------
# config


def test_config_round_trips_and_refuses_unknown_keys(tmp_path):
    cfg = TeacherConfig(**SMALL, train_sessions=["a", "b"], validation_session="v")
    path = cfg.to_yaml(tmp_path / "t.yaml")
    assert TeacherConfig.load(path) == cfg
    assert cfg.passes == [1, 2]
    with pytest.raises(ValueError, match="unknown key"):
        TeacherConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="passes"):
        TeacherConfig(epochs=3, passes=[1, 2])
    assert TeacherConfig().lr == 2.0 and TeacherConfig().momentum == 0.75 and TeacherConfig().clip_value == 0.5


@pytest.mark.parametrize("name", ["teacher_demo.yaml", "teacher_v4_real.yaml"])
def test_shipped_configs_parse(name):
    cfg = TeacherConfig.load(REPO / "configs" / name)
    assert cfg.weights_path is None or cfg.weights_path.endswith((".pt", ".pth"))
    if name == "teacher_v4_real.yaml":
        assert cfg.train_sessions == ["190925", "190927", "190928", "190929", "210305", "210322", "210621"]
        assert cfg.validation_session == "210224" and cfg.test_session == "190923"


# ------------------------------------------------------------------------------------------------
# training, readouts for new sessions, save/load (on a simulated population)


def test_trained_teacher_is_a_deterministic_teacher(small_teacher, population):
    val = next(s for s in population.sessions if s.role == "validation")
    assert isinstance(small_teacher, Teacher)
    assert small_teacher.neuron_ids == val.neuron_ids
    history = small_teacher.info["history"]
    assert len(history) == 2 * 2  # 2 epochs x 2 training sessions
    assert [h["passes"] for h in history] == [1, 1, 2, 2]
    assert [round(h["lr"], 6) for h in history] == [2.0, 2.0, 1.7, 1.7]
    assert all(np.isfinite(h["val_score"]) for h in history)
    images = val.images[:7]
    p1, p2 = small_teacher.predict(images), small_teacher.predict(images, batch_size=3)
    assert p1.dtype == np.float32 and p1.shape == (7, val.n_neurons)
    np.testing.assert_array_equal(p1, small_teacher.predict(images))
    np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-5)


def test_training_is_reproducible(small_teacher, population):
    train = [s for s in population.sessions if s.role == "train"]
    val = next(s for s in population.sessions if s.role == "validation")
    again = train_teacher(train, val, TeacherConfig(**SMALL))
    assert again.teacher_id == small_teacher.teacher_id


def test_save_load_round_trip_gives_identical_predictions(small_teacher, population, tmp_path):
    small_teacher.save(tmp_path / "t")
    spec = json.loads((tmp_path / "t" / "teacher.json").read_text())
    assert spec["pretrained"] is False and spec["teacher_id"] == small_teacher.teacher_id
    loaded = EnsembleTeacher.load(tmp_path / "t")
    images = population.sessions[0].images[:9]
    np.testing.assert_array_equal(loaded.predict(images), small_teacher.predict(images))
    assert loaded.teacher_id == small_teacher.teacher_id and loaded.neuron_ids == small_teacher.neuron_ids
    spec["backbone_fingerprint"] = "0" * 64
    (tmp_path / "t" / "teacher.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="fingerprint"):
        EnsembleTeacher.load(tmp_path / "t")


def test_fit_session_readout_on_a_new_session(small_teacher, population):
    """A readout fit on the first half (80 images) of an unseen session predicts the true rates of its
    second half (median r > 0.35 for this tiny teacher; the demo config reaches >= 0.8)."""
    test = next(s for s in population.sessions if s.role == "test")
    assert not set(test.neuron_ids) & set(small_teacher.neuron_ids)
    for kind in ("ridge", "factorized"):
        fitted = fit_session_readout(small_teacher, test, half="first", kind=kind, factorized_epochs=5)
        assert fitted.neuron_ids == test.neuron_ids
        assert all(a is b for a, b in zip(fitted.members, small_teacher.members))  # shares the members
        second = test.halves()[1]
        truth = population.ground_truth.subset(test.neuron_ids).predict(second.images)
        r = metrics.pearson_r(fitted.predict(second.images).T, truth.T)
        assert np.median(r) > 0.35, (kind, r)
        ev = evaluate_teacher(fitted, test, "second")
        assert ev["n_images"] == second.n_images and 0 < ev["median_r2_raw"] <= 1
        assert "median_r2_er" in ev
    with pytest.raises(ValueError, match="does not predict"):
        evaluate_teacher(small_teacher, test)


def test_spike_units_undo_the_standardization(small_teacher, population):
    test = next(s for s in population.sessions if s.role == "test")
    z = fit_session_readout(small_teacher, test, alpha=1000.0)
    spikes = fit_session_readout(small_teacher, test, alpha=1000.0, output_units="spikes")
    images = test.images[:20]
    want = z.predict(images) * spikes.head.target_std.numpy() + spikes.head.target_mean.numpy()
    np.testing.assert_allclose(spikes.predict(images), want, rtol=1e-5, atol=1e-5)
    first = test.halves()[0].mean_responses()
    np.testing.assert_allclose(spikes.head.target_mean.numpy(), first.mean(1), rtol=1e-5)


def test_run_teacher_training_reports_the_test_half(tmp_path):
    cfg = dict(SMALL, epochs=1, simulation=dict(n_sessions=3, n_neurons=4, n_images=128, image_size=32,
                                                 n_calibration=32, seed=9))
    events = []
    teacher, report = run_teacher_training(cfg, None, tmp_path, callback=lambda e, i: events.append(e))
    assert report["test_session"] == "sim2" and 0 <= report["test_median_r2_raw"] <= 1
    assert "ground_truth_median_r" in report and report["pretrained"] is False
    assert (tmp_path / "teacher" / "teacher.json").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["teacher_id"] == teacher.teacher_id
    assert events[0] == "features" and "session" in events and events[-1] == "test"


# ------------------------------------------------------------------------------------------------
# the demo config against the simulated ground truth


@pytest.mark.slow
def test_demo_config_predicts_held_out_ground_truth(tmp_path):
    """configs/teacher_demo.yaml: members trained on simulated sessions, the test session's readout fit
    on its first half; predictions of its held-out second half correlate with the true rates at
    median r >= 0.8, better than a ridge readout on the (random) backbone features alone."""
    cfg = TeacherConfig.load(REPO / "configs" / "teacher_demo.yaml")
    pop = simulate_population(SimulationConfig.from_dict(cfg.simulation))
    write_population(pop, tmp_path / "population")
    teacher, report = run_teacher_training(cfg, tmp_path / "population", tmp_path / "run")
    assert report["ground_truth_median_r"] >= 0.8, report["ground_truth"]["r"]
    assert report["ground_truth"]["n_neurons"] == len(teacher.neuron_ids) == cfg.simulation["n_neurons"]

    test = pop.sessions[-1]
    first, second = test.halves()
    backbone = build_backbone(cfg.backbone_spec())
    x_first = backbone.features(first.images).reshape(first.n_images, -1)
    x_second = backbone.features(second.images).reshape(second.n_images, -1)
    y = first.mean_responses().T
    y = (y - y.mean(0)) / y.std(0)
    alpha, _ = choose_ridge_alpha([x_first], y)
    solver = RidgeSolver(x_first, y)
    w, b = solver.coef(alpha[1] * solver.scale())
    truth = pop.ground_truth.subset(test.neuron_ids).predict(second.images)
    r_backbone = np.median(metrics.pearson_r((x_second @ w + b).T, truth.T))
    assert report["ground_truth_median_r"] > r_backbone

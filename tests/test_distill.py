"""Distillation (method.md §4): teacher responses, kernel smoothing, the training loop."""

import json

import numpy as np
import pytest
import torch

from farm.data.images import BankConfig, build_bank, natural_like
from farm.models.input import recenter
from farm.data.simulate import SimulationConfig, simulate_population
from farm.distill import DistillConfig, distill, gaussian_weights, predict, recalibrate_bn_, smooth_kernels_, squared_pearson
from farm.teacher_responses import TeacherResponses, compute_teacher_responses, responses_cache_path, split_heldout
from farm.models.base import CompactTeacher
from farm.models.compact import CompactSpec, build_compact

SIZE = 16  # px: small enough for CPU tests; readout maps are 4x4


class CountingTeacher:
    """A real CompactTeacher that also counts how many images it was asked to predict."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.neuron_ids = teacher.neuron_ids
        self.models = teacher.models  # so its fingerprint is that of the wrapped models
        self.calls = 0
        self.images = 0
        self.batch_sizes = []  # as asked (None: the teacher's own default)

    def predict(self, images, batch_size=None):
        self.calls += 1
        self.images += len(images)
        self.batch_sizes.append(batch_size)
        return self.teacher.predict(images) if batch_size is None else self.teacher.predict(images, batch_size=batch_size)


@pytest.fixture(scope="module")
def neurons():
    """Simulated ground-truth neurons (3 filters per layer, smooth kernels, calibrated BN)."""
    pop = simulate_population(SimulationConfig(n_neurons=4, n_sessions=1, n_images=4, image_size=SIZE,
                                               filters=(3, 3), seed=0))
    return pop.ground_truth.models


@pytest.fixture(scope="module")
def bank_images():
    return natural_like(SIZE, 2500, np.random.default_rng(1))


def tiny_student(seed=1, filters=8):
    return build_compact(CompactSpec(filters=(filters,) * 5, image_size=SIZE), seed=seed)


# -- smoothing --------------------------------------------------------------------------------------
def test_gaussian_weights_are_scipys_sigma_half_kernel():
    # method.md §4: scipy.ndimage.gaussian_filter(sigma=0.5, truncate=4) -> radius 2, these weights.
    w = gaussian_weights(0.5)
    np.testing.assert_allclose(w, [0.000264, 0.106451, 0.786571, 0.106451, 0.000264], atol=1e-6)
    assert w.sum() == pytest.approx(1.0)


def reference_smooth_2d(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Hand-written separable smoothing of a 2-D array with the half-sample symmetric boundary
    (d c b a | a b c d | d c b a), one output pixel at a time."""
    n_rows, n_cols = a.shape
    r = len(w) // 2

    def reflect(i, n):
        while i < 0 or i >= n:
            i = -i - 1 if i < 0 else 2 * n - 1 - i
        return i

    rows = np.zeros_like(a, dtype=np.float64)
    for i in range(n_rows):
        for j in range(n_cols):
            rows[i, j] = sum(w[k] * a[i, reflect(j + k - r, n_cols)] for k in range(len(w)))
    out = np.zeros_like(rows)
    for i in range(n_rows):
        for j in range(n_cols):
            out[i, j] = sum(w[k] * rows[reflect(i + k - r, n_rows), j] for k in range(len(w)))
    return out


def test_smoothing_matches_a_hand_written_reference_and_skips_layer0():
    model = build_compact(CompactSpec(filters=(4, 5, 3, 6, 3), image_size=SIZE), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = gaussian_weights(0.5)
    smooth_kernels_(model, sigma=0.5)
    for layer in range(1, 5):
        got = model.depthwise(layer).weight.detach().double().numpy()
        src = before[f"layer{layer}_depth.weight"].double().numpy()
        for c in range(src.shape[0]):
            np.testing.assert_allclose(got[c, 0], reference_smooth_2d(src[c, 0], w), rtol=1e-5, atol=1e-7)
    r, k4 = model.spec.readout_size, model.spec.filters[4]
    maps_before = before["readout.weight"].view(r, r, k4).double().numpy()
    maps_after = model.readout_maps().detach().double().numpy()
    for c in range(k4):
        np.testing.assert_allclose(maps_after[:, :, c], reference_smooth_2d(maps_before[:, :, c], w),
                                   rtol=1e-5, atol=1e-7)
    # The layer-0 RGB kernels, pointwise weights, biases and BN are never smoothed.
    for name, value in model.state_dict().items():
        if "depth" not in name and name != "readout.weight":
            assert torch.equal(value, before[name]), name
    assert not torch.equal(model.depthwise(1).weight, before["layer1_depth.weight"])


def test_smoothing_matches_scipy_gaussian_filter():
    ndimage = pytest.importorskip("scipy.ndimage")
    model = build_compact(CompactSpec(filters=(3, 4, 5, 3, 4), image_size=32), seed=2)
    src = model.depthwise(2).weight.detach().double().numpy().copy()
    maps = model.readout_maps().detach().double().numpy().copy()
    smooth_kernels_(model)
    np.testing.assert_allclose(model.depthwise(2).weight.detach().numpy(),
                               ndimage.gaussian_filter(src, 0.5, axes=(2, 3), mode="reflect"), atol=1e-6)
    np.testing.assert_allclose(model.readout_maps().detach().numpy(),
                               ndimage.gaussian_filter(maps, 0.5, axes=(0, 1), mode="reflect"), atol=1e-6)


def test_smoothing_preserves_a_constant_kernel():
    # The reflect boundary keeps a constant image constant: the 1-D weights sum to 1 everywhere.
    model = build_compact(CompactSpec(filters=(3,) * 5, image_size=SIZE), seed=0)
    with torch.no_grad():
        model.depthwise(3).weight.fill_(0.25)
    smooth_kernels_(model)
    torch.testing.assert_close(model.depthwise(3).weight, torch.full_like(model.depthwise(3).weight, 0.25))


# -- teacher responses ------------------------------------------------------------------------------
def test_teacher_responses_one_pass_for_all_neurons_and_cache_hit(neurons, tmp_path):
    images = natural_like(SIZE, 300, np.random.default_rng(5))
    teacher = CountingTeacher(CompactTeacher(neurons[:2]))
    first = compute_teacher_responses(teacher, images, batch_size=128, cache_dir=tmp_path)
    assert teacher.images == 300  # one pass over the images for both neurons
    assert set(teacher.batch_sizes) == {128}
    assert first.responses.shape == (300, 2) and first.responses.dtype == np.float32
    np.testing.assert_array_equal(first.image_ids, np.arange(300))
    np.testing.assert_allclose(first.column(neurons[1].spec.neuron_ids[0]),
                               predict(neurons[1], images), rtol=1e-5, atol=1e-5)
    calls = teacher.calls
    second = compute_teacher_responses(teacher, images, batch_size=128, cache_dir=tmp_path)
    assert teacher.calls == calls  # loaded from the cache, the teacher was not asked again
    np.testing.assert_array_equal(second.responses, first.responses)
    assert (second.teacher_id, second.bank_id) == (first.teacher_id, first.bank_id)
    assert (responses_cache_path(tmp_path, first.teacher_id, first.bank_id) / "teacher_responses.arrow").is_file()
    # Other images are another bank: computed afresh.
    compute_teacher_responses(teacher, images[:100], cache_dir=tmp_path)
    assert teacher.images == 400
    # A truncated cache file is computed again (with a warning) and replaced, not a dead end.
    path = responses_cache_path(tmp_path, first.teacher_id, first.bank_id) / "teacher_responses.arrow"
    path.write_bytes(path.read_bytes()[:200])
    third = compute_teacher_responses(teacher, images, batch_size=128, cache_dir=tmp_path)
    assert teacher.images == 700 and np.array_equal(third.responses, first.responses)
    assert compute_teacher_responses(teacher, images, cache_dir=tmp_path).responses.shape == (300, 2)
    assert teacher.images == 700  # the rewritten cache serves again


def test_teacher_responses_stream_an_image_bank(neurons, tmp_path):
    bank = build_bank(None, BankConfig(n_images=70, image_size=SIZE, proportions={"natural_like": 1.0},
                                       shard_size=30), tmp_path / "bank")
    teacher = CountingTeacher(CompactTeacher(neurons[:2]))
    seen = []
    resp = compute_teacher_responses(teacher, bank, progress=lambda done, total: seen.append((done, total)))
    assert teacher.calls == 3  # one predict per shard
    # at the teacher's own batch size: a 200-filter teacher at 112 px needs ~12 GB at batch 256
    assert teacher.batch_sizes == [None] * 3
    assert seen == [(30, 70), (60, 70), (70, 70)]
    assert resp.bank_id == bank.bank_id
    ids, images, _ = bank.load_all()
    np.testing.assert_array_equal(resp.image_ids, ids)
    np.testing.assert_allclose(resp.responses, CompactTeacher(neurons[:2]).predict(images), rtol=1e-5, atol=1e-5)


def test_teacher_responses_save_load_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    tr = TeacherResponses(image_ids=np.arange(10, 20), responses=rng.standard_normal((10, 3)),
                          neuron_ids=("s:0", "s:1", "s:2"), teacher_id="t", bank_id="b")
    tr.save(tmp_path)
    back = TeacherResponses.load(tmp_path)
    np.testing.assert_array_equal(back.image_ids, tr.image_ids)
    np.testing.assert_array_equal(back.responses, tr.responses)
    assert back.neuron_ids == tr.neuron_ids and (back.teacher_id, back.bank_id) == ("t", "b")
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temporary file
    np.testing.assert_array_equal(back.column("s:1"), tr.responses[:, 1])
    with pytest.raises(KeyError, match="s:9"):
        back.column("s:9")
    with pytest.raises(FileNotFoundError, match="teacher_responses"):
        TeacherResponses.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "teacher_responses.arrow").write_bytes(b"not arrow")
    with pytest.raises(ValueError, match="Arrow"):
        TeacherResponses.load(tmp_path / "bad")
    with pytest.raises(ValueError, match="n_neurons"):
        TeacherResponses(np.arange(3), np.zeros((3, 2)), ("a",), "t", "b")
    with pytest.raises(ValueError, match="unique"):
        TeacherResponses(np.arange(3), np.zeros((3, 2)), ("a", "a"), "t", "b")


def test_teacher_responses_need_ids_to_cache_and_uint8_images(neurons, tmp_path):
    class Anonymous:
        neuron_ids = ("x:0",)

        def predict(self, images, batch_size=256):
            return np.zeros((len(images), 1), np.float32)

    images = natural_like(SIZE, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="teacher_id"):
        compute_teacher_responses(Anonymous(), images, cache_dir=tmp_path)
    assert compute_teacher_responses(Anonymous(), images, cache_dir=tmp_path, teacher_id="zero").n_images == 8
    with pytest.raises(ValueError, match="uint8"):
        compute_teacher_responses(CompactTeacher(neurons[:2]), images.astype(np.float32))


def test_teacher_fingerprint_follows_weights_and_selected_outputs(neurons):
    from farm.teacher_responses import teacher_fingerprint
    from farm.models.published import SelectOutputs

    full = CompactTeacher(neurons[:2])
    assert teacher_fingerprint(full) == teacher_fingerprint(CompactTeacher(neurons[:2]))
    assert teacher_fingerprint(full) != teacher_fingerprint(CompactTeacher(neurons[1:3]))
    one = SelectOutputs(full, [full.neuron_ids[1]])
    assert teacher_fingerprint(one) not in (None, teacher_fingerprint(full))
    assert teacher_fingerprint(one) == teacher_fingerprint(SelectOutputs(full, [full.neuron_ids[1]]))


def test_split_heldout_is_a_seeded_partition():
    train, held = split_heldout(100, 30, seed=3)
    assert len(held) == 30 and len(train) == 70
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(100))
    again = split_heldout(100, 30, seed=3)
    assert np.array_equal(again[1], held) and not np.array_equal(split_heldout(100, 30, seed=4)[1], held)
    with pytest.raises(ValueError, match="n_heldout"):
        split_heldout(10, 10)


# -- training ---------------------------------------------------------------------------------------
def test_distill_config_round_trip_and_validation():
    cfg = DistillConfig(passes=2.5, lr=3e-3, smooth_every_images=1000, betas=(0.8, 0.99))
    back = DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert DistillConfig().adam_eps == 1e-7 and DistillConfig().batch_size == 64 and DistillConfig().lr == 1e-4
    with pytest.raises(ValueError, match=r"DistillConfig: unknown key\(s\) \[.learning_rate.\]"):
        DistillConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="loss"):
        DistillConfig(loss="l1")
    with pytest.raises(ValueError, match="batch_size"):
        DistillConfig(batch_size=0)


def test_distill_is_deterministic_for_a_seed_and_loss_decreases(neurons, bank_images):
    images = bank_images[:1000]
    targets = CompactTeacher([neurons[0]]).predict(images)[:, 0]
    cfg = DistillConfig(n_images=60 * 32, batch_size=32, lr=3e-3, log_every_steps=20, smooth_every_images=640,
                        seed=7, bn_recalibrate_images=256)
    a = distill(tiny_student(), images, targets, cfg)
    b = distill(tiny_student(), images, targets, cfg)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    c = distill(tiny_student(), images, targets, DistillConfig(**{**cfg.to_dict(), "seed": 8}))
    assert not torch.equal(c.model.readout.weight, a.model.readout.weight)
    # MSE falls well below the target variance (what predicting the mean would give).
    assert a.steps == 60 and a.images_seen == 60 * 32
    assert a.history[-1]["loss"] < 0.6 * a.history[0]["loss"]
    assert a.history[-1]["loss"] < 0.95 * float(np.var(targets))
    # Smoothing every 640 images = every 20 steps, and always at the end.
    assert [h["step"] for h in a.history if h["smoothed"]] == [20, 40, 60]


def test_average_tail_keeps_the_mean_of_the_last_steps_weights(neurons, bank_images):
    """``average_tail``: the kept weights are exactly the mean of the weights after each of the last
    steps (a constant rate, so runs stopped after 8, 9 and 10 steps are the 10-step run's own states),
    BatchNorm recalibrated for them; the held-out R² of the averaged weights is logged."""
    images = bank_images[:600]
    targets = CompactTeacher([neurons[1]]).predict(images)[:, 0]
    base = dict(batch_size=32, lr=3e-3, smooth_sigma=0.0, seed=3, bn_recalibrate_images=256, log_every_steps=5)
    states = [dict(distill(tiny_student(), images, targets, DistillConfig(n_images=k * 32, **base)).model.named_parameters())
              for k in (8, 9, 10)]
    avg = distill(tiny_student(), images, targets, DistillConfig(n_images=10 * 32, average_tail=0.3, **base),
                  eval_images=bank_images[2000:2200], eval_targets=CompactTeacher([neurons[1]]).predict(bank_images[2000:2200])[:, 0])
    for name, p in avg.model.named_parameters():
        torch.testing.assert_close(p, sum(s[name] for s in states) / 3, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(avg.model.readout.weight, states[-1]["readout.weight"])
    assert avg.steps == 10 and "eval_r2_averaged" in avg.history[-1]
    ref = tiny_student()  # the BatchNorm statistics are those of the averaged weights on the run's images
    ref.load_state_dict(avg.model.state_dict())
    for layer in range(5):
        ref.bn(layer).reset_running_stats()
    recalibrate_bn_(ref, images[torch.randperm(600, generator=torch.Generator().manual_seed(4))[:256].numpy()])
    for layer in range(5):  # distill recalibrates in its channels_last layout: another summation order
        torch.testing.assert_close(avg.model.bn(layer).running_mean, ref.bn(layer).running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(avg.model.bn(layer).running_var, ref.bn(layer).running_var, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"average_tail must be in \[0, 1\]"):
        DistillConfig(average_tail=1.5)


def test_recalibrate_bn_sets_running_stats_to_data_statistics(bank_images):
    model = tiny_student()
    images = bank_images[:128]
    recalibrate_bn_(model, images, batch_size=64)
    with torch.no_grad():
        pre0 = model.layer_pre(0, recenter(images))
    torch.testing.assert_close(model.bn(0).running_mean, pre0.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-3)
    assert model.bn(0).momentum == model.spec.bn_momentum and model.training


def test_distilled_student_reaches_the_teacher(neurons, bank_images):
    """A student distilled from a compact teacher predicts it on held-out images (R² > 0.8; an
    untrained student is at ~0)."""
    teacher = CompactTeacher([neurons[3]])
    targets = teacher.predict(bank_images)[:, 0]
    train, held = split_heldout(len(bank_images), 500, seed=0)
    seen = []
    cfg = DistillConfig(n_images=350 * 64, lr=3e-3, log_every_steps=50, eval_every_images=100 * 64)
    res = distill(tiny_student(filters=12), bank_images[train], targets[train], cfg,
                  callback=lambda step, info: seen.append(step),
                  eval_images=bank_images[held], eval_targets=targets[held])
    r2 = squared_pearson(targets[held], predict(res.model, bank_images[held]))
    assert r2 > 0.8, res.history
    assert res.history[-1]["eval_r2"] == pytest.approx(r2, abs=1e-6)
    assert seen == [h["step"] for h in res.history] and seen[-1] == 350
    assert res.history[0]["loss"] > 2 * res.history[-1]["loss"]


def test_distill_with_augmentation_requeries_the_teacher(neurons, bank_images):
    teacher = CountingTeacher(CompactTeacher([neurons[0]]))
    cfg = DistillConfig(n_images=5 * 16, batch_size=16, augment=True, lr=1e-3, bn_recalibrate_images=0)
    res = distill(tiny_student(), bank_images[:200], None, cfg, teacher=teacher,
                  neuron_id=neurons[0].spec.neuron_ids[0])
    assert teacher.calls == 5 and teacher.images == 80  # one teacher query per augmented batch
    assert res.steps == 5
    with pytest.raises(ValueError, match="teacher"):
        distill(tiny_student(), bank_images[:200], None, cfg)


def test_distill_with_mirrors_trains_on_the_images_and_their_mirrors(neurons, bank_images):
    """``mirrors``: the 2N pairs (image, response) and (mirror, the mirror's response), flipped batch
    by batch, train the student exactly as the mirrors stored as images would; the teacher's response
    to a mirror is its own (not the image's)."""
    teacher = CompactTeacher([neurons[1]])
    images = bank_images[:300]
    mirrors = np.ascontiguousarray(images[:, :, ::-1])
    targets, mirror_targets = teacher.predict(images)[:, 0], teacher.predict(mirrors)[:, 0]
    assert squared_pearson(targets, mirror_targets) < 0.95  # the neuron is not mirror-symmetric
    cfg = DistillConfig(n_images=40 * 16, batch_size=16, lr=3e-3, seed=3, bn_recalibrate_images=0,
                        standardize_targets=True, log_every_steps=10, mirrors=True)
    mirrored = distill(tiny_student(), images, targets, cfg, mirror_targets=mirror_targets)
    stored = distill(tiny_student(), np.concatenate([images, mirrors]), np.concatenate([targets, mirror_targets]),
                     DistillConfig(**{**cfg.to_dict(), "mirrors": False}))
    assert [h["loss"] for h in mirrored.history] == pytest.approx([h["loss"] for h in stored.history], rel=1e-5)
    for k, v in mirrored.model.state_dict().items():
        torch.testing.assert_close(v, stored.model.state_dict()[k], rtol=1e-4, atol=1e-5)
    # mirrors off: mirror_targets are not used (the run is the plain one on the N images)
    plain_cfg = DistillConfig(**{**cfg.to_dict(), "mirrors": False})
    plain = distill(tiny_student(), images, targets, plain_cfg, mirror_targets=mirror_targets)
    again = distill(tiny_student(), images, targets, plain_cfg)
    assert torch.equal(plain.model.readout.weight, again.model.readout.weight)
    with pytest.raises(ValueError, match="mirror_targets"):
        distill(tiny_student(), images, targets, cfg)
    with pytest.raises(ValueError, match="mirror_targets"):
        distill(tiny_student(), images, targets, cfg, mirror_targets=mirror_targets[:100])
    with pytest.raises(ValueError, match="mirrors and augment"):
        DistillConfig(mirrors=True, augment=True)


def test_teacher_responses_to_the_mirrors_are_cached_beside_the_images(neurons, tmp_path):
    images = natural_like(SIZE, 120, np.random.default_rng(6))
    teacher = CountingTeacher(CompactTeacher(neurons[:2]))
    plain = compute_teacher_responses(teacher, images, cache_dir=tmp_path)
    mirrored = compute_teacher_responses(teacher, images, cache_dir=tmp_path, mirror=True)
    assert mirrored.bank_id == plain.bank_id + "|mirrored" and teacher.images == 240
    np.testing.assert_allclose(mirrored.responses, CompactTeacher(neurons[:2]).predict(images[:, :, ::-1].copy()),
                               rtol=1e-5, atol=1e-5)
    again = compute_teacher_responses(teacher, images, cache_dir=tmp_path, mirror=True)
    assert teacher.images == 240 and np.array_equal(again.responses, mirrored.responses)  # its own cache entry
    assert np.array_equal(compute_teacher_responses(teacher, images, cache_dir=tmp_path).responses, plain.responses)


def test_distill_rejects_bad_input(bank_images):
    images = bank_images[:50]
    targets = np.zeros(50, np.float32)
    cfg = DistillConfig(n_images=64)
    with pytest.raises(ValueError, match="uint8"):
        distill(tiny_student(), images.astype(np.float32), targets, cfg)
    with pytest.raises(ValueError, match="16x16"):
        distill(build_compact(CompactSpec(filters=(3,) * 5, image_size=32)), images, targets, cfg)
    with pytest.raises(ValueError, match="targets"):
        distill(tiny_student(), images, targets[:40], cfg)
    with pytest.raises(ValueError, match="NaN"):
        distill(tiny_student(), images, np.full(50, np.nan, np.float32), cfg)
    with pytest.raises(ValueError, match="eval_targets"):
        distill(tiny_student(), images, targets, cfg, eval_images=images)
    with pytest.raises(ValueError, match="targets are required"):
        distill(tiny_student(), images, None, cfg)


def test_distill_many_trains_a_pack_like_students_one_by_one(bank_images):
    """Several neurons at once (one PackedCompact): the same losses and, up to float rounding (a
    near-zero gradient whose sign flips moves a weight by ~2 lr under Adam), the same weights."""
    from farm.distill import distill_many
    from farm.models.packed import PackedCompact

    images = bank_images[:400]
    rng = np.random.default_rng(0)
    targets = (images.mean(axis=(1, 2, 3))[:, None] / 50 + rng.standard_normal((400, 3))).astype(np.float32)

    def students():
        return [build_compact(CompactSpec(filters=(5,) * 5, image_size=SIZE), seed=s) for s in range(3)]

    unpacked = PackedCompact(students()).unpack()  # pack -> unpack is the identity
    for a, b in zip(unpacked, students()):
        for k, v in b.state_dict().items():
            assert torch.equal(a.state_dict()[k], v), k
    lr = 1e-4
    cfg = DistillConfig(n_images=4 * 32, batch_size=32, lr=lr, smooth_every_images=64, bn_recalibrate_images=64,
                        log_every_steps=1, seed=3)
    many = distill_many(students(), images, targets, cfg, eval_images=images[:50], eval_targets=targets[:50])
    singles = [distill(m, images, targets[:, j], cfg) for j, m in enumerate(students())]
    for step in range(4):
        np.testing.assert_allclose(many.history[step]["losses"], [s.history[step]["loss"] for s in singles],
                                   rtol=1e-5)
    for packed, single in zip(many.models, singles):
        for k, v in single.model.state_dict().items():
            np.testing.assert_allclose(packed.state_dict()[k].numpy(), v.numpy(), atol=10 * lr, rtol=1e-3)
    assert len(many.history[-1]["eval_r2"]) == 3
    with pytest.raises(ValueError, match="same widths"):
        distill_many([tiny_student(), build_compact(CompactSpec(filters=(4,) * 5, image_size=SIZE))], images,
                     targets[:, :2], cfg)
    with pytest.raises(ValueError, match="neurons"):
        distill_many(students(), images, targets[:, :2], cfg)


def test_early_lr_scale_slows_layers_0_to_2_only(neurons, bank_images):
    """``early_lr_scale``: layers 0-2 train at that factor of the rate, the rest at the rate. Adam's
    first step moves every parameter by ~lr x sign(gradient), so after one step from the same weights
    the early layers have moved by the factor x their unscaled move and the later layers alike."""
    images = bank_images[:64]
    targets = CompactTeacher([neurons[1]]).predict(images)[:, 0]
    base = dict(n_images=32, batch_size=32, lr=1e-3, smooth_sigma=0.0, seed=3, bn_recalibrate_images=0)
    start = dict(tiny_student().named_parameters())
    moved = {f: {n: (p - start[n]).detach() for n, p in distill(tiny_student(), images, targets, DistillConfig(
        early_lr_scale=f, **base)).model.named_parameters()} for f in (1.0, 0.1)}
    early = [n for n in start if n.split("_")[0] in ("layer0", "layer1", "layer2")]
    assert early and len(early) < len(start)
    for n in start:
        want = moved[1.0][n] * (0.1 if n in early else 1.0)
        torch.testing.assert_close(moved[0.1][n], want, rtol=1e-3, atol=1e-7, msg=n)
    assert moved[1.0]["layer0_conv.weight"].abs().max() > 5e-4  # the step did move them
    with pytest.raises(ValueError, match="early_lr_scale must be > 0"):
        DistillConfig(early_lr_scale=0)


def test_frozen_layers_keep_their_weights_and_the_rest_trains_as_before(neurons, bank_images):
    """``frozen_layers=2``: layers 0-1 end with the weights they started with; after one step the
    later layers have moved exactly as they move with nothing frozen (the forward pass and their
    gradients are the same; only the frozen layers' gradients are skipped)."""
    from farm.distill import distill_many

    images = bank_images[:64]
    targets = CompactTeacher([neurons[1]]).predict(images)[:, 0]
    base = dict(n_images=32, batch_size=32, lr=1e-3, smooth_sigma=0.0, seed=3, bn_recalibrate_images=0)
    start = {n: p.detach().clone() for n, p in tiny_student().named_parameters()}
    after = {k: dict(distill(tiny_student(), images, targets, DistillConfig(frozen_layers=k, **base))
                     .model.named_parameters()) for k in (0, 2)}
    frozen = [n for n in start if n.split("_")[0] in ("layer0", "layer1")]
    assert frozen and len(frozen) < len(start)
    for n in start:
        if n in frozen:
            torch.testing.assert_close(after[2][n], start[n], rtol=0, atol=0, msg=n)
            assert not torch.equal(after[0][n], start[n]), n  # they do train when not frozen
        else:
            torch.testing.assert_close(after[2][n], after[0][n], rtol=1e-4, atol=1e-7, msg=n)
        assert after[2][n].requires_grad  # handed back trainable
    with pytest.raises(ValueError, match="frozen_layers must be an integer in 0..4"):
        DistillConfig(frozen_layers=5)
    with pytest.raises(ValueError, match="not implemented for packed"):
        distill_many([tiny_student()], images, targets[:, None], DistillConfig(frozen_layers=1, **base))


def test_frozen_depthwise_keeps_only_the_spatial_kernels(neurons, bank_images):
    """``frozen_depthwise=2``: the depthwise kernels of layers 1-2 keep their start weights; their 1 x 1
    mixing and BatchNorm and every other layer still train; handed back trainable."""
    from farm.distill import distill_many

    images = bank_images[:64]
    targets = CompactTeacher([neurons[1]]).predict(images)[:, 0]
    base = dict(n_images=32, batch_size=32, lr=1e-3, smooth_sigma=0.0, seed=3, bn_recalibrate_images=0)
    start = {n: p.detach().clone() for n, p in tiny_student().named_parameters()}
    after = dict(distill(tiny_student(), images, targets, DistillConfig(frozen_depthwise=2, **base))
                 .model.named_parameters())
    frozen = {"layer1_depth.weight", "layer2_depth.weight"}
    assert frozen < set(start)
    for n in start:
        if n in frozen:
            torch.testing.assert_close(after[n], start[n], rtol=0, atol=0, msg=n)
        else:
            assert not torch.equal(after[n], start[n]), n  # everything else trained
        assert after[n].requires_grad
    with pytest.raises(ValueError, match="frozen_depthwise must be an integer in 0..4"):
        DistillConfig(frozen_depthwise=-1)
    with pytest.raises(ValueError, match="not implemented for packed"):
        distill_many([tiny_student()], images, targets[:, None], DistillConfig(frozen_depthwise=1, **base))


def test_held_out_scoring_leaves_the_trained_model_unchanged(neurons, bank_images):
    """How often the held-out images are scored (each time with BatchNorm recalibrated) changes the
    learning curve's resolution only: scored every 2 steps or at the last step alone, the trained
    model is the same to the bit (so a config may score rarely to save CPU)."""
    images = bank_images[:160]
    targets = CompactTeacher([neurons[2]]).predict(bank_images[:220])[:, 0]
    base = dict(n_images=6 * 32, batch_size=32, lr=1e-3, seed=5, bn_recalibrate_images=64, log_every_steps=3)
    runs = [distill(tiny_student(), images, targets[:160], DistillConfig(eval_every_images=every, **base),
                    eval_images=bank_images[160:220], eval_targets=targets[160:])
            for every in (2 * 32, 10 ** 6)]
    assert [len([h for h in r.history if "eval_r2" in h]) for r in runs] == [3, 1]
    (a, b) = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].history[-1]["eval_r2"] == runs[1].history[-1]["eval_r2"]

"""Recipes (farm.recipes), standardized targets, the shared student (farm.shared_start) and its
slices as per-neuron starts, on the simulated population."""

import copy

import numpy as np
import pytest
import torch

from farm.compress import CompressConfig, compress_neuron
from farm.data.images import natural_like
from farm.data.simulate import SimulationConfig, simulate_population
from farm.distill import DistillConfig, distill, predict, squared_pearson
from farm.teacher_responses import split_heldout
from farm.models.compact import CompactSpec, build_compact, output_slice, rescale_outputs_
from farm.recipes import RECIPES, compress_section, merge, resolve_recipe
from farm.shared_start import SharedStartConfig, distill_shared, load_shared_start

SIZE = 16


@pytest.fixture(scope="module")
def sim():
    """6 ground-truth neurons (3-4 filters per layer) and 4,000 natural-like images labelled with
    their true rates, 500 held out."""
    pop = simulate_population(SimulationConfig(n_neurons=6, n_sessions=1, n_images=200, image_size=SIZE,
                                               filters=(3, 4), seed=1))
    images = natural_like(SIZE, 4000, np.random.default_rng(2))
    rates = pop.ground_truth.predict(images).astype(np.float32)
    mirrored = pop.ground_truth.predict(np.ascontiguousarray(images[:, :, ::-1])).astype(np.float32)
    train, held = split_heldout(len(images), 500, seed=0)
    return {"ids": list(pop.neuron_ids), "x": images[train], "y": rates[train], "hx": images[held],
            "hy": rates[held], "ym": mirrored[train], "hym": mirrored[held]}


def test_resolve_recipe_fills_what_the_job_leaves_out():
    job = {"recipe": "fast", "student_filters": [8] * 5, "distill": {"passes": 2}}
    out = resolve_recipe(job)
    assert out["distill"] == {**RECIPES["fast"]["distill"], "passes": 2}
    assert out["student_filters"] == [8] * 5 and out["recipe"] == "fast"
    job_wins = resolve_recipe({"recipe": "fast", "distill": {"lr": 1e-5}})
    assert job_wins["distill"]["lr"] == 1e-5 and job_wins["distill"]["lr_schedule"] == "cosine"
    assert resolve_recipe({"distill": {"lr": 1.0}}) == {"distill": {"lr": 1.0}}  # no recipe: unchanged
    with pytest.raises(ValueError, match="compress.recipe: 'fastest' is not a recipe"):
        resolve_recipe({"recipe": "fastest"})
    cfg = CompressConfig.from_dict({"recipe": "paper"})
    assert (cfg.distill.lr, cfg.distill.lr_schedule, cfg.recipe, cfg.shared) == (1e-4, "constant", "paper", None)
    shared = CompressConfig.from_dict({"recipe": "shared", "shared": {"early_filters": 5}})
    assert shared.shared.early_filters == 5 and shared.shared.distill.lr_schedule == "cosine"
    assert CompressConfig.from_dict(shared.to_dict()) == shared
    spec = CompressConfig.from_dict({"recipe": "shared", "specialize": {"late_filters": [32, 8], "passes": 30}})
    assert spec.specialize.late_filters == (32, 8) and CompressConfig.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="specialize needs a shared student"):
        CompressConfig.from_dict({"specialize": {"late_filters": [4, 2]}})
    with pytest.raises(ValueError, match=r"compress.specialize: unknown key\(s\) \[.late.\]"):
        CompressConfig.from_dict({"recipe": "shared", "specialize": {"late": [4, 2]}})
    # benchmarks: the recipe over a job's section, then --set overrides
    sec = compress_section({"recipe": "paper", "student_filters": [6] * 5}, "fast", ["retrain.passes=2"])
    assert sec["retrain"]["passes"] == 2 and sec["distill"]["lr"] == 3e-3 and sec["student_filters"] == [6] * 5
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_rescale_outputs_is_exact_for_both_readouts():
    torch.manual_seed(0)
    x = torch.randn(4, 3, SIZE, SIZE)
    for spec in (CompactSpec(filters=(4,) * 5, image_size=SIZE),
                 CompactSpec(filters=(4,) * 5, image_size=SIZE, readout="factorized", n_outputs=3)):
        m = build_compact(spec, seed=0).eval()
        before = m(x).detach().double()
        mu, sd = np.arange(spec.n_outputs) + 1.5, np.arange(spec.n_outputs) + 0.5
        rescale_outputs_(m, mu, sd)
        np.testing.assert_allclose(m(x).detach().double().numpy(), (before * torch.tensor(sd) + torch.tensor(mu)).numpy(),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one mean and SD per output"):
        rescale_outputs_(m, [0.0], [1.0])


def test_standardized_targets_train_in_teacher_units(sim):
    """With standardize_targets, a teacher whose outputs are x100 + 50 trains the very same network
    (its z-scores are the same) and the model outputs that teacher's units; without it, the same
    learning rate on the raw x100 targets does not even reach their scale."""
    cfg = DistillConfig(n_images=3200, batch_size=32, lr=3e-3, lr_schedule="cosine", standardize_targets=True,
                        bn_recalibrate_images=256)
    student = lambda: build_compact(CompactSpec(filters=(6,) * 5, image_size=SIZE), seed=0)  # noqa: E731
    y = sim["y"][:, 0]
    unit = predict(distill(student(), sim["x"], y, cfg).model, sim["hx"])
    scaled = predict(distill(student(), sim["x"], y * 100 + 50, cfg).model, sim["hx"])
    np.testing.assert_allclose(scaled, unit * 100 + 50, rtol=2e-3, atol=0.5)
    t = sim["hy"][:, 0] * 100 + 50
    assert abs(scaled.mean() - t.mean()) < 0.25 * t.std() and 0.5 < scaled.std() / t.std() < 1.5
    raw_cfg = DistillConfig(**{**cfg.to_dict(), "standardize_targets": False})
    raw = predict(distill(student(), sim["x"], y * 100 + 50, raw_cfg).model, sim["hx"])
    mse = lambda p: float(np.mean((p - t) ** 2))  # noqa: E731
    assert mse(raw) > 4 * mse(scaled)  # Adam's steps of ~lr cannot reach outputs of ~700 in 100 steps


def test_shared_student_slices_are_each_neurons_output(sim, tmp_path):
    cfg = SharedStartConfig(early_filters=6, late_filters=6,
                            distill=DistillConfig(n_images=6400, batch_size=32, lr=3e-3, lr_schedule="cosine",
                                                  bn_recalibrate_images=256))
    res = distill_shared(sim["ids"], sim["x"], sim["y"], cfg, seed=0, eval_images=sim["hx"], eval_targets=sim["hy"])
    shared = res.model
    assert shared.spec.filters == (6, 6, 6, 6, 6) and shared.spec.neuron_ids == tuple(sim["ids"])
    out = predict(shared, sim["hx"])  # (M, 6), in the teacher's units
    r2 = [squared_pearson(out[:, j], sim["hy"][:, j]) for j in range(6)]
    assert np.median(r2) > 0.3 and np.allclose(r2, res.history[-1]["eval_r2"], atol=1e-4)
    assert abs(out.mean() - sim["hy"].mean()) < 0.3 * sim["hy"].std()
    for j in (0, 5):
        s = output_slice(shared, sim["ids"][j])
        np.testing.assert_allclose(predict(s, sim["hx"]), out[:, j], rtol=1e-4, atol=1e-4)
    # a saved shared model is a valid start; one that lacks the job's neurons is refused
    from farm.models.compact import save_compact

    save_compact(shared, tmp_path / "shared")
    assert load_shared_start(tmp_path / "shared", sim["ids"][:2]).spec.n_outputs == 6
    with pytest.raises(ValueError, match="not a shared model of this job's neurons"):
        load_shared_start(tmp_path / "shared", ["other:0"])


def test_fast_recipe_ends_closer_to_the_teacher_than_the_paper_recipe_at_equal_images(sim):
    """The claim behind the default (benchmarks/README.md "Recipes at equal compute"), at test
    scale: same student, same number of images seen (the paper recipe's single retrain gets the
    images of the fast recipe's 5 short retrains), same pruning rule; only the recipe differs."""
    n_short = len(sim["x"]) // 5  # iterative_retrain_passes 0.2

    def run(recipe, j):
        retrain = 1600 + (5 * n_short if recipe == "paper" else 0)
        section = compress_section({"student_filters": [6] * 5, "output_units": "spikes/100ms",
                                    "distill": {"n_images": 4800, "batch_size": 32, "bn_recalibrate_images": 256},
                                    "retrain": {"n_images": retrain, "batch_size": 32, "bn_recalibrate_images": 256}},
                                   recipe, ["iterative_retrain_passes=0.2"])
        cfg = CompressConfig.from_dict(section)
        return compress_neuron(sim["ids"][j], sim["x"], sim["y"][:, j], sim["hx"], sim["hy"][:, j], cfg)

    paper = [run("paper", j).r2_teacher_heldout for j in range(3)]
    fast = [run("fast", j).r2_teacher_heldout for j in range(3)]
    assert np.median(fast) > np.median(paper) + 0.05, (paper, fast)


def test_retraining_a_trained_model_on_standardized_targets_continues_from_its_function(sim):
    """A retrain (trained=True) starts in the z-scored units the model is rescaled from, so a short
    retrain keeps the fit; started on the wrong scale the first steps wreck it (measured before the
    fix: R² 0.55 -> 0.06 after one short retrain, at test scale)."""
    y = sim["y"][:, 0] * 100 + 50
    t = sim["hy"][:, 0] * 100 + 50
    cfg = DistillConfig(n_images=4800, batch_size=32, lr=3e-3, lr_schedule="cosine", standardize_targets=True,
                        bn_recalibrate_images=256)
    model = distill(build_compact(CompactSpec(filters=(6,) * 5, image_size=SIZE), seed=0), sim["x"], y, cfg).model
    before = squared_pearson(predict(model, sim["hx"]), t)
    short = DistillConfig(**{**cfg.to_dict(), "n_images": 640, "lr": 1e-3, "seed": 1})
    import copy

    kept = squared_pearson(predict(distill(copy.deepcopy(model), sim["x"], y, short, trained=True).model, sim["hx"]), t)
    wrecked = squared_pearson(predict(distill(copy.deepcopy(model), sim["x"], y, short).model, sim["hx"]), t)
    assert kept > before - 0.1 and kept > wrecked + 0.2, (before, kept, wrecked)


def test_a_shared_student_can_start_from_another_models_early_filters_frozen(sim, tmp_path):
    """init_from + early_lr_scale 0: layers 0-2 (and layer 3's depthwise kernels) stay the source
    model's exactly, the narrower late layers and readout are trained; a mismatched width is refused."""
    from farm.models.compact import save_compact

    fast = DistillConfig(n_images=1600, batch_size=32, lr=3e-3, lr_schedule="cosine", bn_recalibrate_images=256)
    source = distill_shared(sim["ids"], sim["x"], sim["y"],
                            SharedStartConfig(early_filters=5, late_filters=8, distill=fast), seed=0).model
    save_compact(source, tmp_path / "src")
    cfg = SharedStartConfig(early_filters=5, late_filters=4, distill=DistillConfig(**{**fast.to_dict(), "n_images": 4800}),
                            init_from=str(tmp_path / "src"), early_lr_scale=0.0)
    res = distill_shared(sim["ids"], sim["x"], sim["y"], cfg, seed=1, eval_images=sim["hx"], eval_targets=sim["hy"])
    new, old = res.model.state_dict(), source.state_dict()
    for key in old:
        if key.split(".")[0] in ("layer0_conv", "layer1_depth", "layer1_point", "layer2_depth", "layer2_point",
                                 "layer3_depth") or key.split(".")[0] in ("layer0_bn", "layer1_bn", "layer2_bn") \
                and not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(new[key], old[key]), key
    assert res.model.spec.filters == (5, 5, 5, 4, 4) and all(p.requires_grad for p in res.model.parameters())
    assert np.median(res.history[-1]["eval_r2"]) > 0.1
    with pytest.raises(ValueError, match="early widths"):
        distill_shared(sim["ids"], sim["x"], sim["y"], SharedStartConfig(early_filters=6, late_filters=4, distill=fast,
                                                                         init_from=str(tmp_path / "src")))


@pytest.fixture(scope="module")
def shared6(sim):
    """A shared student (6 early, 8 late filters) of the simulated neurons."""
    fast = DistillConfig(n_images=6400, batch_size=32, lr=3e-3, lr_schedule="cosine", bn_recalibrate_images=256)
    return distill_shared(sim["ids"], sim["x"], sim["y"], SharedStartConfig(early_filters=6, late_filters=8,
                                                                           distill=fast), seed=0).model


def test_specialize_fits_narrow_late_layers_to_one_neurons_map_of_a_shared_student(sim, shared6):
    """farm.specialize: the neuron's own narrow layers 3-4, fitted to its 8x8 feature map (per-pixel
    targets), compose with the shared readout into a dense model that computes what the shared
    model computes for that neuron, in its units."""
    from farm.specialize import SpecializeConfig, specialize

    shared = shared6
    nid = sim["ids"][4]
    model, info = specialize(shared, nid, sim["x"], SpecializeConfig(late_filters=(6, 3), passes=10))
    assert model.spec.filters == (6, 6, 6, 6, 3) and model.spec.readout == "dense" and model.spec.neuron_ids == (nid,)
    assert torch.equal(model.layer1_depth.weight, shared.layer1_depth.weight)
    want = predict(shared, sim["hx"])[:, 4]
    got = predict(model, sim["hx"])
    assert info["map_r2"] > 0.7 and squared_pearson(want, got) > 0.7, (info, squared_pearson(want, got))
    assert abs(got.mean() - want.mean()) < 0.3 * want.std() and 0.6 < got.std() / want.std() < 1.4
    with pytest.raises(ValueError, match="needs a shared"):
        specialize(output_slice(shared, nid), nid, sim["x"])
    with pytest.raises(ValueError, match="needs a shared.*as target"):
        specialize(shared, nid, sim["x"], target=output_slice(shared, nid))
    # the target's map, given explicitly, is the default target; mirrored images add training images
    from farm.specialize import neuron_map

    cfg = SpecializeConfig(late_filters=(6, 3), passes=5)
    a = specialize(shared, nid, sim["x"], cfg)[0]
    b = specialize(shared, nid, sim["x"], cfg, target=shared, target_map=neuron_map(shared, 4, sim["x"]))[0]
    assert np.allclose(predict(a, sim["hx"]), predict(b, sim["hx"]), atol=1e-4)
    flipped, finfo = specialize(shared, nid, sim["x"], SpecializeConfig(late_filters=(6, 3), passes=5, flip=True))
    assert finfo["map_r2"] > 0.7 and squared_pearson(want, predict(flipped, sim["hx"])) > 0.7
    with pytest.raises(ValueError, match="flip"):
        SpecializeConfig(flip="yes")
    from farm.specialize import neuron_start

    assert neuron_start(shared, nid, sim["x"]).spec.filters == (6, 6, 6, 8, 8)  # no config: the slice


def test_tune_mirrors_fits_the_teachers_responses_to_the_mirrors_too(sim, shared6):
    """``tune_mirrors``: the tune step also fits the teacher's responses to the images' mirrors (on the
    mirrored activations ``flip`` computes anyway), so the start predicts mirrored held-out images
    better than a tune on the images alone; without the mirrors' responses it is refused by name."""
    from farm.specialize import SpecializeConfig, specialize

    nid, col = sim["ids"][1], 1
    x, y, ym = sim["x"][:800], sim["y"][:800, col], sim["ym"][:800, col]
    hxm = np.ascontiguousarray(sim["hx"][:, :, ::-1])
    base = dict(late_filters=(6, 3), passes=3, flip=True, readout="factorized", tune_passes=4)
    plain, pinfo = specialize(shared6, nid, x, SpecializeConfig(**base), targets=y)
    both, binfo = specialize(shared6, nid, x, SpecializeConfig(**base, tune_mirrors=True), targets=y, mirror_targets=ym)
    r2 = {name: squared_pearson(sim["hym"][:, col], predict(m, hxm)) for name, m in (("plain", plain), ("both", both))}
    assert r2["both"] > r2["plain"] + 0.02, (r2, pinfo, binfo)
    assert squared_pearson(sim["hy"][:, col], predict(both, sim["hx"])) > 0.6  # still fits the images themselves
    with pytest.raises(ValueError, match="tune_mirrors needs the teacher's responses to the images' mirrors"):
        specialize(shared6, nid, x, SpecializeConfig(**base, tune_mirrors=True), targets=y)
    with pytest.raises(ValueError, match="mirror_targets must be 800 finite responses"):
        specialize(shared6, nid, x, SpecializeConfig(**base, tune_mirrors=True), targets=y, mirror_targets=ym[:10])
    with pytest.raises(ValueError, match="tune_mirrors needs flip: true"):
        SpecializeConfig(late_filters=(6, 3), tune_passes=1, tune_mirrors=True)
    cfg = CompressConfig.from_dict({"recipe": "shared", "specialize": {**base, "tune_mirrors": True}})
    assert cfg.uses_mirrors and not CompressConfig.from_dict({"recipe": "shared", "specialize": base}).uses_mirrors


def test_mirrored_activations_are_those_of_the_mirrored_images(sim, shared6):
    """The specialization's layer-2 activations with ``flip``, written batch by batch into one
    channels-last tensor (no concatenated copy of the images or of the activations), equal the
    activations of the images followed by those of their mirrors, and so do the maps."""
    from farm.specialize import _early, neuron_map

    x = sim["x"][:50]  # not a multiple of the batch: the last batch of each half is short
    mirrored = np.ascontiguousarray(x[:, :, ::-1])
    a2 = _early(shared6, x, batch_size=16, flip=True)
    assert a2.shape[0] == 100 and a2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a2, torch.cat([_early(shared6, x, batch_size=16),
                                          _early(shared6, mirrored, batch_size=16)]), rtol=0, atol=0)
    maps = neuron_map(shared6, 2, x, batch_size=16, flip=True)
    torch.testing.assert_close(maps, torch.cat([neuron_map(shared6, 2, x, batch_size=16),
                                          neuron_map(shared6, 2, mirrored, batch_size=16)]), rtol=0, atol=0)


def test_early_features_computed_once_in_a_file_give_the_same_specialization(sim, shared6, tmp_path):
    """farm.shared_features: the shared student's layer-2 activations of the images and their mirrors,
    written once to a .npy file and memory-mapped, are what specialize computes itself, and a
    specialization from them is the same model; a file of the wrong shape is refused by name."""
    from farm.shared_features import early_key, load_early_features, save_early_features
    from farm.specialize import SpecializeConfig, _early, specialize

    x = sim["x"][:600]
    path = tmp_path / "feat" / "early.npy"
    info = save_early_features(shared6, x, path, flip=True)
    r = shared6.spatial.shape[-1]
    assert info["shape"] == [1200, r, r, 6] and path.is_file() and list(path.parent.iterdir()) == [path]
    a2 = load_early_features(path, 600, True, shared6)
    own = _early(shared6, x, flip=True)
    assert a2.shape == own.shape == (1200, 6, r, r) and torch.equal(a2, own)
    assert a2.is_contiguous(memory_format=torch.channels_last)
    cfg = SpecializeConfig(late_filters=(6, 3), passes=2, flip=True, readout="factorized", tune_passes=1)
    nid = sim["ids"][2]
    a, ainfo = specialize(shared6, nid, x, cfg, targets=sim["y"][:600, 2])
    b, binfo = specialize(shared6, nid, x, cfg, targets=sim["y"][:600, 2], early=a2)
    assert np.allclose(predict(a, sim["hx"]), predict(b, sim["hx"]), atol=1e-5)
    assert binfo["early_s"] < ainfo["early_s"]
    with pytest.raises(ValueError, match="early activations"):
        specialize(shared6, nid, x[:300], cfg, targets=sim["y"][:300, 2], early=a2)
    with pytest.raises(ValueError, match=rf"early\.npy: early features of shape \(1200, {r}, {r}, 6\)"):
        load_early_features(path, 600, False, shared6)
    with pytest.raises(ValueError, match="not a readable"):
        load_early_features(tmp_path / "missing.npy", 600, True, shared6)
    # the cache key follows the weights, the images and the mirroring
    key = early_key(shared6, x, True)
    assert key == early_key(shared6, x.copy(), True) != early_key(shared6, x, False)
    assert key != early_key(shared6, x[::-1].copy(), True)


def test_neuron_maps_computed_once_for_all_neurons_give_the_same_specialization(sim, shared6, tmp_path):
    """farm.shared_features.save_neuron_maps: the shared student's map of each neuron, layers 3-4 run
    once for all of them, is to the bit the map a specialization computes for its neuron alone, and a
    specialization from the memory-mapped file is the same model; a file of the wrong shape is
    refused by name, and the cache key follows layers 3-4 and the activations."""
    from farm.shared_features import early_key, load_neuron_map, maps_key, save_neuron_maps
    from farm.specialize import SpecializeConfig, _early, _late_map, specialize

    x = sim["x"][:300]
    a2 = _early(shared6, x, flip=True)
    ids = [sim["ids"][2], sim["ids"][0]]
    paths = [tmp_path / "maps" / "a.npy", tmp_path / "maps" / "b.npy"]
    info = save_neuron_maps(shared6, a2, ids, paths, batch_size=64)  # batches that do not divide 600
    r = shared6.spatial.shape[-1]
    assert info["shape"] == [600, r, r] and info["n_neurons"] == 2
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["a.npy", "b.npy"]  # no temp files left
    for nid, path in zip(ids, paths):
        own = _late_map(shared6, shared6.spec.neuron_ids.index(nid), a2, batch_size=64)
        assert torch.equal(load_neuron_map(path, 600, shared6), own)
    assert not torch.equal(load_neuron_map(paths[0], 600, shared6), load_neuron_map(paths[1], 600, shared6))
    cfg = SpecializeConfig(late_filters=(6, 3), passes=1, flip=True, readout="factorized", tune_passes=1)
    a, _ = specialize(shared6, ids[0], x, cfg, targets=sim["y"][:300, 2], early=a2)
    b, binfo = specialize(shared6, ids[0], x, cfg, targets=sim["y"][:300, 2], early=a2,
                          target_map=load_neuron_map(paths[0], 600, shared6))
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    # the images' maps alone: the mirrors' are computed here (from the images), the same model again
    c, _ = specialize(shared6, ids[0], x, cfg, targets=sim["y"][:300, 2], early=a2,
                      target_map=load_neuron_map(paths[0], 600, shared6)[:300])
    assert np.allclose(predict(a, sim["hx"]), predict(c, sim["hx"]), atol=1e-5)
    with pytest.raises(ValueError, match=r"target map \(600, .*\) != \(300,"):  # maps of other images
        specialize(shared6, ids[0], x[:150], cfg, targets=sim["y"][:150, 2], early=a2[:300],
                   target_map=load_neuron_map(paths[0], 600, shared6))
    with pytest.raises(ValueError, match=rf"a\.npy: a neuron map of shape \(600, {r}, {r}\)"):
        load_neuron_map(paths[0], 300, shared6)
    with pytest.raises(ValueError, match="not a readable"):
        load_neuron_map(tmp_path / "missing.npy", 600, shared6)
    with pytest.raises(ValueError, match="outputs"):
        save_neuron_maps(shared6, a2, ["nope:0"], [tmp_path / "c.npy"])
    assert not (tmp_path / "c.npy").exists()
    key = early_key(shared6, x, True)
    other = copy.deepcopy(shared6)
    with torch.no_grad():
        other.layer3_bn.weight.mul_(2)
    assert maps_key(shared6, key) == maps_key(copy.deepcopy(shared6), key) != maps_key(other, key)
    assert maps_key(shared6, key) != maps_key(shared6, early_key(shared6, x, False))


def test_specialize_keeps_the_factorized_readout_and_tunes_to_the_teachers_responses(sim, shared6):
    """``readout: factorized`` fits as well as the dense readout with K4-fold fewer readout weights; ``tune_passes`` then fits the late layers and readout to the teacher's scalar
    responses (here the true rates, which the shared student only approximates) and gets closer to
    them on held-out images; its start in a compress run keeps the factorized form."""
    from farm.specialize import SpecializeConfig, specialize

    nid, col = sim["ids"][4], 4
    base = dict(late_filters=(6, 3), passes=5)
    dense = specialize(shared6, nid, sim["x"], SpecializeConfig(**base))[0]
    fact, info = specialize(shared6, nid, sim["x"], SpecializeConfig(**base, readout="factorized"))
    assert fact.spec.readout == "factorized" and fact.spec.n_outputs == 1 and fact.spec.neuron_ids == (nid,)
    assert fact.spec.param_count() < dense.spec.param_count()
    want = predict(shared6, sim["hx"])[:, col]  # the map fit reproduces the shared output in either form
    r2_dense, r2_fact = (squared_pearson(want, predict(m, sim["hx"])) for m in (dense, fact))
    assert r2_fact > 0.7 and abs(r2_fact - r2_dense) < 0.05, (r2_fact, r2_dense, info)
    tuned, tinfo = specialize(shared6, nid, sim["x"], SpecializeConfig(**base, readout="factorized", tune_passes=3),
                              targets=sim["y"][:, col])
    before, after = (squared_pearson(sim["hy"][:, col], predict(m, sim["hx"])) for m in (fact, tuned))
    assert after > before + 0.01 and tinfo["tune_train_r2"] > after - 0.1, (before, after, tinfo)
    got = predict(tuned, sim["hx"])  # in the teacher's units
    assert abs(got.mean() - sim["hy"][:, col].mean()) < 0.2 * sim["hy"][:, col].std()
    with pytest.raises(ValueError, match="tune_passes needs the teacher's responses"):
        specialize(shared6, nid, sim["x"], SpecializeConfig(**base, tune_passes=1))
    with pytest.raises(ValueError, match="readout must be 'dense' or 'factorized'"):
        SpecializeConfig(readout="low-rank")
    with pytest.raises(ValueError, match="tune_passes >= 0"):
        SpecializeConfig(tune_passes=-1)
    with pytest.raises(ValueError, match="targets must be"):
        specialize(shared6, nid, sim["x"], SpecializeConfig(**base, tune_passes=1), targets=sim["y"][:10, col])
    cfg = CompressConfig.from_dict({"recipe": "shared", "specialize": {**base, "readout": "factorized"},
                                    "prune": {"tau": 0.9}, "retrain": {"n_images": 500}})
    res = compress_neuron(nid, sim["x"], sim["y"][:, col], sim["hx"], sim["hy"][:, col], cfg, distilled=fact)
    assert res.spec["readout"] == "factorized" and res.param_count <= fact.spec.param_count()
    assert res.r2_teacher_heldout > 0.5


def test_late_map_from_early_activations_is_the_neurons_map(sim, shared6):
    """The target map from layer-2 activations already computed (``_late_map``, written batch by
    batch into one tensor) equals ``neuron_map`` from the images, a last short batch included."""
    from farm.specialize import _early, _late_map, neuron_map

    x = sim["x"][:50]
    got = _late_map(shared6, 3, _early(shared6, x, batch_size=16), batch_size=16)
    assert got.shape == (50, *shared6.spatial.shape[1:]) and got.dtype == torch.float32
    torch.testing.assert_close(got, neuron_map(shared6, 3, x, batch_size=16), rtol=1e-5, atol=1e-6)

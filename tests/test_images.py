"""Images: recentering, resize, gaudy, synthetic stimuli, augmentation and the image bank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from farm.data.images import RGB_MEANS, BankConfig, ImageBank, augment, build_bank, dots, gaudy, gaussian_filter, gratings, natural_like, pink_noise, resize, white_noise
from farm.models.input import recenter, uncenter


@pytest.fixture(scope="module")
def sources() -> np.ndarray:
    """Natural-like source images of a size different from the bank's (bank: 24 px)."""
    return natural_like(40, 12, np.random.default_rng(123))


# -- basics -------------------------------------------------------------------------------------

def test_recenter_then_uncenter_is_identity_and_subtracts_rgb_means():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 9, 3), dtype=np.uint8)
    x = recenter(images)
    assert x.shape == (3, 3, 8, 9) and x.dtype == torch.float32
    np.testing.assert_allclose(x[1, :, 2, 4].numpy(), images[1, 2, 4].astype(np.float32) - RGB_MEANS, rtol=1e-6)
    np.testing.assert_array_equal(uncenter(x), images)


def test_resize_matches_pil_bicubic_and_keeps_uint8():
    from PIL import Image

    images = natural_like(32, 3, np.random.default_rng(1))
    out = resize(images, 20)
    assert out.shape == (3, 20, 20, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(images[2]).resize((20, 20), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out[2], expected)
    assert resize(images, (16, 24)).shape == (3, 16, 24, 3)


def test_gaussian_filter_matches_method_kernel_for_sigma_half():
    # method.md §4: σ = 0.5, truncate 4 -> 1-D weights [0.000264, 0.106451, 0.786571, 0.106451, 0.000264]
    x = np.zeros((1, 9), dtype=np.float64)
    x[0, 4] = 1.0
    y = gaussian_filter(x, 0.5, axes=(1,))
    np.testing.assert_allclose(y[0, 2:7], [0.000264, 0.106451, 0.786571, 0.106451, 0.000264], atol=1e-6)
    assert y.sum() == pytest.approx(1.0)


def test_gaudy_gives_only_0_and_255_split_at_each_channel_mean():
    images = natural_like(24, 4, np.random.default_rng(2))
    g = gaudy(images)
    assert g.dtype == np.uint8 and g.shape == images.shape
    assert set(np.unique(g)) <= {0, 255}
    means = images.astype(np.float64).mean(axis=(1, 2), keepdims=True)
    np.testing.assert_array_equal(g == 255, images >= means)
    # smoothing first changes the result but not the value set
    smoothed = gaudy(images, sigma=2.0)
    assert set(np.unique(smoothed)) <= {0, 255} and not np.array_equal(smoothed, g)


def test_dots_are_drawn_at_the_given_location_size_and_colour():
    imgs = dots(32, centers=[(10, 20), [(5, 5), (25, 8)], np.zeros((0, 2))],
                radii=[3.0, [2.0, 4.0], 1.0],
                colors=[(255, 0, 0), [(0, 255, 0), (0, 0, 255)], (9, 9, 9)],
                background=(100, 100, 100))
    assert imgs.shape == (3, 32, 32, 3) and imgs.dtype == np.uint8
    rows, cols = np.mgrid[0:32, 0:32]
    inside = (rows - 10) ** 2 + (cols - 20) ** 2 <= 9
    assert np.all(imgs[0][inside] == (255, 0, 0)) and np.all(imgs[0][~inside] == 100)
    assert inside.sum() == 29  # a radius-3 disc of pixel centres
    assert tuple(imgs[1, 5, 5]) == (0, 255, 0) and tuple(imgs[1, 5, 8]) == (100, 100, 100)
    assert tuple(imgs[1, 25, 12]) == (0, 0, 255) and tuple(imgs[1, 25, 13]) == (100, 100, 100)
    assert np.all(imgs[2] == 100)  # an image without dots is background
    # one colour and radius for all; the default background is the mean grey (zero input)
    single = dots(16, centers=np.array([[8.0, 8.0]]), radii=2, colors=(0, 0, 0))
    assert single[0, 8, 8].tolist() == [0, 0, 0]
    assert np.abs(recenter(single)[0, :, 0, 0].numpy()).max() < 0.5
    with pytest.raises(ValueError, match="radii"):
        dots(16, centers=[(1, 1), (2, 2)], radii=[1.0])


@pytest.mark.parametrize("make", [gratings, pink_noise, white_noise, natural_like])
def test_synthetic_stimuli_are_uint8_deterministic_and_varied(make):
    a = make(20, 5, np.random.default_rng(7))
    b = make(20, 5, np.random.default_rng(7))
    c = make(20, 5, np.random.default_rng(8))
    assert a.shape == (5, 20, 20, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.reshape(5, -1).std(axis=1).min() > 5  # every image has contrast


def test_gratings_follow_the_requested_orientation_and_frequency():
    img = gratings(32, 1, np.random.default_rng(0), orientations=0.0, frequencies=4.0, phases=0.0,
                   colors=np.array([[[255, 255, 255], [0, 0, 0]]]))[0, :, :, 0].astype(float)
    assert np.all(img == img[0])  # orientation 0: constant down each column
    spectrum = np.abs(np.fft.rfft(img[0] - img[0].mean()))
    assert int(np.argmax(spectrum)) == 4  # 4 cycles per image


def test_pink_noise_has_a_falling_spectrum_and_white_noise_a_flat_one():
    def slope(images):
        f = np.abs(np.fft.fft2(images[..., 0].astype(float) - images[..., 0].mean(axis=(1, 2), keepdims=True)))
        power = (f ** 2).mean(axis=0)
        freqs = np.fft.fftfreq(images.shape[1])
        radius = np.hypot(freqs[:, None], freqs[None, :])
        low = power[(radius > 0.02) & (radius < 0.1)].mean()
        high = power[(radius > 0.3) & (radius < 0.45)].mean()
        return low / high

    rng = np.random.default_rng(3)
    assert slope(pink_noise(64, 8, rng)) > 10
    assert slope(white_noise(64, 8, rng)) < 2


def test_augment_is_deterministic_for_the_rng_and_changes_images():
    images = natural_like(32, 6, np.random.default_rng(4))
    a = augment(images, np.random.default_rng(5))
    b = augment(images, np.random.default_rng(5))
    c = augment(images, np.random.default_rng(6))
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, images)
    assert augment(images, np.random.default_rng(5), size=20).shape == (6, 20, 20, 3)


def test_augment_without_crop_or_jitter_flips_exactly():
    images = natural_like(16, 8, np.random.default_rng(9))
    out = augment(images, np.random.default_rng(0), crop_scale=(1.0, 1.0), flip=True, jitter=0.0)
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
    same = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


# -- image bank ---------------------------------------------------------------------------------

def _config(**kw) -> BankConfig:
    d = dict(n_images=50, image_size=24, proportions={"natural": 0.5, "gaudy": 0.2, "synthetic": 0.3},
             seed=11, shard_size=20)
    d.update(kw)
    return BankConfig(**d)


def test_bank_is_deterministic_byte_for_byte(tmp_path, sources):
    a = build_bank(sources, _config(), tmp_path / "a")
    b = build_bank([sources[:5], sources[5:]], _config(), tmp_path / "b")  # same images, split
    assert a.bank_id == b.bank_id
    for shard in a.shards:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()
    other_seed = build_bank(sources, _config(seed=12), tmp_path / "c")
    other_sources = build_bank(sources[::-1].copy(), _config(), tmp_path / "d")
    assert len({a.bank_id, other_seed.bank_id, other_sources.bank_id}) == 3
    assert not np.array_equal(a.load_all()[1], other_seed.load_all()[1])


def test_bank_streams_shard_by_shard_with_the_configured_proportions(tmp_path, sources):
    seen = []
    bank = build_bank(sources, _config(), tmp_path / "bank", progress=lambda done, total: seen.append((done, total)))
    assert len(bank) == 50 and bank.image_size == 24
    assert seen == [(20, 50), (40, 50), (50, 50)]
    shards = bank.iter_shards()
    assert iter(shards) is shards  # a generator: shards are read one at a time
    sizes, all_ids, all_kinds = [], [], []
    for ids, images, kinds in shards:
        assert images.shape == (len(ids), 24, 24, 3) and images.dtype == np.uint8 and ids.dtype == np.int64
        sizes.append(len(ids))
        all_ids.append(ids)
        all_kinds.append(kinds)
    assert sizes == [20, 20, 10]
    np.testing.assert_array_equal(np.concatenate(all_ids), np.arange(50))
    kinds = np.concatenate(all_kinds)
    counts = {k: int((kinds == k).sum()) for k in ("natural", "gaudy", "synthetic")}
    assert counts == {"natural": 25, "gaudy": 10, "synthetic": 15}
    np.testing.assert_array_equal(bank.kinds(), kinds)
    _, images, _ = bank.load_all()
    gaudy_images = images[kinds == "gaudy"]
    assert set(np.unique(gaudy_images)) <= {0, 255}
    assert len(np.unique(images[kinds == "natural"])) > 100


def test_bank_random_access_equals_streamed_images(tmp_path, sources):
    bank = build_bank(sources, _config(n_images=45, shard_size=30), tmp_path / "bank")
    ids, images, _ = bank.load_all()
    pick = np.array([44, 0, 31, 29, 29, 7])
    np.testing.assert_array_equal(bank.read(pick), images[pick])
    assert bank.read([]).shape == (0, 24, 24, 3)
    with pytest.raises(IndexError, match="0..44"):
        bank.read([45])


def test_bank_reopens_resumes_and_refuses_a_different_bank(tmp_path, sources):
    out = tmp_path / "bank"
    first = build_bank(sources, _config(), out)
    shard0 = out / first.shards[0]["file"]
    mtime = shard0.stat().st_mtime_ns
    (out / "bank.json").unlink()  # as if interrupted before the manifest was written
    (out / first.shards[2]["file"]).unlink()
    again = build_bank(sources, _config(), out)
    assert again.bank_id == first.bank_id and shard0.stat().st_mtime_ns == mtime  # kept, not rewritten
    again.verify()
    assert ImageBank(out).bank_id == first.bank_id
    with pytest.raises(FileExistsError, match="holds bank"):
        build_bank(sources, _config(seed=99), out)
    assert not list(out.glob("*.tmp*"))


def test_bank_errors_are_clear(tmp_path, sources):
    with pytest.raises(FileNotFoundError, match="bank.json"):
        ImageBank(tmp_path)
    (tmp_path / "bank.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        ImageBank(tmp_path)
    (tmp_path / "bank.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a farm image bank"):
        ImageBank(tmp_path)
    with pytest.raises(ValueError, match="source_images"):
        build_bank(None, _config(), tmp_path / "x")
    with pytest.raises(ValueError, match="sum to 1"):
        BankConfig(n_images=10, proportions={"natural": 0.5})
    with pytest.raises(ValueError, match="unknown kinds"):
        BankConfig(n_images=10, proportions={"photos": 1.0})


def test_bank_without_sources_uses_generated_kinds(tmp_path):
    config = BankConfig(n_images=16, image_size=16, shard_size=16, seed=1,
                        proportions={"natural_like": 0.5, "gaudy": 0.25, "dots": 0.25})
    bank = build_bank(None, config, tmp_path)
    _, images, kinds = bank.load_all()
    assert sorted(set(kinds)) == ["dots", "gaudy", "natural_like"]
    assert set(np.unique(images[kinds == "gaudy"])) <= {0, 255}


def test_shard_kind_counts_are_exact_overall_and_close_per_shard():
    config = BankConfig(n_images=10_007, image_size=8, shard_size=999,
                        proportions={"natural": 0.61, "gaudy": 0.2, "gratings": 0.13, "white_noise": 0.06})
    per_shard = config.shard_kind_counts()
    totals = {k: sum(s[k] for s in per_shard) for k in config.kind_counts()}
    assert totals == config.kind_counts() and sum(totals.values()) == 10_007
    for i, s in enumerate(per_shard):
        n = sum(s.values())
        assert n == (999 if i < len(per_shard) - 1 else 10_007 - 999 * 10)
        for k, c in s.items():
            assert abs(c - config.proportions[k] * n) <= 2


def test_a_jobs_cached_bank_serves_only_the_config_that_built_it(tmp_path):
    """A changed bank.bank.n_images on an existing out_dir reused the old bank while MLflow
    recorded the new size; now the job refuses, naming the difference and the folder to delete."""
    from farm.config import load_job_config
    from farm.pipeline import prepare_bank

    cfg = load_job_config("demo", [f"out_dir={tmp_path}", "bank.heldout=10", "bank.bank={n_images: 40, shard_size: 40, "
                                   "proportions: {synthetic: 1.0}}"])
    bank = prepare_bank(cfg, [], set(), 16)
    assert len(bank) == 40 and prepare_bank(cfg, [], set(), 16).bank_id == bank.bank_id  # cached
    bigger = load_job_config("demo", [f"out_dir={tmp_path}", "bank.heldout=10", "bank.bank={n_images: 80, shard_size: 40, "
                                      "proportions: {synthetic: 1.0}}"])
    with pytest.raises(ValueError, match=rf"built with another config \(n_images: 40 there, 80 asked\); "
                                         rf"delete {tmp_path}/bank to rebuild it"):
        prepare_bank(bigger, [], set(), 16)


def test_a_jobs_cached_bank_serves_only_the_source_images_that_built_it(tmp_path):
    """A bank built from some sessions' images is not reused for a job whose sources differ (another
    bank.source_roles, or another evaluated session excluded): that would train on the images that
    evaluate the neurons, or on images the config does not name."""
    from farm.config import load_job_config
    from farm.data.sessions import Session
    from farm.pipeline import prepare_bank

    rng = np.random.default_rng(0)

    def session(sid, role):
        return Session(session_id=sid, images=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8),
                       responses=rng.random((2, 20, 2), dtype=np.float32), image_kinds=["natural"] * 20, role=role)

    sessions = [session("a", "train"), session("b", "train"), session("c", "test")]
    cfg = load_job_config("demo", [f"out_dir={tmp_path}", "bank.heldout=10",
                                   "bank.bank={n_images: 40, shard_size: 40, proportions: {natural: 1.0}}"])
    bank = prepare_bank(cfg, sessions, {"c"}, 16)
    assert prepare_bank(cfg, sessions, {"c"}, 16).bank_id == bank.bank_id  # same sources: cached
    with pytest.raises(ValueError, match=rf"bank: the image bank cached in {tmp_path}/bank was built from other "
                                         rf"source images than this job's \(sessions \['a'\]: .*never \['b'\].*"
                                         rf"Delete {tmp_path}/bank"):
        prepare_bank(cfg, sessions, {"b"}, 16)  # b evaluates the neurons now: its images must not be in the bank
    roles = load_job_config("demo", [f"out_dir={tmp_path}", "bank.heldout=10", "bank.source_roles=[train, test]",
                                     "bank.bank={n_images: 40, shard_size: 40, proportions: {natural: 1.0}}"])
    with pytest.raises(ValueError, match=r"built from other source images .*\['a', 'b', 'c'\]"):
        prepare_bank(roles, sessions, set(), 16)

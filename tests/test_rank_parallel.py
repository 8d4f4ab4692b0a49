"""Maximizing natural images over a bank as Ray tasks equals ranking everything at once."""

import numpy as np

from farm.analysis.natural import iter_array_shards, rank_natural_images
from farm.data.images import BankConfig, build_bank
from farm.models.compact import CompactSpec, build_compact, load_compact, save_compact


def test_ray_ranking_over_models_and_chunks_equals_one_pass(tmp_path, local_ray):
    from farm.fanout import rank_bank_parallel

    bank = build_bank(None, BankConfig(n_images=300, image_size=16, proportions={"natural_like": 1.0},
                                       shard_size=100), tmp_path / "bank")
    dirs = []
    for i in range(3):
        save_compact(build_compact(CompactSpec(filters=(3,) * 5, image_size=16, neuron_ids=(f"s:{i}",)), seed=i),
                     tmp_path / f"m{i}")
        dirs.append(str(tmp_path / f"m{i}"))
    got = rank_bank_parallel(dirs, str(tmp_path / "bank"), top_k=5, models_per_task=2, images_per_task=70)
    _, images, _ = bank.load_all()
    models = [load_compact(d) for d in dirs]
    want = rank_natural_images(models, iter_array_shards(images, 1000), top_k=5)
    np.testing.assert_allclose(got.top_responses, want.top_responses, rtol=1e-5)
    assert got.top_ids.shape == (3, 5) and got.n_images == 300
    assert [list(map(int, r)) for r in got.top_ids] == [list(map(int, r)) for r in want.top_ids]

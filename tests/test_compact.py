"""CompactSpec / CompactModel: the architecture of method.md §3.1 and the counts of §3.2."""

import json

import numpy as np
import pytest
import torch

from farm.models.compact import (CompactSpec, build_compact, load_compact, narrow, output_slice,
                                 same_pad, save_compact)


def test_paper_model_shapes_and_padding():
    spec = CompactSpec()  # 100 filters per layer, 112 px: the distilled student
    m = build_compact(spec, seed=0).eval()
    x = torch.randn(2, 3, 112, 112) * 50
    acts = m.embed(x)
    assert [tuple(a.shape[1:]) for a in acts] == [(100, 112, 112), (100, 56, 56), (100, 28, 28),
                                                  (100, 28, 28), (100, 28, 28)]
    assert m(x).shape == (2, 1)
    assert spec.readout_size == 28


def test_keras_same_padding_is_asymmetric_for_stride_2():
    x = torch.ones(1, 1, 112, 112)
    padded = same_pad(x, 5, 2)
    # 112 -> 56 with a 5x5 kernel needs 3 pixels: 1 before, 2 after (Keras 'same').
    assert padded.shape[-2:] == (115, 115)
    assert padded[0, 0, 0].sum() == 0 and padded[0, 0, 1, 1] == 1
    assert padded[0, 0, -1].sum() == 0 and padded[0, 0, -2].sum() == 0 and padded[0, 0, -3, -3] == 1
    assert same_pad(x, 5, 1).shape[-2:] == (116, 116)


def test_param_and_filter_counts_match_published_190923(published_dir):
    """method.md §3.3: session 190923's published models have median 12,889 params and 168 filters."""
    files = sorted((published_dir / "compact_models" / "nums_filters").glob("compact_model_190923_*.npy"))
    assert len(files) == 33
    specs = [CompactSpec(filters=tuple(np.load(f))) for f in files]
    assert np.median([s.param_count() for s in specs]) == 12889
    assert np.median([s.filter_count() for s in specs]) == 168
    for s in specs[:3]:  # the formula equals a count of the torch model's tensors (+ Keras' none)
        m = build_compact(s)
        n = sum(p.numel() for p in m.parameters()) + sum(
            b.numel() for name, b in m.named_buffers() if "running" in name)
        assert n == s.param_count()
        assert s.trainable_param_count() == sum(p.numel() for p in m.parameters())


def test_factorized_shared_model_counts():
    # method.md §8.2: shared compact model, K_e = 200, 219 outputs: 340,534 parameters incl. BN stats.
    spec = CompactSpec(filters=(200, 200, 200, 100, 100), readout="factorized", n_outputs=219)
    assert spec.param_count() == 340534
    m = build_compact(spec, seed=0).eval()
    assert m(torch.randn(1, 3, 112, 112)).shape == (1, 219)


def test_glorot_init_is_seeded_and_keras_like():
    a = build_compact(CompactSpec(filters=(8,) * 5, image_size=32), seed=3)
    b = build_compact(CompactSpec(filters=(8,) * 5, image_size=32), seed=3)
    c = build_compact(CompactSpec(filters=(8,) * 5, image_size=32), seed=4)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.layer0_conv.weight, c.layer0_conv.weight)
    limit = np.sqrt(6 / (3 * 25 + 8 * 25))
    assert a.layer0_conv.weight.abs().max() <= limit
    assert a.layer0_conv.weight.abs().max() > 0.8 * limit
    assert torch.count_nonzero(a.layer0_conv.bias) == 0


def test_narrow_equals_zeroed_model():
    """Dropping zeroed filters (outgoing weights 0) leaves the outputs unchanged."""
    torch.manual_seed(0)
    spec = CompactSpec(filters=(6, 6, 6, 6, 6), image_size=32)
    m = build_compact(spec, seed=1)
    with torch.no_grad():  # non-trivial BN state
        for l in range(5):
            bn = m.bn(l)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    m.eval()
    keep = [[0, 2, 3, 5], [1, 2, 4], [0, 1, 5], [2, 3, 4], [0, 4, 5]]
    with torch.no_grad():
        for l in range(5):
            drop = [j for j in range(6) if j not in keep[l]]
            if l < 4:
                m.depthwise(l + 1).weight[drop] = 0
                m.pointwise(l + 1).weight[:, drop] = 0
            else:
                m.readout_maps()[:, :, drop] = 0
    x = torch.randn(4, 3, 32, 32) * 40
    small = narrow(m, keep).eval()
    assert small.spec.filters == (4, 3, 3, 3, 3)
    torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)


def test_output_slice_of_a_shared_model_computes_that_output():
    spec = CompactSpec(filters=(5, 4, 6, 3, 7), image_size=24, readout="factorized", n_outputs=4,
                       neuron_ids=("a:0", "a:1", "b:0", "b:1"))
    m = build_compact(spec, seed=5)
    with torch.no_grad():  # biases and BN state away from their init, so every term matters
        for p in (m.mixing.bias, m.spatial_bias, m.layer0_conv.bias):
            p.uniform_(-1, 1)
        for l in range(5):
            m.bn(l).running_mean.uniform_(-1, 1)
            m.bn(l).running_var.uniform_(0.5, 2)
    m.eval()
    x = torch.randn(6, 3, 24, 24) * 40
    full = m(x)
    for key, column in (("b:0", 2), (1, 1)):
        one = output_slice(m, key)
        assert one.spec.readout == "dense" and one.spec.filters == spec.filters
        assert one.spec.neuron_ids == (spec.neuron_ids[column],) and not one.training
        torch.testing.assert_close(one(x)[:, 0], full[:, column], rtol=1e-5, atol=1e-5)
    # the slice is its own model: training it leaves the shared model alone
    before = m.layer0_conv.weight.clone()
    with torch.no_grad():
        output_slice(m, 0).layer0_conv.weight.add_(1)
    assert torch.equal(m.layer0_conv.weight, before)
    with pytest.raises(ValueError, match="'c:0' is not an output"):
        output_slice(m, "c:0")
    with pytest.raises(ValueError, match="out of range"):
        output_slice(m, 4)


def test_save_load_round_trip(tmp_path):
    m = build_compact(CompactSpec(filters=(5, 4, 3, 3, 3), image_size=24, neuron_ids=("sim0:1",)), seed=2)
    save_compact(m, tmp_path / "m")
    loaded = load_compact(tmp_path / "m")
    assert loaded.spec == m.spec
    x = torch.randn(3, 3, 24, 24)
    torch.testing.assert_close(loaded(x), m.eval()(x))
    assert json.loads((tmp_path / "m" / "spec.json").read_text())["filters"] == [5, 4, 3, 3, 3]


def test_bad_specs_and_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="filters"):
        CompactSpec(filters=(3, 3, 3))
    with pytest.raises(ValueError, match="readout"):
        CompactSpec(readout="mlp")
    with pytest.raises(FileNotFoundError, match="spec.json"):
        load_compact(tmp_path)
    m = build_compact(CompactSpec(filters=(3,) * 5, image_size=16))
    save_compact(m, tmp_path / "m")
    (tmp_path / "m" / "spec.json").write_text(json.dumps({"filters": [4] * 5, "image_size": 16}))
    with pytest.raises(ValueError, match="do not match"):
        load_compact(tmp_path / "m")
    (tmp_path / "m" / "spec.json").write_text("{not json")
    with pytest.raises(ValueError, match="spec.json"):
        load_compact(tmp_path / "m")

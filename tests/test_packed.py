"""farm.models.packed: the one packed network, for training (distill_many) and for folded inference
(the simulated population's ground-truth neurons)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.models.compact import CompactSpec, build_compact
from farm.models.input import recenter
from farm.models.packed import PackedCompact

SIZE = 20


def _models(widths):
    """Trained-looking models: random weights and BN statistics (not the init's 0 / 1)."""
    out = []
    for i, k in enumerate(widths):
        m = build_compact(CompactSpec(filters=k, image_size=SIZE), seed=i)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for l in range(5):
                bn = m.bn(l)
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        out.append(m.eval())
    return out


def _images(n=6):
    return (np.random.default_rng(0).random((n, SIZE, SIZE, 3)) * 255).astype(np.uint8)


def test_folded_inference_of_models_of_different_widths_equals_each_model_alone():
    models = _models([(3, 4, 5, 6, 2), (5, 3, 3, 4, 4), (2, 2, 6, 3, 5)])
    x = recenter(_images())
    alone = torch.cat([m(x) for m in models], dim=1)
    pack = PackedCompact(models).fold_()
    torch.testing.assert_close(pack.infer(x), alone, rtol=1e-5, atol=1e-5)
    # layer by layer (what the population's calibration uses) gives the same
    a = x.contiguous(memory_format=torch.channels_last)
    for l in range(5):
        a = pack.layer_act(l, pack.layer_pre(l, a))
    torch.testing.assert_close(pack.head(a), alone, rtol=1e-5, atol=1e-5)
    # changed BN statistics count once refolded
    with torch.no_grad():
        pack.bns[2].running_var.mul_(4.0)
    pack.refresh_bn(2)
    assert not torch.allclose(pack.infer(x), alone, atol=1e-3)
    for m, back in zip(models, pack.unpack()):  # the pack's state, model by model
        assert torch.equal(back.bn(2).running_var, m.bn(2).running_var * 4.0)


def test_training_forward_equals_each_model_and_unpack_returns_them():
    models = _models([(4, 4, 4, 4, 4)] * 3)
    x = recenter(_images())
    pack = PackedCompact(models).eval()
    torch.testing.assert_close(pack(x), torch.cat([m(x) for m in models], dim=1), rtol=1e-5, atol=1e-5)
    for m, back in zip(models, pack.unpack()):
        for k, v in m.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
    # the parameters are the pack's own: training the pack leaves the source models alone
    before = models[0].layer0_conv.weight.clone()
    pack.train()(x).sum().backward()
    assert pack.point[0].grad is not None and models[0].layer0_conv.weight.grad is None
    with torch.no_grad():
        pack.w0.add_(1.0)
    assert torch.equal(models[0].layer0_conv.weight, before)
    assert torch.equal(pack.unpack()[0].layer0_conv.weight, before + 1.0)


def test_a_pack_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="at least one"):
        PackedCompact([])
    mixed = PackedCompact(_models([(3, 3, 3, 3, 3), (4, 4, 4, 4, 4)]))
    with pytest.raises(ValueError, match="one spec"):
        mixed(recenter(_images(2)))
    with pytest.raises(ValueError, match="fold_"):
        mixed.infer(recenter(_images(2)))
    with pytest.raises(ValueError, match="fold_"):  # moving a pack drops its folded tensors
        PackedCompact(_models([(3, 3, 3, 3, 3)])).fold_().double().infer(recenter(_images(2)).double())
    factorized = build_compact(CompactSpec(filters=(3,) * 5, image_size=SIZE, readout="factorized", n_outputs=2))
    with pytest.raises(ValueError, match="dense readout"):
        PackedCompact([factorized])

"""Several dense-readout CompactModels as ONE network: farm's packed network.

``PackedCompact(models)`` concatenates the models' parameters channel-wise: layer 0 is one conv
3 -> sum(K0), each depthwise conv one grouped conv over every model's channels, each pointwise conv
one set of per-model weight blocks, BN per channel over all channels, one readout map per model.
Every output depends only on its own model's slice, so the pack computes the n models in one call:
single tiny models are dominated by per-call overhead and memory passes on a CPU, and one call per
model leaves a GPU idle. It runs two ways, from the same parameters:

- **training** (``forward``; ``farm.distill.distill_many``): models of ONE spec; the pointwise
  convs are grouped convs (groups = n) and BN is torch's (train or eval mode), so with the summed
  per-neuron loss each slice gets exactly its model's gradient and Adam, smoothing and BN
  statistics act per element: training the pack is training the models one by one with the same
  batches, up to float rounding. ``unpack()`` gives the models back.
- **inference** (``fold_()``, then ``infer`` or ``layer_pre`` / ``layer_act`` / ``head``;
  ``farm.data.simulate``'s ground-truth neurons): any widths; eval-mode BN folded into the convs,
  the pointwise convs one block-diagonal 1x1 conv, Keras-'same' padding done by the conv itself,
  channels-last tensors. Equal to running the models one by one up to float rounding (~1e-6).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from farm.models.compact import CompactModel, same_pad, same_pad_amounts


def same_conv_geometry(size: int, stride: int, kernel: int = 5) -> tuple[int, int]:
    """Keras 'same' as a plain conv: (padding, leading zero taps). Keras pads ``top`` before and
    ``bottom`` >= top after; a conv padding ``bottom`` on both sides whose kernel starts with
    bottom - top zero taps reads the same pixels, and avoids copying the input into a padded one."""
    top, bottom = same_pad_amounts(size, kernel, stride)
    return bottom, bottom - top


class PackedCompact(torch.nn.Module):
    """n dense-readout ReLU CompactModels of one image size as one network (module docstring).

    Parameters: ``w0`` (sum K0, 3, k, k), ``b0``; ``depth[l-1]`` (sum K_{l-1}, 1, k, k) and
    ``point[l-1]`` (every model's (K_l, K_{l-1}) pointwise weights, flattened and concatenated),
    ``point_bias[l-1]`` for layers l = 1..4; ``bns[l]`` over sum K_l channels; ``readout`` (every
    model's R*R*K4 dense readout weights, NHWC order, concatenated), ``readout_bias`` (n,).
    """

    def __init__(self, models: Sequence[CompactModel]):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("PackedCompact needs at least one model")
        spec = models[0].spec
        for m in models:
            if m.spec.readout != "dense" or not m.spec.activation:
                raise ValueError("PackedCompact: the models must have the dense readout and ReLUs")
            if (m.spec.image_size, m.spec.kernel_size, m.spec.strides) != (spec.image_size, spec.kernel_size,
                                                                           spec.strides):
                raise ValueError(f"PackedCompact: the models must share image size, kernel and strides, got "
                                 f"{m.spec.image_size} px / {m.spec.strides} and {spec.image_size} px / "
                                 f"{spec.strides}")
        self.specs = [m.spec for m in models]
        self.n = len(models)
        self.widths = [[s.filters[l] for s in self.specs] for l in range(5)]
        self.same_widths = all(len(set(w)) == 1 for w in self.widths)
        self.strides, self.ks = spec.strides, spec.kernel_size

        def cat(get, flat: bool = False) -> torch.nn.Parameter:
            parts = [get(m).detach() for m in models]
            return torch.nn.Parameter(torch.cat([p.reshape(-1) for p in parts] if flat else parts).clone())

        self.w0 = cat(lambda m: m.layer0_conv.weight)
        self.b0 = cat(lambda m: m.layer0_conv.bias)
        self.depth = torch.nn.ParameterList([cat(lambda m, l=l: m.depthwise(l).weight) for l in range(1, 5)])
        self.point = torch.nn.ParameterList([cat(lambda m, l=l: m.pointwise(l).weight, flat=True)
                                             for l in range(1, 5)])
        self.point_bias = torch.nn.ParameterList([cat(lambda m, l=l: m.pointwise(l).bias) for l in range(1, 5)])
        self.bns = torch.nn.ModuleList()
        for l in range(5):
            bn = torch.nn.BatchNorm2d(sum(self.widths[l]), eps=spec.bn_eps, momentum=spec.bn_momentum)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, name).copy_(torch.cat([getattr(m.bn(l), name) for m in models]))
            self.bns.append(bn)
        self.readout = cat(lambda m: m.readout.weight, flat=True)
        self.readout_bias = cat(lambda m: m.readout.bias)
        self._folded = None
        self.to(models[0].layer0_conv.weight.device)  # the BNs are made on the CPU

    # -- the models' slices -------------------------------------------------------------------------

    def _channels(self, layer: int) -> list[slice]:
        """Each model's channels of layer ``layer``."""
        out, c = [], 0
        for k in self.widths[layer]:
            out.append(slice(c, c + k))
            c += k
        return out

    def pointwise_blocks(self, layer: int) -> list[torch.Tensor]:
        """Layer ``layer``'s (1..4) pointwise weights per model, (K_l, K_{l-1}, 1, 1) views."""
        sizes = [ko * ki for ko, ki in zip(self.widths[layer], self.widths[layer - 1])]
        return [b.view(ko, ki, 1, 1) for b, ko, ki in
                zip(self.point[layer - 1].split(sizes), self.widths[layer], self.widths[layer - 1])]

    def readout_maps(self) -> list[torch.Tensor]:
        """Each model's dense readout as (R, R, K4) views (NHWC order, as CompactModel.readout_maps)."""
        r = self.specs[0].readout_size
        return [w.view(r, r, k) for w, k in zip(self.readout.split([r * r * k for k in self.widths[4]]),
                                                  self.widths[4])]

    # -- training -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Recentered images (B, 3, S, S) -> outputs (B, n), BN as its mode says (models of one spec)."""
        if not self.same_widths:
            raise ValueError("PackedCompact.forward trains models of one spec (the same widths); for models "
                             "of different widths use fold_() and infer()")
        k = self.widths
        x = F.conv2d(same_pad(x, self.ks, self.strides[0]), self.w0, self.b0)
        x = F.relu(self.bns[0](x))
        for l in range(1, 5):
            s = self.strides[l]
            d = F.conv2d(same_pad(x, self.ks, s), self.depth[l - 1], None, s, 0, 1, x.shape[1])
            w = self.point[l - 1].view(self.n * k[l][0], k[l - 1][0], 1, 1)
            x = F.conv2d(d, w, self.point_bias[l - 1], groups=self.n)
            x = F.relu(self.bns[l](x))
        b, _, r, _ = x.shape
        a = x.view(b, self.n, -1, r, r).permute(0, 1, 3, 4, 2).flatten(2)  # (B, n, R*R*K4), NHWC per model
        return torch.einsum("bnf,nf->bn", a, self.readout.view(self.n, -1)) + self.readout_bias

    @torch.no_grad()
    def unpack(self) -> list[CompactModel]:
        """The n models, with the pack's weights and BN state (on the pack's device, eval mode)."""
        dev = self.w0.device
        ch = [self._channels(l) for l in range(5)]
        blocks = [None] + [self.pointwise_blocks(l) for l in range(1, 5)]
        maps = self.readout_maps()
        out = []
        for j, spec in enumerate(self.specs):
            m = CompactModel(spec).to(dev)
            m.layer0_conv.weight.copy_(self.w0[ch[0][j]])
            m.layer0_conv.bias.copy_(self.b0[ch[0][j]])
            for l in range(1, 5):
                m.depthwise(l).weight.copy_(self.depth[l - 1][ch[l - 1][j]])
                m.pointwise(l).weight.copy_(blocks[l][j])
                m.pointwise(l).bias.copy_(self.point_bias[l - 1][ch[l][j]])
            for l in range(5):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(m.bn(l), name).copy_(getattr(self.bns[l], name)[ch[l][j]])
                m.bn(l).num_batches_tracked.copy_(self.bns[l].num_batches_tracked)
            m.readout.weight.copy_(maps[j].reshape(1, -1))
            m.readout.bias.copy_(self.readout_bias[j:j + 1])
            out.append(m.eval())
        return out

    @torch.no_grad()
    def write_bn_to(self, models: Sequence[CompactModel], layer: int) -> None:
        """Copy layer ``layer``'s BN running statistics of the pack into ``models`` (its sources)."""
        for m, c in zip(models, self._channels(layer)):
            m.bn(layer).running_mean.copy_(self.bns[layer].running_mean[c])
            m.bn(layer).running_var.copy_(self.bns[layer].running_var[c])

    # -- inference: BN folded, any widths -----------------------------------------------------------

    @torch.no_grad()
    def fold_(self) -> "PackedCompact":
        """Prepare ``infer`` / ``layer_pre`` / ``layer_act`` / ``head`` from the current weights and
        BN statistics (call ``refresh_bn`` after changing a layer's statistics, ``fold_`` again after
        changing weights; moving the pack to another device or dtype drops the folded tensors).
        Returns self."""
        dev = self.w0.device
        sizes = [self.specs[0].image_size]
        for st in self.strides[1:]:
            sizes.append(-(-sizes[-1] // st))
        padding, depth, block = [same_conv_geometry(sizes[0], self.strides[0], self.ks)[0]], [None], [None]
        if same_conv_geometry(sizes[0], self.strides[0], self.ks)[1] or self.strides[0] != 1:
            raise ValueError("PackedCompact.fold_: layer 0 must be a stride-1 conv with symmetric 'same' padding")
        for l in range(1, 5):
            pad, lead = same_conv_geometry(sizes[l - 1], self.strides[l], self.ks)
            depth.append(F.pad(self.depth[l - 1], (lead, 0, lead, 0)))
            padding.append(pad)
            b = torch.zeros(sum(self.widths[l]), sum(self.widths[l - 1]), 1, 1, device=dev)
            for w, rows, cols in zip(self.pointwise_blocks(l), self._channels(l), self._channels(l - 1)):
                b[rows, cols] = w
            block.append(b)
        maps = torch.cat([m.permute(2, 0, 1) for m in self.readout_maps()])[None]  # (1, sum K4, R, R)
        owner = torch.repeat_interleave(torch.arange(self.n, device=dev), torch.tensor(self.widths[4], device=dev))
        self._folded = {"padding": padding, "depth": depth, "block": block, "maps": maps,
                        "segments": F.one_hot(owner, self.n).to(maps.dtype),  # (sum K4, n)
                        "scale": [None] * 5, "shift": [None] * 5, "conv": [None] * 5}
        for l in range(5):
            self.refresh_bn(l)
        return self

    def _apply(self, fn, *args, **kwargs):
        self._folded = None  # .to(), .double(), ...: the folded tensors would be left behind
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def refresh_bn(self, layer: int) -> None:
        """Re-fold layer ``layer``'s BN (its running statistics and affine) into the conv."""
        f, bn = self._fold(), self.bns[layer]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        f["scale"][layer], f["shift"][layer] = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
        w, b = (self.w0, self.b0) if layer == 0 else (f["block"][layer], self.point_bias[layer - 1])
        f["conv"][layer] = (w * scale.view(-1, 1, 1, 1), b * scale + shift)

    def _fold(self) -> dict:
        if self._folded is None:
            raise ValueError("PackedCompact: call fold_() before infer / layer_pre / layer_act / head")
        return self._folded

    def _depthwise(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        f = self._fold()
        return F.conv2d(x, f["depth"][layer], None, self.strides[layer], f["padding"][layer], 1, x.shape[1])

    def layer_pre(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Conv output before BN of layer ``layer`` for all models (channels concatenated);
        x: the images (layer 0) or the previous layer's activation."""
        if layer == 0:
            return F.conv2d(x, self.w0, self.b0, padding=self._fold()["padding"][0])
        return F.conv2d(self._depthwise(layer, x), self._fold()["block"][layer], self.point_bias[layer - 1])

    def layer_act(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        """BN + ReLU of ``layer_pre``'s output (in place)."""
        f = self._fold()
        return torch.relu_(pre.mul_(f["scale"][layer]).add_(f["shift"][layer]))

    def head(self, a4: torch.Tensor) -> torch.Tensor:
        """(B, sum K4, R, R) -> (B, n): every model's readout."""
        f = self._fold()
        return (a4 * f["maps"]).sum(dim=(2, 3)) @ f["segments"] + self.readout_bias

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Recentered images (B, 3, S, S) -> outputs (B, n), eval-mode BN folded (after ``fold_``)."""
        f = self._fold()
        x = x.contiguous(memory_format=torch.channels_last)
        for l in range(5):
            w, b = f["conv"][l]
            x = torch.relu_(F.conv2d(x if l == 0 else self._depthwise(l, x), w, b,
                                     padding=f["padding"][0] if l == 0 else 0))
        return self.head(x)

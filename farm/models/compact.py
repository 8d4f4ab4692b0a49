"""The compact model: a 5-layer separable-conv CNN (method.md §3.1).

One class serves every compact network in farm: the per-neuron models that compression produces,
the paper's published per-neuron models, the ground-truth neurons of the simulated population and
the shared compact models (several outputs, factorized readout, optionally without ReLUs).

Layout (K0..K4 = ``spec.filters``):

    x (N, 3, H, W) float32, raw 0-255 minus RGB_MEANS (NCHW; see ``farm.models.input.recenter``)
    layer0: full 5x5 conv 3->K0 (stride 1) + BN + ReLU
    layer1..4: depthwise 5x5 (stride 2, 2, 1, 1; no bias) -> pointwise 1x1 K_{l-1}->K_l (+bias) + BN + ReLU
    readout "dense":      Linear over the NHWC-flattened (R, R, K4) map -> 1 output (R = H/4)
    readout "factorized": 1x1 conv K4 -> n_outputs ("mixing"), then one (R, R) map per output + bias

Padding is Keras 'same' (stride-2 5x5 pads 1 before / 2 after), BatchNorm eps 1e-3 and momentum 0.01
(Keras 0.99), Glorot-uniform kernels and zero biases, all as the paper's Keras models.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from farm.files import load_state_dict
from torch import nn

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "state_dict.pt"
SPEC_VERSION = 1


@dataclass(frozen=True)
class CompactSpec:
    """Everything needed to rebuild a CompactModel besides its weights.

    filters: output widths (K0, K1, K2, K3, K4) of code layers 0-4.
    image_size: input height = width in pixels (paper: 112).
    readout: "dense" (one output, per-neuron models) or "factorized" (shared models).
    n_outputs: number of outputs (1 for "dense").
    activation: False gives the paper's "linear" shared model (BN kept, no ReLUs).
    output_units: what the outputs mean, e.g. "standardized" (teacher z-scores) or "spikes/100ms".
    neuron_ids: the neuron each output stands for, e.g. ("190923:4",); may be empty.
    """

    filters: tuple[int, int, int, int, int] = (100, 100, 100, 100, 100)
    image_size: int = 112
    readout: str = "dense"
    n_outputs: int = 1
    activation: bool = True
    output_units: str = "standardized"
    neuron_ids: tuple[str, ...] = field(default_factory=tuple)

    kernel_size = 5
    strides = (1, 2, 2, 1, 1)
    bn_eps = 1e-3
    bn_momentum = 0.01

    def __post_init__(self):
        filters = tuple(int(k) for k in self.filters)
        object.__setattr__(self, "filters", filters)
        object.__setattr__(self, "neuron_ids", tuple(self.neuron_ids))
        if len(filters) != 5 or min(filters) < 1:
            raise ValueError(f"CompactSpec.filters must be 5 positive ints (K0..K4), got {self.filters}")
        if self.image_size < 4:
            raise ValueError(f"CompactSpec.image_size must be >= 4, got {self.image_size}")
        if self.readout not in ("dense", "factorized"):
            raise ValueError(f"CompactSpec.readout must be 'dense' or 'factorized', got {self.readout!r}")
        if self.readout == "dense" and self.n_outputs != 1:
            raise ValueError("CompactSpec: a 'dense' readout has exactly one output (n_outputs=1)")
        if self.neuron_ids and len(self.neuron_ids) != self.n_outputs:
            raise ValueError(
                f"CompactSpec.neuron_ids has {len(self.neuron_ids)} ids for {self.n_outputs} outputs"
            )

    @property
    def readout_size(self) -> int:
        """Side R of the final feature map (28 for 112 px): two stride-2 'same' convs."""
        return math.ceil(math.ceil(self.image_size / 2) / 2)

    def with_filters(self, filters: Sequence[int]) -> "CompactSpec":
        d = self.to_dict()
        d["filters"] = tuple(int(k) for k in filters)
        return CompactSpec.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["filters"] = list(self.filters)
        d["neuron_ids"] = list(self.neuron_ids)
        d["spec_version"] = SPEC_VERSION
        d["kind"] = "CompactSpec"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompactSpec":
        d = dict(d)
        version = d.pop("spec_version", SPEC_VERSION)
        kind = d.pop("kind", "CompactSpec")
        if kind != "CompactSpec" or version != SPEC_VERSION:
            raise ValueError(f"unsupported compact spec (kind={kind!r}, spec_version={version!r}); "
                             f"expected kind='CompactSpec', spec_version={SPEC_VERSION}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CompactSpec fields: {sorted(unknown)}")
        if "filters" in d:
            d["filters"] = tuple(d["filters"])
        if "neuron_ids" in d:
            d["neuron_ids"] = tuple(d["neuron_ids"])
        return cls(**d)

    # -- sizes (method.md §3.2) ---------------------------------------------------------------
    def param_count(self) -> int:
        """Total parameters as Keras counts them (BN moving mean/variance included)."""
        k = self.filters
        p = 80 * k[0]
        for l in range(1, 5):
            p += 25 * k[l - 1] + k[l - 1] * k[l] + 5 * k[l]
        r2 = self.readout_size ** 2
        if self.readout == "dense":
            p += r2 * k[4] + 1
        else:
            p += k[4] * self.n_outputs + self.n_outputs + r2 * self.n_outputs + self.n_outputs
        return p

    def trainable_param_count(self) -> int:
        return self.param_count() - 2 * sum(self.filters)

    def filter_count(self) -> int:
        """The paper's "number of convolutional filters": spatial kernels 2*K0 + K1 + K2 + K3 + K4."""
        k = self.filters
        return 2 * k[0] + k[1] + k[2] + k[3] + k[4]


def same_pad_amounts(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras 'same' padding of one axis: (before, after), the extra pixel after (bottom/right)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Keras 'same' padding of an NCHW tensor (``same_pad_amounts`` on H and W)."""
    h, w = x.shape[-2:]
    top, bottom = same_pad_amounts(h, kernel, stride)
    left, right = same_pad_amounts(w, kernel, stride)
    return F.pad(x, (left, right, top, bottom))


def glorot_limit(fan_in: int, fan_out: int) -> float:
    """Glorot (Xavier) uniform's bound: weights ~ U(-limit, limit) (Keras' default initializer)."""
    return math.sqrt(6.0 / (fan_in + fan_out))


def glorot_uniform_(t: torch.Tensor, fan_in: int, fan_out: int) -> None:
    limit = glorot_limit(fan_in, fan_out)
    with torch.no_grad():
        t.uniform_(-limit, limit)


class CompactModel(nn.Module):
    """See the module docstring. ``forward(x)`` -> (N, n_outputs) float."""

    def __init__(self, spec: CompactSpec):
        super().__init__()
        self.spec = spec
        k = spec.filters
        ks = spec.kernel_size
        self.layer0_conv = nn.Conv2d(3, k[0], ks, bias=True)
        self.layer0_bn = nn.BatchNorm2d(k[0], eps=spec.bn_eps, momentum=spec.bn_momentum)
        for l in range(1, 5):
            setattr(self, f"layer{l}_depth", nn.Conv2d(k[l - 1], k[l - 1], ks, groups=k[l - 1], bias=False))
            setattr(self, f"layer{l}_point", nn.Conv2d(k[l - 1], k[l], 1, bias=True))
            setattr(self, f"layer{l}_bn", nn.BatchNorm2d(k[l], eps=spec.bn_eps, momentum=spec.bn_momentum))
        r = spec.readout_size
        if spec.readout == "dense":
            self.readout = nn.Linear(r * r * k[4], 1)
        else:
            self.mixing = nn.Conv2d(k[4], spec.n_outputs, 1, bias=True)
            self.spatial = nn.Parameter(torch.zeros(spec.n_outputs, r, r))
            self.spatial_bias = nn.Parameter(torch.zeros(spec.n_outputs))
        self.reset_parameters()

    # -- init -----------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Keras defaults: Glorot-uniform kernels, zero biases, BN gamma 1 / beta 0 / stats 0, 1."""
        k, ks, r = self.spec.filters, self.spec.kernel_size, self.spec.readout_size
        rf = ks * ks
        glorot_uniform_(self.layer0_conv.weight, 3 * rf, k[0] * rf)
        for l in range(1, 5):
            glorot_uniform_(self.depthwise(l).weight, k[l - 1] * rf, rf)
            glorot_uniform_(self.pointwise(l).weight, k[l - 1], k[l])
        if self.spec.readout == "dense":
            glorot_uniform_(self.readout.weight, r * r * k[4], 1)
        else:
            glorot_uniform_(self.mixing.weight, k[4], self.spec.n_outputs)
            glorot_uniform_(self.spatial, r * r * self.spec.n_outputs, 1)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias") or name == "spatial_bias":
                    p.zero_()
            for l in range(5):
                self.bn(l).reset_parameters()

    # -- accessors ------------------------------------------------------------------------------
    def depthwise(self, layer: int) -> nn.Conv2d:
        return getattr(self, f"layer{layer}_depth")

    def pointwise(self, layer: int) -> nn.Conv2d:
        return getattr(self, f"layer{layer}_point")

    def bn(self, layer: int) -> nn.BatchNorm2d:
        return getattr(self, f"layer{layer}_bn")

    def readout_maps(self) -> torch.Tensor:
        """Dense readout weights as (R, R, K4) spatial maps (a view; NHWC flatten order)."""
        if self.spec.readout != "dense":
            raise ValueError("readout_maps() is for the dense readout; use .spatial for factorized")
        r = self.spec.readout_size
        return self.readout.weight.view(r, r, self.spec.filters[4])

    def readout_weights(self) -> torch.Tensor:
        """A single-output model's readout as (R, R, K4) weights on the layer-4 maps: the dense
        readout's view, or a factorized readout's s[y, x] * m[k] (computed: writing to it changes
        nothing; zero ``mixing`` columns to drop filters)."""
        if self.spec.readout == "dense":
            return self.readout_maps()
        if self.spec.n_outputs != 1:
            raise ValueError(f"readout_weights() is for single-output models, this one has {self.spec.n_outputs}")
        return self.spatial[0][:, :, None] * self.mixing.weight[0, :, 0, 0][None, None, :]

    # -- forward --------------------------------------------------------------------------------
    def layer_pre(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s linear output (conv + bias, before BN) from the previous activation."""
        s, ks = self.spec.strides[layer], self.spec.kernel_size
        if layer == 0:
            return self.layer0_conv(same_pad(x, ks, s))
        d = F.conv2d(same_pad(x, ks, s), self.depthwise(layer).weight, None, s, 0, 1, x.shape[1])
        return self.pointwise(layer)(d)

    def layer_act(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(layer)(self.layer_pre(layer, x))
        return F.relu(y) if self.spec.activation else y

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations of layers 0-4, each (N, K_l, H_l, W_l)."""
        acts = []
        for l in range(5):
            x = self.layer_act(l, x)
            acts.append(x)
        return acts

    def head(self, a4: torch.Tensor) -> torch.Tensor:
        if self.spec.readout == "dense":
            return self.readout(a4.permute(0, 2, 3, 1).flatten(1))
        m = self.mixing(a4)  # (N, n_outputs, R, R)
        return (m * self.spatial).sum(dim=(2, 3)) + self.spatial_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for l in range(5):
            x = self.layer_act(l, x)
        return self.head(x)

    # -- sizes ----------------------------------------------------------------------------------
    def param_count(self) -> int:
        return self.spec.param_count()

    def trainable_param_count(self) -> int:
        return self.spec.trainable_param_count()

    def filter_count(self) -> int:
        return self.spec.filter_count()


def build_compact(spec: CompactSpec | dict, seed: int | None = None) -> CompactModel:
    """The one place that builds a compact model. ``seed`` makes the Glorot init reproducible."""
    if isinstance(spec, dict):
        spec = CompactSpec.from_dict(spec)
    if seed is None:
        return CompactModel(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CompactModel(spec)


def narrow(model: CompactModel, keep: Sequence[Sequence[int]]) -> CompactModel:
    """A narrower CompactModel holding only the filters in ``keep`` (one index list per layer 0-4).

    Copies the surviving slices of every kernel, bias and BN vector (method.md §5.5). When the dropped
    filters had been zeroed (their outgoing weights are 0), the narrow model's outputs equal the
    original's.
    """
    if len(keep) != 5:
        raise ValueError(f"narrow(): keep needs 5 index lists (layers 0-4), got {len(keep)}")
    idx = [torch.as_tensor(sorted(int(i) for i in k), dtype=torch.long) for k in keep]
    for l, (ix, k) in enumerate(zip(idx, model.spec.filters)):
        if len(ix) == 0 or ix.min() < 0 or ix.max() >= k:
            raise ValueError(f"narrow(): layer {l} keep indices must be non-empty and within 0..{k - 1}")
    spec = model.spec.with_filters([len(ix) for ix in idx])
    new = CompactModel(spec).to(next(model.parameters()).device)
    src = model.state_dict()
    dst = new.state_dict()
    with torch.no_grad():
        dst["layer0_conv.weight"].copy_(src["layer0_conv.weight"][idx[0]])
        dst["layer0_conv.bias"].copy_(src["layer0_conv.bias"][idx[0]])
        for l in range(1, 5):
            dst[f"layer{l}_depth.weight"].copy_(src[f"layer{l}_depth.weight"][idx[l - 1]])
            dst[f"layer{l}_point.weight"].copy_(src[f"layer{l}_point.weight"][idx[l]][:, idx[l - 1]])
            dst[f"layer{l}_point.bias"].copy_(src[f"layer{l}_point.bias"][idx[l]])
        for l in range(5):
            for name in ("weight", "bias", "running_mean", "running_var"):
                dst[f"layer{l}_bn.{name}"].copy_(src[f"layer{l}_bn.{name}"][idx[l]])
            dst[f"layer{l}_bn.num_batches_tracked"].copy_(src[f"layer{l}_bn.num_batches_tracked"])
        if spec.readout == "dense":
            r = spec.readout_size
            maps = src["readout.weight"].view(r, r, model.spec.filters[4])[:, :, idx[4]]
            dst["readout.weight"].copy_(maps.reshape(1, -1))
            dst["readout.bias"].copy_(src["readout.bias"])
        else:
            dst["mixing.weight"].copy_(src["mixing.weight"][:, idx[4]])
            for name in ("mixing.bias", "spatial", "spatial_bias"):
                dst[name].copy_(src[name])
    new.load_state_dict(dst)
    new.train(model.training)
    return new


def output_slice(model: CompactModel, output: int | str) -> CompactModel:
    """One output of a shared (factorized-readout) compact model as a single-neuron dense model.

    ``output``: the output's index or its neuron id (``model.spec.neuron_ids``). The factorized readout
    (mixing row m over K4 filters, spatial map s over R x R, biases b_m, b_s) is the rank-1 dense readout
    W[y, x, k] = s[y, x] * m[k] with bias b_s + b_m * sum(s), so the slice computes exactly that output
    (to float rounding). Layers 0-4 are copied whole: the slice is as wide as the shared model and can
    be pruned and retrained like a distilled student (``farm.compress.prune_and_retrain``). A model with
    a dense readout has one output and is returned as a copy.
    """
    spec = model.spec
    if isinstance(output, str):
        if output not in spec.neuron_ids:
            raise ValueError(f"output_slice: neuron {output!r} is not an output of this model "
                             f"({len(spec.neuron_ids)} neuron ids, e.g. {list(spec.neuron_ids[:3])})")
        index = spec.neuron_ids.index(output)
    else:
        index = int(output)
        if not 0 <= index < spec.n_outputs:
            raise ValueError(f"output_slice: output {index} out of range: the model has {spec.n_outputs} outputs")
    neuron = (spec.neuron_ids[index],) if spec.neuron_ids else ()
    d = spec.to_dict()
    d.update(readout="dense", n_outputs=1, neuron_ids=list(neuron))
    new = CompactModel(CompactSpec.from_dict(d)).to(next(model.parameters()).device)
    src = model.state_dict()
    dst = new.state_dict()
    with torch.no_grad():
        for key, value in dst.items():
            if not key.startswith("readout."):
                value.copy_(src[key])
        if spec.readout == "dense":
            dst["readout.weight"].copy_(src["readout.weight"])
            dst["readout.bias"].copy_(src["readout.bias"])
        else:
            mix = src["mixing.weight"][index, :, 0, 0].double()  # (K4,)
            spatial = src["spatial"][index].double()  # (R, R)
            weight = spatial[:, :, None] * mix[None, None, :]  # (R, R, K4): NHWC flatten order
            dst["readout.weight"].copy_(weight.reshape(1, -1))
            bias = src["spatial_bias"][index].double() + src["mixing.bias"][index].double() * spatial.sum()
            dst["readout.bias"].copy_(bias.reshape(1))
    new.load_state_dict(dst)
    new.train(model.training)
    return new


@torch.no_grad()
def rescale_outputs_(model: CompactModel, mean, sd) -> CompactModel:
    """Make ``model`` output ``out * sd + mean`` per output, in place (exact: the readout is linear).
    mean, sd: one value per output. Returns ``model``."""
    dev = next(model.parameters()).device
    mu = torch.as_tensor(np.asarray(mean, np.float64).reshape(-1), device=dev)
    s = torch.as_tensor(np.asarray(sd, np.float64).reshape(-1), device=dev)
    if len(mu) != model.spec.n_outputs or len(s) != model.spec.n_outputs:
        raise ValueError(f"rescale_outputs_: need one mean and SD per output ({model.spec.n_outputs}), "
                         f"got {len(mu)} and {len(s)}")
    if model.spec.readout == "dense":
        model.readout.weight.mul_(s.to(model.readout.weight.dtype))
        model.readout.bias.copy_((model.readout.bias.double() * s + mu).to(model.readout.bias.dtype))
    else:
        model.spatial.mul_(s.to(model.spatial.dtype)[:, None, None])
        model.spatial_bias.copy_((model.spatial_bias.double() * s + mu).to(model.spatial_bias.dtype))
    return model


def save_compact(model: CompactModel, directory: str | Path) -> Path:
    """Write ``spec.json`` + ``state_dict.pt`` into ``directory`` (created). Atomic per file."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp_spec = d / (SPEC_FILE + ".tmp")
    tmp_sd = d / (WEIGHTS_FILE + ".tmp")
    tmp_spec.write_text(json.dumps(model.spec.to_dict(), indent=2))
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    torch.save(sd, tmp_sd)
    tmp_sd.replace(d / WEIGHTS_FILE)
    tmp_spec.replace(d / SPEC_FILE)
    return d


def load_compact(directory: str | Path, map_location: str | torch.device = "cpu") -> CompactModel:
    """Load a model written by ``save_compact`` (``torch.load(weights_only=True)``), in eval mode."""
    d = Path(directory)
    spec_path, sd_path = d / SPEC_FILE, d / WEIGHTS_FILE
    for p in (spec_path, sd_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; a saved compact model is a folder with "
                                    f"{SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        spec = CompactSpec.from_dict(json.loads(spec_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{spec_path}: not a valid compact-model spec: {e}") from e
    model = CompactModel(spec)
    sd = load_state_dict(sd_path, map_location)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{sd_path}: weights do not match the spec in {spec_path}: {e}") from e
    return model.eval()

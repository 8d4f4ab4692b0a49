"""The deep-ensemble teacher's parts: frozen backbone, members, readouts, ridge algebra (method.md §2).

    images uint8 (N, 112, 112, 3) RGB
      -> Backbone: resize to ``input_size`` (bicubic), RGB/255, ImageNet mean/std, frozen torchvision
         network cut after ``layer`` (ResNet50 ``layer3.3`` = Keras ``conv4_block4_out``):
         features float32 (N, 1024, 14, 14) at 224 px (4x4 at 64 px, 7x7 at 112 px)
      -> Member (one of K): 1x1 conv 1024->W + BN + ReLU, separable 3x3 stride 2 (Keras 'same'),
         B residual separable blocks -> embedding (N, W, 7, 7) at 224 px
      -> readout per session (ReadoutHead): ridge on the flattened embedding, or factorized
         (1x1 mixing -> one spatial map per neuron + bias); predictions averaged over members.

The paper's trunk is Keras ResNet50 v1 with caffe preprocessing (BGR, mean subtraction, no scaling).
torchvision's ResNet50 is v1.5 (stride on the 3x3 conv, bias-free convs) and expects RGB/255 with
ImageNet mean/std, so features differ from the paper's unless the Keras weights are ported (§2.1,
§11.17). Weights are only ever read from a local torchvision state_dict file: nothing is downloaded.
Without a file the backbone is randomly initialized (reproducibly, from a seed) and ``pretrained`` is
False; such a backbone is a much weaker feature extractor than an ImageNet-trained one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from farm.files import atomic_path, load_state_dict
from farm.models.compact import glorot_uniform_, same_pad

log = logging.getLogger(__name__)

#: torchvision's ImageNet normalization (inputs are RGB scaled to 0-1 first).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Keras BatchNormalization defaults (eps 1e-3, moving-average momentum 0.99 = torch 0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state_dict's tensors (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def image_hash(images: np.ndarray) -> str:
    """Short content hash of an image array (shape, dtype and bytes), for feature-cache keys."""
    a = np.ascontiguousarray(images)
    h = hashlib.sha1(f"{a.shape}:{a.dtype};".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# backbone


@dataclass(frozen=True)
class BackboneSpec:
    """Which frozen network supplies the features.

    name: a torchvision classification model name (``torchvision.models.get_model``), e.g. "resnet50".
    layer: dotted module path of the last module kept, e.g. "layer3.3" (ResNet50's 4th block of
        stage 4 = Keras ``conv4_block4_out``) or "features.26" (VGG19 ``block4_pool``). The network is
        cut as the chain of its children up to that module, which is how ResNet/VGG/DenseNet/MobileNet
        compute their features.
    input_size: side in pixels the images are resized to (bicubic) before the network (paper: 224).
    weights_path: a local torchvision state_dict file for the FULL network (e.g. resnet50 ImageNet
        weights); None gives a random init from ``seed``.
    weights_sha256: expected sha256 of ``weights_path`` (filled in when the backbone is built).
    seed: random-init seed (used only without ``weights_path``).
    """

    name: str = "resnet50"
    layer: str = "layer3.3"
    input_size: int = 224
    weights_path: str | None = None
    weights_sha256: str | None = None
    seed: int = 0

    def __post_init__(self):
        if int(self.input_size) < 16:
            raise ValueError(f"BackboneSpec.input_size must be >= 16 pixels, got {self.input_size}")
        if not self.layer or not isinstance(self.layer, str):
            raise ValueError(f"BackboneSpec.layer must be a dotted module path like 'layer3.3', got {self.layer!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown BackboneSpec fields: {sorted(unknown)}")
        return cls(**d)


def _truncate(module: nn.Module, path: list[str], where: str) -> nn.Sequential:
    """The chain of ``module``'s children up to and including ``path`` (recursing into the last one)."""
    children = list(module.named_children())
    names = [n for n, _ in children]
    if path[0] not in names:
        raise ValueError(f"backbone layer {where!r}: no child {path[0]!r} in {type(module).__name__} "
                         f"(children: {names})")
    idx = names.index(path[0])
    kept = list(children[:idx])
    target = children[idx][1]
    if len(path) > 1:
        target = _truncate(target, path[1:], where)
    kept.append((path[0], target))
    return nn.Sequential(OrderedDict(kept))


class Backbone(nn.Module):
    """A frozen, truncated torchvision network; see ``BackboneSpec``. Always in eval mode.

    ``pretrained``: True when the weights came from a file. ``fingerprint``: sha256 of the kept
    weights (identifies the feature extractor in caches and teacher ids).
    """

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        import torchvision

        self.pretrained = spec.weights_path is not None
        if spec.weights_path is not None:
            # Check the file before building anything, so a wrong path or hash fails fast.
            path = Path(spec.weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"backbone weights_path {path}: no such file "
                                        f"(a torchvision state_dict of {spec.name}, e.g. saved with torch.save)")
            digest = _sha256_file(path)
            if spec.weights_sha256 is not None and spec.weights_sha256 != digest:
                raise ValueError(f"backbone weights {path}: sha256 {digest[:12]}... differs from the "
                                 f"recorded {spec.weights_sha256[:12]}...; the file changed")
        try:
            # weights=None always: this code never downloads anything.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(spec.seed))
                full = torchvision.models.get_model(spec.name, weights=None)
        except ValueError as e:
            raise ValueError(f"BackboneSpec.name {spec.name!r}: not a torchvision model ({e})") from e
        if spec.weights_path is not None:
            state = load_state_dict(path)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            try:
                full.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"backbone weights {path}: do not match torchvision {spec.name}: {e}") from e
            spec = BackboneSpec(**{**spec.to_dict(), "weights_sha256": digest})
        else:
            log.warning("backbone %s: no weights_path given, using a RANDOM initialization (seed %d); "
                        "features are far weaker than ImageNet-trained ones", spec.name, spec.seed)
        self.spec = spec
        self.net = _truncate(full, spec.layer.split("."), spec.layer)
        self.net.requires_grad_(False)
        self.net.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.fingerprint = state_fingerprint(self.net.state_dict())
        with torch.inference_mode():
            out = self.net(torch.zeros(1, 3, spec.input_size, spec.input_size))
        self.out_shape = tuple(int(s) for s in out.shape[1:])  # (C, h, w)

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen: BatchNorm always uses its stored statistics.
        return super().train(False)

    @property
    def key(self) -> str:
        """Short id of this feature extractor (network, cut, input size, weights)."""
        s = f"{self.spec.name}|{self.spec.layer}|{self.spec.input_size}|{self.fingerprint}"
        return f"{self.spec.name}-{hashlib.sha1(s.encode()).hexdigest()[:10]}"

    def preprocess(self, images: np.ndarray | torch.Tensor, device) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB -> float32 (N, 3, S, S) resized (bicubic) and ImageNet-normalized."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3) RGB, got shape {tuple(x.shape)}")
        x = x.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        s = self.spec.input_size
        if x.shape[-2:] != (s, s):
            # PIL's bicubic resize of uint8 (the paper's) clips to the pixel range; so do we.
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False,
                              antialias=bool(x.shape[-1] > s)).clamp_(0.0, 1.0)
        return (x - self.mean.to(device)) / self.std.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (N, 3, S, S) -> features (N, C, h, w)."""
        return self.net(x)

    def features(self, images: np.ndarray, batch_size: int = 64, device="cpu") -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, C, h, w) features, computed in batches (inference mode)."""
        if len(images) == 0:
            return np.zeros((0, *self.out_shape), dtype=np.float32)
        out = np.empty((len(images), *self.out_shape), dtype=np.float32)
        self.to(device)
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                x = self.preprocess(images[s:s + batch_size], device)
                out[s:s + batch_size] = self.net(x).float().cpu().numpy()
        return out


def build_backbone(spec: BackboneSpec | dict) -> Backbone:
    """The frozen feature extractor described by ``spec`` (see ``BackboneSpec``)."""
    if isinstance(spec, dict):
        spec = BackboneSpec.from_dict(spec)
    return Backbone(spec)


class FeatureCache:
    """Backbone features per (backbone, session, images): in memory, and on disk when ``directory``.

    Files are ``<backbone.key>_<session>_<image hash>.npy`` (float32 (N, C, h, w)), written atomically.
    """

    def __init__(self, directory: str | Path | None = None, batch_size: int = 64, device="cpu"):
        self.directory = Path(directory) if directory else None
        self.batch_size = int(batch_size)
        self.device = device
        self._memory: dict[str, np.ndarray] = {}

    def get(self, backbone: Backbone, session_id: str, images: np.ndarray) -> np.ndarray:
        key = f"{backbone.key}_{session_id}_{image_hash(images)}"
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"{key}.npy" if self.directory else None
        feats = None
        if path is not None and path.is_file():
            try:
                feats = np.load(path)
            except (ValueError, OSError) as e:
                log.warning("feature cache %s unreadable (%s); recomputing", path, e)
            if feats is not None and feats.shape != (len(images), *backbone.out_shape):
                log.warning("feature cache %s has shape %s, expected %s; recomputing",
                            path, feats.shape, (len(images), *backbone.out_shape))
                feats = None
        if feats is None:
            feats = backbone.features(images, self.batch_size, self.device)
            if path is not None:
                _atomic_save_npy(path, feats)
        self._memory[key] = feats
        return feats

    def clear(self) -> None:
        self._memory.clear()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


# ------------------------------------------------------------------------------------------------
# members


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member (method.md §2.2; paper: 1024, 512, 256, 4)."""

    in_channels: int = 1024
    width: int = 512
    block_width: int = 256
    n_blocks: int = 4

    def __post_init__(self):
        for name in ("in_channels", "width", "block_width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MemberSpec.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.n_blocks) < 0:
            raise ValueError(f"MemberSpec.n_blocks must be >= 0, got {self.n_blocks}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MemberSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown MemberSpec fields: {sorted(unknown)}")
        return cls(**d)

    @staticmethod
    def embedding_side(feature_side: int) -> int:
        """Side of the embedding for a feature map of side ``feature_side`` (one stride-2 'same')."""
        return math.ceil(feature_side / 2)


class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D: depthwise k x k (multiplier 1, no bias) then pointwise 1x1 with bias,
    'same' padding (Keras' split: the extra pixel goes bottom/right, e.g. (0, 1, 0, 1) for a stride-2
    3x3 on 14x14)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel, stride=stride, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=True)

    def reset_parameters(self) -> None:
        rf = self.kernel * self.kernel
        c_in, c_out = self.pointwise.in_channels, self.pointwise.out_channels
        glorot_uniform_(self.depthwise.weight, c_in * rf, rf)
        glorot_uniform_(self.pointwise.weight, c_in, c_out)
        nn.init.zeros_(self.pointwise.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(same_pad(x, self.kernel, self.stride)))


class ResidualBlock(nn.Module):
    """x + 1x1(ReLU(BN(sep3x3(ReLU(BN(sep3x3(x))))))), no ReLU after the add (§2.2)."""

    def __init__(self, width: int, block_width: int):
        super().__init__()
        self.sep1 = SeparableConv2d(width, block_width)
        self.bn1 = nn.BatchNorm2d(block_width, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.sep2 = SeparableConv2d(block_width, block_width)
        self.bn2 = nn.BatchNorm2d(block_width, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.project = nn.Conv2d(block_width, width, 1, bias=True)

    def reset_parameters(self) -> None:
        self.sep1.reset_parameters()
        self.sep2.reset_parameters()
        self.bn1.reset_parameters()
        self.bn2.reset_parameters()
        glorot_uniform_(self.project.weight, self.project.in_channels, self.project.out_channels)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.sep1(x)))
        y = F.relu(self.bn2(self.sep2(y)))
        return x + self.project(y)


class Member(nn.Module):
    """features (N, in_channels, h, w) -> embedding (N, width, ceil(h/2), ceil(w/2)) (§2.2)."""

    def __init__(self, spec: MemberSpec):
        super().__init__()
        self.spec = spec
        self.initial_conv = nn.Conv2d(spec.in_channels, spec.width, 1, bias=True)
        self.initial_bn = nn.BatchNorm2d(spec.width, eps=BN_EPS, momentum=BN_MOMENTUM)
        # No BN/ReLU after the stride-2 separable conv, as in the paper's member.
        self.initial_sepconv = SeparableConv2d(spec.width, spec.width, 3, stride=2)
        self.blocks = nn.ModuleList(ResidualBlock(spec.width, spec.block_width) for _ in range(spec.n_blocks))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras defaults: Glorot-uniform kernels, zero biases, BN gamma 1, beta 0, stats (0, 1)."""
        glorot_uniform_(self.initial_conv.weight, self.spec.in_channels, self.spec.width)
        nn.init.zeros_(self.initial_conv.bias)
        self.initial_bn.reset_parameters()
        self.initial_sepconv.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.initial_bn(self.initial_conv(features)))
        x = self.initial_sepconv(x)
        for block in self.blocks:
            x = block(x)
        return x


def build_member(spec: MemberSpec | dict, seed: int | None = None) -> Member:
    """A freshly initialized member; ``seed`` makes the Glorot init reproducible."""
    if isinstance(spec, dict):
        spec = MemberSpec.from_dict(spec)
    if seed is None:
        return Member(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return Member(spec)


# ------------------------------------------------------------------------------------------------
# readouts


def readout_init_weights(width: int, side: int, units: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A member's initial Glorot readout kernels for ``units`` outputs, as Keras would draw them.

    Returns mixing (units, width) (a 1x1 conv width->units: fans width, units) and spatial
    (units, side, side) (a depthwise side x side conv: fans units*side^2, side^2).
    """
    rf = side * side
    lim_mix = math.sqrt(6.0 / (width + units))
    lim_sp = math.sqrt(6.0 / (units * rf + rf))
    mixing = (torch.rand(units, width, generator=generator) * 2 - 1) * lim_mix
    spatial = (torch.rand(units, side, side, generator=generator) * 2 - 1) * lim_sp
    return mixing, spatial


class FactorizedReadout(nn.Module):
    """The training readout of one member for one session (§2.3): a 1x1 "mixing" conv width -> n
    (with bias) then one (h, w) spatial map per neuron (with bias).

    embedding (N, width, h, w) -> (N, n).
    """

    def __init__(self, n_outputs: int, width: int, side: int):
        super().__init__()
        self.mixing = nn.Parameter(torch.zeros(n_outputs, width))
        self.mixing_bias = nn.Parameter(torch.zeros(n_outputs))
        self.spatial = nn.Parameter(torch.zeros(n_outputs, side, side))
        self.spatial_bias = nn.Parameter(torch.zeros(n_outputs))

    @classmethod
    def reset_from(cls, init_mixing: torch.Tensor, init_spatial: torch.Tensor, n_outputs: int,
                   generator: torch.Generator, scale: float = 1e-3) -> "FactorizedReadout":
        """The paper's per-session reset (§2.3): biases 0, and the first ``n_outputs`` units take
        ``scale`` x an element-shuffled copy of the member's initial Glorot kernels (small and random,
        not zero: a zero x zero product would never learn)."""
        units, width = init_mixing.shape
        side = init_spatial.shape[-1]
        if n_outputs > units:
            raise ValueError(f"a session with {n_outputs} neurons exceeds the readout's {units} units "
                             f"(raise readout_units)")
        ro = cls(n_outputs, width, side)
        mix = init_mixing.flatten()[torch.randperm(init_mixing.numel(), generator=generator)]
        sp = init_spatial.flatten()[torch.randperm(init_spatial.numel(), generator=generator)]
        with torch.no_grad():
            ro.mixing.copy_(scale * mix.view(units, width)[:n_outputs])
            ro.spatial.copy_(scale * sp.view(units, side, side)[:n_outputs])
        return ro

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("nchw,oc->nohw", embedding, self.mixing) + self.mixing_bias[:, None, None]
        return (mixed * self.spatial).sum(dim=(2, 3)) + self.spatial_bias


class ReadoutHead(nn.Module):
    """A fitted readout for one set of neurons, for every member; predictions averaged over members.

    kind "ridge": weight (K, D, n) on the flattened (C, h, w) embedding (D = C*h*w) + bias (K, n).
    kind "factorized": mixing (K, n, C) + mixing_bias (K, n), spatial (K, n, h, w) + bias (K, n).
    Targets were standardized per neuron (``target_mean``/``target_std``, spikes per 100 ms): the
    head outputs z-scores when ``output_units == "standardized"``, spike counts when "spikes".
    """

    KINDS = ("ridge", "factorized")
    UNITS = ("standardized", "spikes")

    def __init__(self, kind: str, n_members: int, n_outputs: int, width: int, side: int,
                 neuron_ids=(), output_units: str = "standardized"):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"readout kind must be one of {self.KINDS}, got {kind!r}")
        if output_units not in self.UNITS:
            raise ValueError(f"output_units must be one of {self.UNITS}, got {output_units!r}")
        self.kind, self.output_units = kind, output_units
        self.n_members, self.n_outputs, self.width, self.side = n_members, n_outputs, width, side
        self.neuron_ids = tuple(neuron_ids)
        if self.neuron_ids and len(self.neuron_ids) != n_outputs:
            raise ValueError(f"ReadoutHead: {len(self.neuron_ids)} neuron ids for {n_outputs} outputs")
        k, n = n_members, n_outputs
        if kind == "ridge":
            self.weight = nn.Parameter(torch.zeros(k, width * side * side, n), requires_grad=False)
        else:
            self.mixing = nn.Parameter(torch.zeros(k, n, width), requires_grad=False)
            self.mixing_bias = nn.Parameter(torch.zeros(k, n), requires_grad=False)
            self.spatial = nn.Parameter(torch.zeros(k, n, side, side), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(k, n), requires_grad=False)
        self.register_buffer("target_mean", torch.zeros(n))
        self.register_buffer("target_std", torch.ones(n))

    def meta(self) -> dict:
        return {"kind": self.kind, "n_members": self.n_members, "n_outputs": self.n_outputs,
                "width": self.width, "side": self.side, "neuron_ids": list(self.neuron_ids),
                "output_units": self.output_units}

    @classmethod
    def from_meta(cls, meta: dict) -> "ReadoutHead":
        return cls(meta["kind"], meta["n_members"], meta["n_outputs"], meta["width"], meta["side"],
                   meta.get("neuron_ids", ()), meta.get("output_units", "standardized"))

    def member_output(self, k: int, embedding: torch.Tensor) -> torch.Tensor:
        """Member ``k``'s standardized prediction (N, n) from its embedding (N, C, h, w)."""
        if self.kind == "ridge":
            return embedding.flatten(1) @ self.weight[k] + self.bias[k]
        mixed = torch.einsum("nchw,oc->nohw", embedding, self.mixing[k]) + self.mixing_bias[k][:, None, None]
        return (mixed * self.spatial[k]).sum(dim=(2, 3)) + self.bias[k]

    def finish(self, standardized_mean: torch.Tensor) -> torch.Tensor:
        """Member-averaged standardized prediction (N, n) -> output units."""
        if self.output_units == "spikes":
            return standardized_mean * self.target_std + self.target_mean
        return standardized_mean


# ------------------------------------------------------------------------------------------------
# ridge regression (float64 NumPy; eigh instead of batched torch solves, see ecosystem.md §12)


@contextlib.contextmanager
def blas_threads(n: int = 1):
    """Limit NumPy's BLAS/LAPACK threads inside the block (restored after), when threadpoolctl is
    installed (it comes with mlflow's scikit-learn); otherwise do nothing.

    Why: on a busy machine a multithreaded OpenBLAS eigh of a 450 x 450 matrix was measured 25x
    slower than a single-threaded one (3.2 s against 0.12 s); the ridge problems here are small.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


def default_ridge_alpha(x: np.ndarray) -> float:
    """The reference's default penalty (§2.5): 0.01 x median over features of var(x_f) * (n - 1)^2."""
    n = x.shape[0]
    var = np.var(x, axis=0)
    alpha = float(0.01 * np.median(var) * (n - 1) ** 2)
    if not alpha > 0:
        # More than half the features are constant (dead ReLUs): fall back to the mean variance.
        alpha = float(0.01 * np.mean(var) * (n - 1) ** 2)
    return alpha if alpha > 0 else 1.0


class RidgeSolver:
    """Multi-output ridge regression with intercept, solved once for any number of penalties.

    x: (n, D) inputs, y: (n, k) targets. Uses the eigendecomposition of the n x n Gram matrix when
    D > n (dual form) and of the D x D covariance otherwise, so each extra alpha is cheap.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"ridge: x must be (n, D) and y (n, k) with the same n; got {x.shape}, {y.shape}")
        if x.shape[0] < 2:
            raise ValueError(f"ridge: need at least 2 samples, got {x.shape[0]}")
        self.x_mean, self.y_mean = x.mean(axis=0), y.mean(axis=0)
        self.xc, self.yc = x - self.x_mean, y - self.y_mean
        self.dual = x.shape[1] > x.shape[0]
        with blas_threads(1):
            gram = self.xc @ self.xc.T if self.dual else self.xc.T @ self.xc
            evals, self.evecs = np.linalg.eigh(gram)
            # Targets projected once: dual -> V^T Yc (n, k); primal -> V^T Xc^T Yc (D, k).
            self.proj = self.evecs.T @ (self.yc if self.dual else self.xc.T @ self.yc)
        self.evals = np.clip(evals, 0.0, None)

    def scale(self) -> float:
        """trace(Xc^T Xc) / D = n x the mean feature variance: the natural unit of the penalty."""
        return float(self.evals.sum() / self.xc.shape[1]) or 1.0

    def coef(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(W (D, k), b (k,)) for penalty ``alpha`` > 0."""
        if not alpha > 0:
            raise ValueError(f"ridge alpha must be > 0, got {alpha}")
        with blas_threads(1):
            inner = self.evecs @ (self.proj / (self.evals + alpha)[:, None])
            w = self.xc.T @ inner if self.dual else inner
        return w, self.y_mean - self.x_mean @ w

    def predict(self, x_new: np.ndarray, alphas) -> np.ndarray:
        """Predictions (len(alphas), m, k) for x_new (m, D) under each penalty."""
        xn = np.asarray(x_new, dtype=np.float64) - self.x_mean
        with blas_threads(1):
            if self.dual:
                left = (xn @ self.xc.T) @ self.evecs  # (m, n)
            else:
                left = xn @ self.evecs  # (m, D)
            return np.stack([left @ (self.proj / (self.evals + a)[:, None]) + self.y_mean for a in alphas])


def fold_blocks(n: int, n_folds: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of the reference's K-fold scheme (§1.7) over ``n`` samples.

    With b = n // K, fold k tests on [k b, (k+1) b); its "validation" block [n-(k+1) b, n-k b) is left
    out of training as in the reference; training is the rest of range(K b).
    """
    if n < 2 * n_folds:
        raise ValueError(f"{n_folds}-fold cross-validation needs at least {2 * n_folds} samples, got {n}")
    b = n // n_folds
    allidx = np.arange(n_folds * b)
    folds = []
    for k in range(n_folds):
        test = np.arange(k * b, (k + 1) * b)
        val = np.arange(n - (k + 1) * b, n - k * b)
        train = np.setdiff1d(allidx, np.union1d(test, val))
        if len(train) < 2:
            train = np.setdiff1d(allidx, test)
        folds.append((train, test))
    return folds


def median_r2_columns(y: np.ndarray, pred: np.ndarray) -> float:
    """Median over columns (neurons) of the squared Pearson r between y and pred, both (samples, k)."""
    yc = y - y.mean(axis=0)
    pc = pred - pred.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (yc * pc).sum(0) / np.sqrt((yc * yc).sum(0) * (pc * pc).sum(0))
    r2 = r ** 2
    return float(np.nanmedian(r2)) if np.isfinite(r2).any() else float("nan")


#: Ridge penalties tried by cross-validation, relative to ``RidgeSolver.scale()`` (n x mean feature
#: variance), which makes them independent of the feature scale and of the number of samples.
ALPHA_GRID = tuple(float(a) for a in 10.0 ** np.arange(-2.0, 5.01, 0.5))


def resolve_alpha(solver: RidgeSolver, x: np.ndarray, alpha) -> float:
    """Absolute penalty for one member: a number is relative to ``solver.scale()`` when given as
    ``("relative", g)``, absolute when a float; "default" is the reference rule (§2.5)."""
    if isinstance(alpha, tuple) and alpha[0] == "relative":
        return float(alpha[1]) * solver.scale()
    if alpha == "default":
        return default_ridge_alpha(x)
    return float(alpha)


def ridge_cv_predictions(xs, y: np.ndarray, alphas, n_folds: int = 8,
                         seed: int = 314159) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions of the member-averaged ridge ensemble under several penalties.

    xs: a sequence of one (n, D) input per member (it may compute them lazily; it is read once per
        member); y: (n, k) targets; alphas: list of penalties, each an absolute float,
        ``("relative", g)`` (g x the fold's ``RidgeSolver.scale()``) or "default" (§2.5 rule).
    Folds follow §1.7 after a shuffle seeded with ``seed`` (the reference's 314159).
    Returns (index (m,), predictions (len(alphas), m, k)) for the m = K * (n // K) images predicted,
    ``index`` giving their positions in the original order.
    """
    y = np.asarray(y, dtype=np.float64)
    n = y.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    folds = fold_blocks(n, n_folds)
    m = n_folds * (n // n_folds)
    preds = np.zeros((len(alphas), m, y.shape[1]))
    for k in range(len(xs)):
        x = np.asarray(xs[k])
        for train, test in folds:
            xt = x[order[train]]
            solver = RidgeSolver(xt, y[order[train]])
            absolute = [resolve_alpha(solver, xt, a) for a in alphas]
            preds[:, test] += solver.predict(x[order[test]], absolute) / len(xs)
    return order[:m], preds


def choose_ridge_alpha(xs, y: np.ndarray, n_folds: int = 8, seed: int = 314159,
                       grid=ALPHA_GRID) -> tuple[tuple[str, float], float]:
    """The relative penalty from ``grid`` whose K-fold member-averaged prediction has the best median
    raw R² over neurons. Returns (("relative", g), that median R²)."""
    alphas = [("relative", g) for g in grid]
    index, preds = ridge_cv_predictions(xs, y, alphas, n_folds, seed)
    y_oof = np.asarray(y, dtype=np.float64)[index]
    scores = [median_r2_columns(y_oof, p) for p in preds]
    best = int(np.nanargmax(scores))
    log.debug("ridge alpha CV: grid %s -> median R2 %s", list(grid), scores)
    return alphas[best], float(scores[best])

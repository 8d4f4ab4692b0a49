"""The simulated V4 population: farm's embedded default data (no downloads).

Every ground-truth neuron is a small CompactModel (method.md §3.1 at ``image_size`` px) with known
widths K0..K4 (drawn from ``SimulationConfig.filters``):

- kernels: Glorot-uniform draws (Keras' init) smoothed by a Gaussian over their 5x5 extent, so the
  neurons are tuned to shapes, edges and colour rather than to pixel noise;
- BatchNorm: running mean / variance set to the statistics of a calibration batch of natural_like
  images (a gaudy share as in train sessions), layer by layer, so every channel is well scaled
  (eval mode); BN offsets drawn from ``bn_beta`` (>= 0: mostly active units, moderate skew);
- readout: a Gaussian blob (the receptive field) at a random position of the (R, R) readout map
  times one random weight per layer-4 channel; the model output is standardized (mean 0, SD 1
  over the calibration images);
- rate (spikes per 100 ms) = scale * softplus(gain * output + offset), with ``scale`` set so the
  mean rate over the calibration images is the neuron's drawn mean rate.

Spike counts are Poisson draws around the rate, one per repeat; the number of repeats differs
between images (the same for every neuron of a session) and the repeat axis is NaN-padded at the
end, as in the real data (method.md §1.1). Sessions get roles like the real data: the last is
"test", the one before "validation", the others "train". Train sessions mix natural_like images
("normal") with gaudy versions of natural_like images ("gaudy"); validation and test sessions hold
"normal" images only, as the V4 test sessions do (method.md §1.5).

Everything is drawn from ``SimulationConfig.seed``: the same config gives the same arrays.

On disk (``write_population``):

    <out_dir>/sessions/<session_id>.parquet          farm.data.sessions.write_session
    <out_dir>/ground_truth/<session_id>_<i>/         save_compact: spec.json + state_dict.pt
    <out_dir>/population.json                        config, neuron ids, filters, rate parameters
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from farm.files import read_manifest, write_text_atomic
from farm.dataclass_dict import from_dict, to_dict
from farm.data.images import gaudy, gaussian_filter, natural_like
from farm.models.input import recenter
from farm.data.sessions import Session
from farm.models.compact import CompactModel, CompactSpec, build_compact, glorot_limit, load_compact, save_compact
from farm.models.packed import PackedCompact

POPULATION_FILE = "population.json"
POPULATION_FORMAT = "farm-simulated-population"
POPULATION_VERSION = 1

# Independent random streams: np.random.default_rng([seed, stream, index]).
_STREAM_CALIBRATION, _STREAM_NEURON, _STREAM_IMAGES, _STREAM_SPIKES = 1, 2, 3, 4


@dataclass
class SimulationConfig:
    """The simulated population.

    n_neurons: neurons per session. n_sessions: sessions (roles: see ``session_roles``).
    n_images: images per session. image_size: side S in pixels (readout map R = ceil(S / 4)).
    repeats: (min, max) repeats per image, inclusive; drawn uniformly per image.
    mean_rate: (min, max) of a neuron's mean rate over natural_like images, spikes per 100 ms.
    filters: (min, max) filters per layer of a ground-truth neuron, inclusive, drawn per layer.
    gaudy_fraction: share of gaudy images in train sessions.
    kernel_sigma: SD in pixels of the Gaussian that smooths the random 5x5 kernels.
    rf_sigma: (min, max) SD of the receptive-field blob, in readout-map pixels.
    rf_extent: the blob centre is drawn from the central ``rf_extent`` fraction of the readout map.
    bn_beta: (min, max) of the BN offsets (in SDs of each channel's input): the share of active
        ReLU units; >= 0 keeps responses from being dominated by a few images.
    gain, offset: (min, max) of the rate nonlinearity parameters (see the module docstring).
    n_calibration: natural_like images used to set BN statistics, standardization and rate scale.
    seed: all randomness derives from it.
    """

    n_neurons: int = 20
    n_sessions: int = 3
    n_images: int = 1000
    image_size: int = 64
    repeats: tuple[int, int] = (2, 6)
    mean_rate: tuple[float, float] = (1.0, 10.0)
    filters: tuple[int, int] = (3, 12)
    gaudy_fraction: float = 0.2
    kernel_sigma: float = 1.0
    rf_sigma: tuple[float, float] = (1.0, 2.5)
    rf_extent: float = 0.5
    bn_beta: tuple[float, float] = (0.0, 1.0)
    gain: tuple[float, float] = (0.6, 1.2)
    offset: tuple[float, float] = (0.0, 1.0)
    n_calibration: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("repeats", "mean_rate", "filters", "rf_sigma", "bn_beta", "gain", "offset"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"SimulationConfig.{name} must be a (min, max) pair with min <= max, "
                                 f"got {getattr(self, name)}")
            setattr(self, name, value)
        for name in ("n_neurons", "n_sessions", "n_images", "n_calibration"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SimulationConfig.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.seed) < 0:
            raise ValueError(f"SimulationConfig.seed must be >= 0, got {self.seed}")
        if self.image_size < 8:
            raise ValueError(f"SimulationConfig.image_size must be >= 8, got {self.image_size}")
        if self.repeats[0] < 1:
            raise ValueError(f"SimulationConfig.repeats: every image needs >= 1 repeat, got {self.repeats}")
        if self.filters[0] < 1:
            raise ValueError(f"SimulationConfig.filters must be >= 1, got {self.filters}")
        if self.mean_rate[0] <= 0:
            raise ValueError(f"SimulationConfig.mean_rate must be > 0, got {self.mean_rate}")
        if not 0 <= self.gaudy_fraction <= 1:
            raise ValueError(f"SimulationConfig.gaudy_fraction must be in [0, 1], got {self.gaudy_fraction}")
        if not 0 <= self.rf_extent <= 1:
            raise ValueError(f"SimulationConfig.rf_extent must be in [0, 1], got {self.rf_extent}")
        if self.kernel_sigma < 0 or self.rf_sigma[0] <= 0:
            raise ValueError("SimulationConfig.kernel_sigma must be >= 0 and rf_sigma > 0")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SimulationConfig":
        return from_dict(cls, d)


def session_roles(n_sessions: int) -> list[str]:
    """Roles like the real data: last "test", the one before "validation", the rest "train".

    1 session: ["test"]; 2: ["train", "test"]; 3: ["train", "validation", "test"]; ...
    """
    if n_sessions < 1:
        raise ValueError(f"n_sessions must be >= 1, got {n_sessions}")
    if n_sessions == 1:
        return ["test"]
    if n_sessions == 2:
        return ["train", "test"]
    return ["train"] * (n_sessions - 2) + ["validation", "test"]


def session_ids(n_sessions: int) -> list[str]:
    return [f"sim{s}" for s in range(n_sessions)]


def neuron_dirname(neuron_id: str) -> str:
    """Folder name of a neuron's ground truth: ':' is not portable in file names."""
    return neuron_id.replace(":", "_")


# ---------------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RateParams:
    """rate = scale * softplus(gain * model_output + offset), spikes per 100 ms."""

    gain: float
    offset: float
    scale: float


#: Most neurons packed into one network (the block-diagonal pointwise convs grow with its square),
#: and the most layer-0 activations (floats) of one pack per batch.
_PACK_NEURONS = 16
_PACK_ELEMENTS = 1 << 25


def _memory_groups(models: Sequence[CompactModel], per_channel: int) -> list[list[CompactModel]]:
    """Consecutive groups of at most _PACK_NEURONS models whose layer-0 activations
    (sum K0 * per_channel floats) stay under _PACK_ELEMENTS; a group has at least one model."""
    groups, current, channels = [], [], 0
    for m in models:
        k0 = m.spec.filters[0]
        if current and (len(current) == _PACK_NEURONS or (channels + k0) * per_channel > _PACK_ELEMENTS):
            groups.append(current)
            current, channels = [], 0
        current.append(m)
        channels += k0
    if current:
        groups.append(current)
    return groups


class GroundTruth:
    """The simulated neurons as a Teacher: ``predict(images)`` gives their true rates.

    models: one CompactModel per neuron (output = standardized drive). neuron_ids: ids in column
    order. rate_params: one RateParams per neuron. device: where the models run. The models are
    evaluated packed together (``farm.models.packed.PackedCompact``, BN folded); each model alone
    gives the same drive up to float rounding.
    """

    def __init__(self, models: Sequence[CompactModel], neuron_ids: Sequence[str],
                 rate_params: Sequence[RateParams], device: str | torch.device = "cpu"):
        if not len(models) == len(neuron_ids) == len(rate_params):
            raise ValueError(f"GroundTruth: {len(models)} models, {len(neuron_ids)} neuron ids and "
                             f"{len(rate_params)} rate parameters; they must match")
        if not models:
            raise ValueError("GroundTruth needs at least one neuron")
        self.device = torch.device(device)
        self.models = [m.to(self.device).eval() for m in models]
        self.neuron_ids = tuple(neuron_ids)
        self.rate_params = tuple(rate_params)
        self.image_size = self.models[0].spec.image_size
        self._gain = torch.tensor([p.gain for p in rate_params], dtype=torch.float32, device=self.device)
        self._offset = torch.tensor([p.offset for p in rate_params], dtype=torch.float32, device=self.device)
        self._scale = torch.tensor([p.scale for p in rate_params], dtype=torch.float32, device=self.device)
        self._packs = [(s, PackedCompact(self.models[s:s + _PACK_NEURONS]).fold_())
                       for s in range(0, len(self.models), _PACK_NEURONS)]

    @property
    def filters(self) -> dict[str, tuple[int, ...]]:
        """True widths (K0, ..., K4) per neuron id."""
        return {nid: m.spec.filters for nid, m in zip(self.neuron_ids, self.models)}

    @property
    def filter_counts(self) -> dict[str, int]:
        """True filter count 2*K0 + K1 + K2 + K3 + K4 (method.md §3.2) per neuron id."""
        return {nid: m.filter_count() for nid, m in zip(self.neuron_ids, self.models)}

    def subset(self, neuron_ids: Sequence[str]) -> "GroundTruth":
        """A GroundTruth of the given neurons only, in that order."""
        where = {nid: i for i, nid in enumerate(self.neuron_ids)}
        missing = [nid for nid in neuron_ids if nid not in where]
        if missing:
            raise KeyError(f"GroundTruth.subset(): unknown neuron ids {missing[:5]}")
        idx = [where[nid] for nid in neuron_ids]
        return GroundTruth([self.models[i] for i in idx], list(neuron_ids),
                           [self.rate_params[i] for i in idx], self.device)

    def drive(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Standardized model outputs before the rate nonlinearity, float32 (N, neurons)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size} px for these neurons, "
                             f"got {images.shape[1]}x{images.shape[2]}")
        out = np.empty((len(images), len(self.models)), dtype=np.float32)
        with torch.inference_mode():
            for first, pack in self._packs:
                per_image = sum(pack.widths[0]) * self.image_size ** 2
                step = max(1, min(batch_size, _PACK_ELEMENTS // per_image))
                cols = slice(first, first + pack.n)
                for s in range(0, len(images), step):
                    out[s:s + step, cols] = pack.infer(recenter(images[s:s + step], self.device)).cpu().numpy()
        return out

    def rates(self, drive: np.ndarray) -> np.ndarray:
        """The rate nonlinearity: drive (N, neurons) -> spikes per 100 ms, float32 (N, neurons)."""
        z = torch.as_tensor(drive, dtype=torch.float32, device=self.device)
        return (self._scale * F.softplus(self._gain * z + self._offset)).cpu().numpy()

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """True rates, spikes per 100 ms: uint8 (N, S, S, 3) -> float32 (N, neurons)."""
        return self.rates(self.drive(images, batch_size))


def _smooth_kernels(w: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth (..., 5, 5) kernels over their spatial axes, keeping each kernel's norm."""
    if sigma <= 0:
        return w
    smooth = gaussian_filter(w, sigma, axes=(-2, -1))
    norm_in = np.sqrt((w ** 2).sum(axis=(-2, -1), keepdims=True))
    norm_out = np.sqrt((smooth ** 2).sum(axis=(-2, -1), keepdims=True)) + 1e-12
    return smooth * norm_in / norm_out


def _glorot(rng: np.random.Generator, shape, fan_in: int, fan_out: int) -> np.ndarray:
    """``glorot_uniform_``'s draw from a NumPy generator (the population is drawn in NumPy)."""
    limit = glorot_limit(fan_in, fan_out)
    return rng.uniform(-limit, limit, shape)


@dataclass
class _Draw:
    """A neuron's random draws besides its weights."""

    model: CompactModel
    gain: float
    offset: float
    target_rate: float


def _draw_neuron(neuron_id: str, config: SimulationConfig, rng: np.random.Generator) -> _Draw:
    """A ground-truth neuron's architecture, smooth kernels, BN offsets, receptive field and rate
    parameters; BN statistics and output scale are set later by ``_calibrate``."""
    lo, hi = config.filters
    widths = tuple(int(k) for k in rng.integers(lo, hi + 1, 5))
    spec = CompactSpec(filters=widths, image_size=config.image_size, readout="dense",
                       output_units="standardized", neuron_ids=(neuron_id,))
    model = build_compact(spec, seed=0).eval()  # every weight is replaced below, from ``rng``
    ks, rf = spec.kernel_size, spec.kernel_size ** 2
    sigma = config.kernel_sigma

    def put(param: torch.Tensor, value: np.ndarray) -> None:
        param.copy_(torch.as_tensor(value, dtype=torch.float32).reshape(param.shape))

    with torch.no_grad():
        put(model.layer0_conv.weight,
            _smooth_kernels(_glorot(rng, (widths[0], 3, ks, ks), 3 * rf, widths[0] * rf), sigma))
        model.layer0_conv.bias.zero_()
        for l in range(1, 5):
            k_in, k_out = widths[l - 1], widths[l]
            put(model.depthwise(l).weight, _smooth_kernels(_glorot(rng, (k_in, 1, ks, ks), k_in * rf, rf), sigma))
            put(model.pointwise(l).weight, _glorot(rng, (k_out, k_in, 1, 1), k_in, k_out))
            model.pointwise(l).bias.zero_()
        for l in range(5):
            # BN offsets >= 0 keep most ReLU units active: sparse channels compound over 5 layers into
            # heavy-tailed responses that a few images dominate, which are hard to learn from samples
            model.bn(l).weight.fill_(1.0)
            put(model.bn(l).bias, rng.uniform(*config.bn_beta, widths[l]))

        # receptive field: a Gaussian blob at a random place of the readout map, one weight per channel
        r = spec.readout_size
        margin = (1 - config.rf_extent) / 2 * (r - 1)
        cy, cx = rng.uniform(margin, r - 1 - margin, 2)
        rf_sd = rng.uniform(*config.rf_sigma)
        yy, xx = np.mgrid[0:r, 0:r]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rf_sd ** 2))
        put(model.readout.weight, blob[:, :, None] * rng.standard_normal(widths[4])[None, None, :])
        model.readout.bias.zero_()
    return _Draw(model=model, gain=float(rng.uniform(*config.gain)), offset=float(rng.uniform(*config.offset)),
                 target_rate=float(rng.uniform(*config.mean_rate)))


def _calibrate(draws: Sequence[_Draw], calibration: torch.Tensor) -> list[RateParams]:
    """Set BN running statistics layer by layer from the calibration images (recentered
    (n, 3, S, S)), standardize each output over them, and fit each rate scale to its target mean."""
    models = [d.model for d in draws]
    zs = []
    with torch.no_grad():
        per_channel = calibration.shape[0] * calibration.shape[2] * calibration.shape[3]
        for group in _memory_groups(models, per_channel):
            pack = PackedCompact(group).fold_()
            x = calibration.contiguous(memory_format=torch.channels_last)
            for l in range(5):
                pre = pack.layer_pre(l, x)
                mean = pre.mean(dim=(0, 2, 3), keepdim=True)
                # two passes, not var_mean: it is very slow on channels-last tensors
                var = (pre - mean).square_().mean(dim=(0, 2, 3))
                pack.bns[l].running_mean.copy_(mean.flatten())
                pack.bns[l].running_var.copy_(var)
                pack.write_bn_to(group, l)
                pack.refresh_bn(l)
                x = pack.layer_act(l, pre)
                del pre
            out = pack.head(x)
            mean, sd = out.mean(dim=0), out.std(dim=0, unbiased=False).clamp_min(1e-8)
            for i, m in enumerate(group):
                m.readout.weight.div_(sd[i])
                m.readout.bias.copy_((m.readout.bias - mean[i]) / sd[i])
            zs.append(((out - mean) / sd).double().numpy())
    z = np.concatenate(zs, axis=1)
    params = []
    for i, d in enumerate(draws):
        mean_softplus = float(np.mean(np.logaddexp(0.0, d.gain * z[:, i] + d.offset)))
        params.append(RateParams(gain=d.gain, offset=d.offset, scale=d.target_rate / mean_softplus))
    return params


# ---------------------------------------------------------------------------------------------------
# Population
# ---------------------------------------------------------------------------------------------------

@dataclass
class SimulatedPopulation:
    """sessions: one Session per simulated session. ground_truth: every neuron, all sessions.
    true_rates: session id -> float32 (neurons, images), the rates the spike counts were drawn from."""

    config: SimulationConfig
    sessions: list[Session]
    ground_truth: GroundTruth
    true_rates: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def neuron_ids(self) -> tuple[str, ...]:
        return self.ground_truth.neuron_ids


def _calibration_images(config: SimulationConfig) -> np.ndarray:
    """natural_like images, a ``gaudy_fraction`` of them gaudy as in train sessions, so that BN
    statistics and rate scales cover both kinds and gaudy images do not drive extreme rates."""
    rng = np.random.default_rng([config.seed, _STREAM_CALIBRATION])
    images = natural_like(config.image_size, config.n_calibration, rng)
    n_gaudy = int(round(config.gaudy_fraction * config.n_calibration))
    images[:n_gaudy] = gaudy(images[:n_gaudy])
    return images


def _session_images(config: SimulationConfig, index: int, role: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([config.seed, _STREAM_IMAGES, index])
    n, size = config.n_images, config.image_size
    images = natural_like(size, n, rng)
    kinds = np.full(n, "normal", dtype=object)
    if role == "train" and config.gaudy_fraction > 0:
        n_gaudy = int(round(config.gaudy_fraction * n))
        where = np.sort(rng.choice(n, n_gaudy, replace=False))
        images[where] = gaudy(images[where])
        kinds[where] = "gaudy"
    return images, kinds


def _spike_counts(rates: np.ndarray, repeats: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Poisson counts float32 (neurons, images, max repeats), NaN after each image's repeat count."""
    n_neurons, n_images = rates.shape
    counts_per_image = rng.integers(repeats[0], repeats[1] + 1, n_images)
    width = int(counts_per_image.max())
    spikes = rng.poisson(rates[:, :, None].astype(np.float64), (n_neurons, n_images, width)).astype(np.float32)
    spikes[:, np.arange(width)[None, :] >= counts_per_image[:, None]] = np.nan
    return spikes


def simulate_population(config: SimulationConfig | None = None, device: str | torch.device = "cpu",
                        progress: Callable[[int, int], None] | None = None) -> SimulatedPopulation:
    """Simulate the population described by ``config`` (default: SimulationConfig()).

    device: where the ground-truth models run (results are meant for CPU; other devices may differ
    in the last float bits). progress(sessions_done, n_sessions) is called after each session.
    Deterministic: the same config gives the same sessions, models and rates.
    """
    config = config or SimulationConfig()
    calibration = recenter(_calibration_images(config))
    roles = session_roles(config.n_sessions)
    sessions, models, params, rates_by_session = [], [], [], {}
    for s, (sid, role) in enumerate(zip(session_ids(config.n_sessions), roles)):
        draws = [_draw_neuron(f"{sid}:{i}", config, np.random.default_rng([config.seed, _STREAM_NEURON, s, i]))
                 for i in range(config.n_neurons)]
        session_params = _calibrate(draws, calibration)
        session_models = [d.model for d in draws]
        images, kinds = _session_images(config, s, role)
        truth = GroundTruth(session_models, [m.spec.neuron_ids[0] for m in session_models], session_params, device)
        rates = truth.predict(images).T.copy()  # (neurons, images)
        spikes = _spike_counts(rates, config.repeats, np.random.default_rng([config.seed, _STREAM_SPIKES, s]))
        sessions.append(Session(
            session_id=sid, images=images, responses=spikes, image_kinds=kinds, role=role,
            has_repeats=True, animal="sim", neuron_ids=truth.neuron_ids,
            metadata={"simulated": True, "seed": config.seed, "units": "spikes per 100 ms"},
        ).validate(source=f"simulated session {sid}"))
        rates_by_session[sid] = rates
        models.extend(session_models)
        params.extend(session_params)
        if progress is not None:
            progress(s + 1, config.n_sessions)
    ids = [m.spec.neuron_ids[0] for m in models]
    return SimulatedPopulation(config=config, sessions=sessions,
                               ground_truth=GroundTruth(models, ids, params, device),
                               true_rates=rates_by_session)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def write_population(pop: SimulatedPopulation, out_dir: str | Path) -> Path:
    """Write sessions, ground-truth models and population.json into ``out_dir`` (layout in the
    module docstring). Each file is written atomically; population.json comes last, so its presence
    means the population is complete. Returns ``out_dir``."""
    from farm.data.sessions import write_session

    out = Path(out_dir)
    (out / "sessions").mkdir(parents=True, exist_ok=True)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    for session in pop.sessions:
        write_session(session, out / "sessions" / f"{session.session_id}.parquet")
    truth = pop.ground_truth
    for nid, model in zip(truth.neuron_ids, truth.models):
        save_compact(model, out / "ground_truth" / neuron_dirname(nid))
    manifest = {
        "format": POPULATION_FORMAT,
        "version": POPULATION_VERSION,
        "config": pop.config.to_dict(),
        "sessions": [{"session_id": s.session_id, "role": s.role, "file": f"sessions/{s.session_id}.parquet",
                      "neuron_ids": list(s.neuron_ids)} for s in pop.sessions],
        "neurons": [{"neuron_id": nid, "ground_truth": f"ground_truth/{neuron_dirname(nid)}",
                     "filters": list(m.spec.filters), "filter_count": m.filter_count(),
                     "rate": asdict(p)}
                    for nid, m, p in zip(truth.neuron_ids, truth.models, truth.rate_params)],
        "rate_formula": "rate = scale * softplus(gain * output + offset), spikes per 100 ms",
    }
    write_text_atomic(out / POPULATION_FILE, json.dumps(manifest, indent=2))
    return out


def _read_manifest(out_dir: Path) -> dict:
    return read_manifest(out_dir / POPULATION_FILE, ("format", POPULATION_FORMAT), ("version", POPULATION_VERSION),
                         "simulated population", "see write_population")


def load_ground_truth(out_dir: str | Path, device: str | torch.device = "cpu") -> GroundTruth:
    """The ground truth written by ``write_population``, as a Teacher of true rates."""
    out = Path(out_dir)
    manifest = _read_manifest(out)
    models, ids, params = [], [], []
    try:
        for entry in manifest["neurons"]:
            model = load_compact(out / entry["ground_truth"], map_location=device)
            if list(model.spec.filters) != list(entry["filters"]):
                raise ValueError(f"{out / entry['ground_truth']}: filters {model.spec.filters} differ from "
                                 f"population.json ({entry['filters']})")
            models.append(model)
            ids.append(entry["neuron_id"])
            params.append(RateParams(**entry["rate"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{out / POPULATION_FILE}: corrupt neuron entry: {e!r}") from e
    return GroundTruth(models, ids, params, device)


def load_population(out_dir: str | Path, device: str | torch.device = "cpu") -> SimulatedPopulation:
    """Sessions, ground truth and config written by ``write_population``; true rates recomputed."""
    from farm.data.sessions import read_session

    out = Path(out_dir)
    manifest = _read_manifest(out)
    config = SimulationConfig.from_dict(manifest["config"])
    truth = load_ground_truth(out, device)
    sessions = [read_session(out / s["file"]) for s in manifest["sessions"]]
    rates = {s.session_id: truth.subset(s.neuron_ids).predict(s.images).T.copy() for s in sessions}
    return SimulatedPopulation(config=config, sessions=sessions, ground_truth=truth, true_rates=rates)

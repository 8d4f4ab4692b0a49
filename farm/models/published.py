"""Loaders for the paper's published compact models (method.md §3, §8).

Two formats, both turned into a float32 ``CompactModel`` in eval mode whose forward pass is the Keras
model's (BN eps 1e-3 with the Keras moving variances, Keras 'same' padding, NHWC flatten order):

- per-neuron compact models, ``compact_models/models_torch/compact_model_<SESSION>_neuron<i>.pt``:
  float64 state_dicts of the authors' PyTorch port (method.md §8.1), with their widths in
  ``compact_models/nums_filters/<same stem>.npy``. ``load_published_compact``, ``load_published_session``.
- shared compact models, ``shared_compact_models/<variant>/shared_compact_model_<N>filters.keras``: one
  network with 219 outputs (method.md §8.2), a Keras 3 zip read with zipfile + h5py (no TensorFlow).
  ``load_shared_compact``.

``published_compact_teacher`` and ``shared_compact_teacher`` wrap them as a ``Teacher``; ``SelectOutputs``
restricts any Teacher to some of its neurons.

Example (``published`` = the folder described in its README.md)::

    models = load_published_session(published, "190923")            # 33 CompactModels, neuron order
    path = shared_compact_path(published, "from_ensemble_model", 200)
    teacher = shared_compact_teacher(path, sessions="190923")       # predict(images) -> (N, 33)
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from farm.files import load_state_dict
from farm.models.base import CompactTeacher, Teacher
from farm.models.compact import CompactModel, CompactSpec

log = logging.getLogger(__name__)

#: Test sessions and their neuron counts, in the order of the shared models' outputs (method.md §8.2).
TEST_SESSIONS = ("190923", "201025", "210225", "211022")
TEST_SESSION_NEURONS = (33, 89, 55, 42)
#: Neuron id of each of the 219 outputs of a published shared compact model.
SHARED_NEURON_IDS = tuple(f"{s}:{i}" for s, n in zip(TEST_SESSIONS, TEST_SESSION_NEURONS) for i in range(n))

#: The authors' PyTorch port stores running_var = Keras moving variance + this, for layers 1-4 only
#: (to make up for PyTorch's eps 1e-5 against Keras's 1e-3; method.md §8.1).
TORCH_PORT_VAR_SHIFT = 1e-3

#: The shared models fitted to V4 responses directly (no teacher); their outputs are spike counts.
DIRECT_FIT_VARIANT = "from_V4data_direct_fit"

_PT_NAME = re.compile(r"^compact_model_(\d+)_neuron(\d+)\.pt$")
_KERNEL = CompactSpec.kernel_size


# ---------------------------------------------------------------------------------------------------
# per-neuron models (.pt)
# ---------------------------------------------------------------------------------------------------

def _torch_port_shapes(filters: Sequence[int], n_features: int) -> dict[str, tuple[int, ...]]:
    """Expected key -> shape of an authors' PyTorch-port state_dict with widths K0..K4."""
    k, ks = filters, _KERNEL
    shapes: dict[str, tuple[int, ...]] = {
        "layers.layer0_conv.weight": (k[0], 3, ks, ks),
        "layers.layer0_conv.bias": (k[0],),
        "layers.Beta.weight": (1, n_features),
        "layers.Beta.bias": (1,),
    }
    for l in range(1, 5):
        shapes[f"layers.layer{l}_conv_depth.weight"] = (k[l - 1], 1, ks, ks)
        shapes[f"layers.layer{l}_conv_point.weight"] = (k[l], k[l - 1], 1, 1)
        shapes[f"layers.layer{l}_conv_point.bias"] = (k[l],)
    for l in range(5):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"layers.layer{l}_bn.{name}"] = (k[l],)
        shapes[f"layers.layer{l}_bn.num_batches_tracked"] = ()
    return shapes


def _read_torch_port(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such published compact model file")
    sd = load_state_dict(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(sd).__name__}")
    return sd


def _filters_of_torch_port(sd: dict[str, torch.Tensor], path: Path) -> tuple[tuple[int, ...], int]:
    """Widths (K0..K4) and readout side R from the weight shapes; checks every key and shape."""
    try:
        k0 = sd["layers.layer0_conv.weight"].shape[0]
        ks = [k0] + [sd[f"layers.layer{l}_conv_point.weight"].shape[0] for l in range(1, 5)]
        n_features = sd["layers.Beta.weight"].shape[-1]
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e.args[0]!r}; not a published compact model state_dict") from e
    if min(ks) < 1:
        raise ValueError(f"{path}: layer widths {ks} must all be >= 1")
    expected = _torch_port_shapes(ks, n_features)
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: state_dict keys differ from a published compact model's: "
                         f"missing {missing}, unexpected {extra}")
    wrong = {key: (tuple(sd[key].shape), shape) for key, shape in expected.items() if tuple(sd[key].shape) != shape}
    if wrong:
        raise ValueError(f"{path}: inconsistent weight shapes (got, expected): {wrong}")
    side = math.isqrt(n_features // ks[4])
    if side * side * ks[4] != n_features:
        raise ValueError(f"{path}: layers.Beta.weight has {n_features} inputs, not R*R*K4 with K4={ks[4]}")
    return tuple(int(k) for k in ks), side


def _read_nums_filters(path: Path) -> tuple[int, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such nums_filters file")
    try:
        nf = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from e
    if nf.shape != (5,) or not np.issubdtype(nf.dtype, np.integer):
        raise ValueError(f"{path}: nums_filters must be 5 integers [K0..K4], got dtype {nf.dtype} shape {nf.shape}")
    return tuple(int(k) for k in nf)


def load_published_compact(pt_path: str | Path, nums_filters_path: str | Path | None = None) -> CompactModel:
    """One published per-neuron compact model (method.md §8.1) as a float32 CompactModel, eval mode.

    pt_path: ``compact_model_<SESSION>_neuron<i>.pt``, a float64 state_dict of the authors' PyTorch port;
      the name gives ``spec.neuron_ids = ("<SESSION>:<i>",)`` (i = row of that session's responses).
    nums_filters_path: optional ``.npy`` [K0..K4]; when given it must agree with the weight shapes.

    The output is one value per image in the teacher's standardized units (``output_units``
    "standardized"). BatchNorm: the port stored ``running_var`` = Keras variance + 1e-3 in layers 1-4,
    and the Keras variance itself in layer 0, to be used with PyTorch's eps 1e-5 (method.md §8.1). Here
    layers 1-4 get the shift removed and layer 0 is kept, so CompactModel's eps 1e-3 gives the Keras
    model exactly. The authors' port itself differs from Keras: layer 0's eps alone changes outputs by
    < 1e-4 relative (variances ~1e2-1e4); with the layers 1-4 eps as well, max |difference| / max |output|
    on 8 noise images was median 0.5 %, max 6 % over the 33 models of 190923 (layers 3-4 have Keras
    variances down to ~1e-5, comparable to the eps).
    """
    path = Path(pt_path)
    name = _PT_NAME.match(path.name)
    if name is None:
        raise ValueError(f"{path}: expected a file named compact_model_<SESSION>_neuron<i>.pt")
    session, index = name.group(1), int(name.group(2))
    sd = _read_torch_port(path)
    filters, side = _filters_of_torch_port(sd, path)
    if nums_filters_path is not None:
        nf = _read_nums_filters(Path(nums_filters_path))
        if nf != filters:
            raise ValueError(f"{nums_filters_path}: nums_filters {list(nf)} disagree with the weight shapes "
                             f"{list(filters)} of {path}")

    spec = CompactSpec(filters=filters, image_size=4 * side, readout="dense", n_outputs=1, activation=True,
                       output_units="standardized", neuron_ids=(f"{session}:{index}",))

    state = {
        "layer0_conv.weight": sd["layers.layer0_conv.weight"],
        "layer0_conv.bias": sd["layers.layer0_conv.bias"],
        "readout.weight": sd["layers.Beta.weight"],  # already in NHWC flatten order
        "readout.bias": sd["layers.Beta.bias"],
    }
    for l in range(1, 5):
        state[f"layer{l}_depth.weight"] = sd[f"layers.layer{l}_conv_depth.weight"]
        state[f"layer{l}_point.weight"] = sd[f"layers.layer{l}_conv_point.weight"]
        state[f"layer{l}_point.bias"] = sd[f"layers.layer{l}_conv_point.bias"]
    for l in range(5):
        for key in ("weight", "bias", "running_mean", "num_batches_tracked"):
            state[f"layer{l}_bn.{key}"] = sd[f"layers.layer{l}_bn.{key}"]
        var = sd[f"layers.layer{l}_bn.running_var"]
        if l > 0:
            var = var - TORCH_PORT_VAR_SHIFT
            if (var < -1e-7).any():
                raise ValueError(f"{path}: layers.layer{l}_bn.running_var has values below "
                                 f"{TORCH_PORT_VAR_SHIFT}; expected the authors' port (Keras variance + "
                                 f"{TORCH_PORT_VAR_SHIFT})")
            var = var.clamp_min(0.0)
        state[f"layer{l}_bn.running_var"] = var
    state = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()}

    model = CompactModel(spec)
    model.load_state_dict(state)
    return model.eval()


def load_published_session(published_dir: str | Path, session: str = "190923") -> list[CompactModel]:
    """All published per-neuron compact models of one session, sorted by neuron index (0, 1, ...).

    published_dir: the published-models folder (holding ``compact_models/models_torch`` and
    ``compact_models/nums_filters``). Every model's nums_filters file must exist and agree.
    """
    root = Path(published_dir)
    torch_dir = root / "compact_models" / "models_torch"
    nf_dir = root / "compact_models" / "nums_filters"
    by_index: dict[int, Path] = {}
    for p in torch_dir.glob(f"compact_model_{session}_neuron*.pt"):
        m = _PT_NAME.match(p.name)
        if m is not None and m.group(1) == str(session):
            by_index[int(m.group(2))] = p
    if not by_index:
        raise FileNotFoundError(f"{torch_dir}: no compact_model_{session}_neuron<i>.pt files")
    missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
    if missing:
        raise ValueError(f"{torch_dir}: session {session} lacks the models of neurons {missing}")
    return [load_published_compact(by_index[i], nf_dir / (by_index[i].stem + ".npy")) for i in sorted(by_index)]


# ---------------------------------------------------------------------------------------------------
# shared models (.keras)
# ---------------------------------------------------------------------------------------------------

#: h5 group names Keras 3 gives each layer class (snake case, then _1, _2, ... in creation order).
_H5_CLASS_NAMES = {
    "InputLayer": "input_layer", "Conv2D": "conv2d", "BatchNormalization": "batch_normalization",
    "Activation": "activation", "SeparableConv2D": "separable_conv2d", "DepthwiseConv2D": "depthwise_conv2d",
    "Flatten": "flatten",
}


def shared_compact_path(published_dir: str | Path, variant: str = "from_ensemble_model", n_filters: int = 200) -> Path:
    """Path of a published shared compact model: ``shared_compact_models/<variant>/..._<N>filters.keras``."""
    return Path(published_dir) / "shared_compact_models" / variant / f"shared_compact_model_{n_filters}filters.keras"


def _expected_shared_layers(activation: bool) -> list[tuple[str, str]]:
    layers = [("image_input", "InputLayer")]
    for l in range(5):
        layers.append((f"layer{l}_conv", "Conv2D" if l == 0 else "SeparableConv2D"))
        layers.append((f"layer{l}_bn", "BatchNormalization"))
        if activation:
            layers.append((f"layer{l}_act", "Activation"))
    layers += [("mixing_stage", "Conv2D"), ("spatial_pool_stage", "DepthwiseConv2D"), ("output_responses", "Flatten")]
    return layers


def _check_cfg(path: Path, layer: str, cfg: dict, expected: dict) -> None:
    bad = {key: (cfg.get(key, "<absent>"), want) for key, want in expected.items() if cfg.get(key, "<absent>") != want}
    if bad:
        raise ValueError(f"{path}: config.json layer {layer!r} differs from a shared compact model's "
                         f"(got, expected): {bad}")


def _parse_shared_config(config: dict, path: Path) -> tuple[int, bool, list[tuple[str, str]]]:
    """Check the layer graph in config.json; return (image size, activation, [(layer name, class)])."""
    try:
        layers = config["config"]["layers"]
        found = [(L["name"], L["class_name"]) for L in layers]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: config.json has no functional layer list ({e!r})") from e
    activation = any(name.endswith("_act") for name, _ in found)
    expected = _expected_shared_layers(activation)
    if found != expected:
        raise ValueError(f"{path}: config.json layers {found} are not a shared compact model's {expected}")
    # a plain chain: every layer reads the previous one
    for prev, L in zip(layers, layers[1:]):
        try:
            inbound = [a["config"]["keras_history"][0] for node in L["inbound_nodes"] for a in node["args"]]
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{path}: config.json layer {L['name']!r} has unreadable inbound nodes") from e
        if inbound != [prev["name"]]:
            raise ValueError(f"{path}: config.json layer {L['name']!r} reads {inbound}, expected [{prev['name']!r}]")

    cfg = {L["name"]: L["config"] for L in layers}
    shape = cfg["image_input"].get("batch_shape")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1] == shape[2] and shape[3] == 3):
        raise ValueError(f"{path}: config.json image_input batch_shape {shape}, expected [null, S, S, 3]")
    image_size = int(shape[1])
    conv = {"kernel_size": [_KERNEL, _KERNEL], "padding": "same", "activation": "linear", "use_bias": True,
            "data_format": "channels_last", "dilation_rate": [1, 1]}
    for l in range(5):
        stride = CompactSpec.strides[l]
        extra = {"groups": 1} if l == 0 else {"depth_multiplier": 1}
        _check_cfg(path, f"layer{l}_conv", cfg[f"layer{l}_conv"], {**conv, **extra, "strides": [stride, stride]})
        bn = cfg[f"layer{l}_bn"]
        _check_cfg(path, f"layer{l}_bn", bn, {"center": True, "scale": True})
        if bn.get("axis") not in (-1, 3, [3], [-1]):
            raise ValueError(f"{path}: config.json layer{l}_bn normalizes axis {bn.get('axis')}, expected channels (-1)")
        if not math.isclose(float(bn.get("epsilon", float("nan"))), CompactSpec.bn_eps, rel_tol=1e-6):
            raise ValueError(f"{path}: config.json layer{l}_bn epsilon {bn.get('epsilon')}, "
                             f"CompactModel uses {CompactSpec.bn_eps}")
        if activation:
            _check_cfg(path, f"layer{l}_act", cfg[f"layer{l}_act"], {"activation": "relu"})
    _check_cfg(path, "mixing_stage", cfg["mixing_stage"],
               {**conv, "kernel_size": [1, 1], "strides": [1, 1], "groups": 1})
    side = CompactSpec(image_size=image_size).readout_size
    _check_cfg(path, "spatial_pool_stage", cfg["spatial_pool_stage"],
               {"kernel_size": [side, side], "strides": [1, 1], "padding": "valid", "activation": "linear",
                "use_bias": True, "depth_multiplier": 1, "data_format": "channels_last"})
    return image_size, activation, found


def _read_h5_vars(h5: h5py.File, layers: list[tuple[str, str]], path: Path) -> dict[str, list[np.ndarray]]:
    """Config layer name -> its weight arrays, following Keras 3's per-class group naming."""
    counters: dict[str, int] = {}
    out: dict[str, list[np.ndarray]] = {}
    for name, cls in layers:
        base = _H5_CLASS_NAMES[cls]
        n = counters.get(base, 0)
        counters[base] = n + 1
        group_name = f"layers/{base}" + (f"_{n}" if n else "")
        if group_name not in h5:
            if cls in ("InputLayer", "Activation", "Flatten"):
                continue  # weightless; Keras may or may not write an empty group
            raise ValueError(f"{path}: model.weights.h5 lacks group {group_name!r} (layer {name!r})")
        vars_group = h5[group_name].get("vars")
        n_vars = len(vars_group) if vars_group is not None else 0
        out[name] = [np.asarray(vars_group[str(i)][()]) for i in range(n_vars)]
    used = {f"{base}_{i}" if i else base for base, n in counters.items() for i in range(n)}
    stray = sorted(g for g, grp in h5.get("layers", {}).items()
                   if g not in used and isinstance(grp, h5py.Group) and len(grp.get("vars", {})))
    if stray:
        raise ValueError(f"{path}: model.weights.h5 holds weights of layers not in config.json: {stray}")
    return out


def load_shared_compact(
    keras_path: str | Path,
    neuron_ids: Sequence[str] | None = None,
    output_units: str | None = None,
) -> CompactModel:
    """A published shared compact model (method.md §8.2) as a float32 CompactModel, eval mode.

    keras_path: ``shared_compact_model_<N>filters.keras``, a zip of ``config.json`` + ``model.weights.h5``.
    neuron_ids: the neuron of each output; default: the published order (``SHARED_NEURON_IDS``, 219
      outputs: 190923 0-32, 201025 0-88, 210225 0-54, 211022 0-41).
    output_units: recorded in the spec; the files do not say. Default: "spikes/100ms" for a file in a
      ``from_V4data_direct_fit`` folder (fitted to the responses: on 190923 its outputs have the
      responses' mean, ~2.8), else "standardized" (distilled from a teacher: outputs ~ mean 0, SD 1).

    The readout is "factorized": ``mixing`` (1x1 conv K4 -> n_outputs) then one (R, R) spatial map + bias
    per output (the Keras 'valid' R x R depthwise conv). The variant without ReLUs (no ``*_act`` layers in
    config.json, e.g. ``linear_from_ensemble_model``) gets ``spec.activation = False``. BN uses the raw Keras
    moving variances with eps 1e-3 (checked against config.json).
    """
    path = Path(keras_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such shared compact model file")
    try:
        with zipfile.ZipFile(path) as zf:
            members = set(zf.namelist())
            for member in ("config.json", "model.weights.h5"):
                if member not in members:
                    raise ValueError(f"{path}: not a Keras 3 model archive: no {member} in the zip "
                                     f"(found {sorted(members)})")
            config_bytes = zf.read("config.json")
            weights_bytes = zf.read("model.weights.h5")
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a zip archive (a .keras file is one): {e}") from e
    try:
        config = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: config.json is not valid JSON: {e}") from e
    image_size, activation, layers = _parse_shared_config(config, path)

    try:
        with h5py.File(io.BytesIO(weights_bytes), "r") as h5:
            w = _read_h5_vars(h5, layers, path)
    except OSError as e:
        raise ValueError(f"{path}: model.weights.h5 is not a readable HDF5 file: {e}") from e

    n_vars = {"Conv2D": 2, "BatchNormalization": 4, "SeparableConv2D": 3, "DepthwiseConv2D": 2}
    for name, cls in layers:
        if cls in n_vars and len(w.get(name, [])) != n_vars[cls]:
            raise ValueError(f"{path}: layer {name!r} has {len(w.get(name, []))} weight arrays, expected {n_vars[cls]}")

    filters = [w["layer0_conv"][0].shape[-1]] + [w[f"layer{l}_conv"][1].shape[-1] for l in range(1, 5)]
    n_out = w["mixing_stage"][0].shape[-1]
    side = CompactSpec(image_size=image_size).readout_size
    cfg = {L["name"]: L["config"] for L in config["config"]["layers"]}
    cfg_filters = [cfg[f"layer{l}_conv"].get("filters") for l in range(5)]
    if cfg_filters != filters or cfg["mixing_stage"].get("filters") != n_out:
        raise ValueError(f"{path}: config.json widths {cfg_filters} + {cfg['mixing_stage'].get('filters')} outputs "
                         f"disagree with model.weights.h5 {filters} + {n_out}")
    ks, k = _KERNEL, filters
    expected = {"layer0_conv": [(ks, ks, 3, k[0]), (k[0],)],
                "mixing_stage": [(1, 1, k[4], n_out), (n_out,)],
                "spatial_pool_stage": [(side, side, n_out, 1), (n_out,)]}
    for l in range(1, 5):
        expected[f"layer{l}_conv"] = [(ks, ks, k[l - 1], 1), (1, 1, k[l - 1], k[l]), (k[l],)]
    for l in range(5):
        expected[f"layer{l}_bn"] = [(k[l],)] * 4
    got = {name: [a.shape for a in w[name]] for name in expected}
    if got != expected:
        wrong = {name: (got[name], expected[name]) for name in expected if got[name] != expected[name]}
        raise ValueError(f"{path}: inconsistent weight shapes in model.weights.h5 (got, expected): {wrong}")

    if neuron_ids is None:
        if n_out != len(SHARED_NEURON_IDS):
            raise ValueError(f"{path}: {n_out} outputs, not the published {len(SHARED_NEURON_IDS)}; "
                             f"pass neuron_ids")
        neuron_ids = SHARED_NEURON_IDS
    if output_units is None:
        output_units = "spikes/100ms" if path.parent.name == DIRECT_FIT_VARIANT else "standardized"
    spec = CompactSpec(filters=tuple(filters), image_size=image_size, readout="factorized", n_outputs=n_out,
                       activation=activation, output_units=output_units, neuron_ids=tuple(neuron_ids))

    # Keras layouts -> torch (method.md §8.1): no spatial flips, only axis moves
    state = {
        "layer0_conv.weight": w["layer0_conv"][0].transpose(3, 2, 0, 1),  # (kh,kw,in,out) -> (out,in,kh,kw)
        "layer0_conv.bias": w["layer0_conv"][1],
        "mixing.weight": w["mixing_stage"][0].transpose(3, 2, 0, 1),
        "mixing.bias": w["mixing_stage"][1],
        "spatial": w["spatial_pool_stage"][0][:, :, :, 0].transpose(2, 0, 1),  # (R,R,n,1) -> (n,R,R)
        "spatial_bias": w["spatial_pool_stage"][1],
    }
    for l in range(1, 5):
        depth, point, bias = w[f"layer{l}_conv"]
        state[f"layer{l}_depth.weight"] = depth.transpose(2, 3, 0, 1)  # (kh,kw,C,1) -> (C,1,kh,kw)
        state[f"layer{l}_point.weight"] = point.transpose(3, 2, 0, 1)  # (1,1,in,out) -> (out,in,1,1)
        state[f"layer{l}_point.bias"] = bias
    for l in range(5):
        gamma, beta, mean, var = w[f"layer{l}_bn"]
        if (var < 0).any():
            raise ValueError(f"{path}: layer{l}_bn has negative moving variances")
        state.update({f"layer{l}_bn.weight": gamma, f"layer{l}_bn.bias": beta,
                      f"layer{l}_bn.running_mean": mean, f"layer{l}_bn.running_var": var})
    tensors = {key: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for key, a in state.items()}
    for l in range(5):
        tensors[f"layer{l}_bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)

    model = CompactModel(spec)
    model.load_state_dict(tensors)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# as teachers
# ---------------------------------------------------------------------------------------------------

class SelectOutputs:
    """A Teacher restricted to some of another Teacher's neurons, in the order given.

    ``predict(images)`` -> float32 (N, len(neuron_ids)): the wrapped teacher's columns for those ids.
    """

    def __init__(self, teacher: Teacher, neuron_ids: Sequence[str]):
        position = {nid: i for i, nid in enumerate(teacher.neuron_ids)}
        unknown = [nid for nid in neuron_ids if nid not in position]
        if unknown or not neuron_ids:
            raise ValueError(f"SelectOutputs: neuron ids {unknown or '(none given)'} are not outputs of the "
                             f"teacher (which has {len(position)} outputs)")
        self.teacher = teacher
        self.neuron_ids = tuple(neuron_ids)
        self.columns = np.array([position[nid] for nid in self.neuron_ids], dtype=np.intp)

    def predict(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        out = self.teacher.predict(images) if batch_size is None else self.teacher.predict(images, batch_size=batch_size)
        return out[:, self.columns]


def published_compact_teacher(published_dir: str | Path, session: str = "190923",
                              device: str | torch.device = "cpu") -> CompactTeacher:
    """The published per-neuron compact models of ``session`` as one Teacher (one column per neuron)."""
    return CompactTeacher(load_published_session(published_dir, session), device=device)


def shared_compact_teacher(keras_path: str | Path, sessions: str | Sequence[str] | None = None,
                           device: str | torch.device = "cpu") -> Teacher:
    """A published shared compact model as a Teacher: all 219 neurons, or only those of ``sessions``."""
    teacher = CompactTeacher([load_shared_compact(keras_path)], device=device)
    if sessions is None:
        return teacher
    sessions = [sessions] if isinstance(sessions, str) else [str(s) for s in sessions]
    known = {nid.split(":")[0] for nid in teacher.neuron_ids}
    unknown = [s for s in sessions if s not in known]
    if unknown:
        raise ValueError(f"{keras_path}: sessions {unknown} have no outputs; it predicts {sorted(known)}")
    return SelectOutputs(teacher, [nid for s in sessions for nid in teacher.neuron_ids if nid.split(":")[0] == s])

"""The deep-ensemble teacher: configure, train across sessions, fit readouts, predict, save, evaluate.

    cfg = TeacherConfig.load("configs/teacher_demo.yaml")
    teacher = train_teacher(train_sessions, validation_session, cfg)   # method.md §2.4
    teacher = fit_session_readout(teacher, test_session, half="first")  # §1.6
    evaluate_teacher(teacher, test_session, half="second")              # median raw R² (+ r²_ER)
    teacher.predict(images)                                             # (N, neurons) float32

Training (§2.4): K members on frozen backbone features, each trained on one session after another
with a freshly reset factorized readout (§2.3), SGD with momentum and element-wise gradient clipping,
targets z-scored per neuron per session, passes per session visit growing with the epoch, learning
rate decayed per epoch, session order shuffled per epoch. After every session visit the members are
scored on the validation session by the K-fold cross-validated ridge ensemble (§2.5), median r²_ER
over neurons (raw R² when the session has averages only); the best members are kept.

Differences from the paper, all deliberate:
  - the trunk is torchvision's ResNet50 (see ``farm.models.ensemble``), pretrained only when a local
    weights file is given;
  - each session visit gets its own readout optimizer (the reset readout starts without momentum);
  - the loss is the squared error summed over the session's neurons divided by ``readout_units``
    (200), which equals the paper's MSE over 200 zero-padded outputs without computing the padding;
  - the validation ridge penalty is chosen from a relative grid by the same K-fold CV (``"cv"``),
    since the reference default (``"default"``, still available) does not suit scaled-down members.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml

from farm.files import atomic_path, load_state_dict, read_manifest, write_text_atomic
from farm.dataclass_dict import ConfigValueError, from_dict, read_yaml_mapping, to_dict
from farm import metrics
from farm.data.sessions import Session
from farm.models.ensemble import (
    ALPHA_GRID,
    Backbone,
    BackboneSpec,
    FactorizedReadout,
    FeatureCache,
    Member,
    MemberSpec,
    ReadoutHead,
    RidgeSolver,
    blas_threads,
    build_backbone,
    build_member,
    choose_ridge_alpha,
    median_r2_columns,
    readout_init_weights,
    resolve_alpha,
    ridge_cv_predictions,
    state_fingerprint,
)

log = logging.getLogger(__name__)

TEACHER_SPEC_FILE = "teacher.json"
TEACHER_WEIGHTS_FILE = "state_dict.pt"
TEACHER_SPEC_VERSION = 1

Callback = Callable[[str, dict], None]


# ------------------------------------------------------------------------------------------------
# config


@dataclass
class TeacherConfig:
    """Everything that defines a teacher and its training. Paper values are the defaults (§2).

    Backbone (§2.1): ``backbone`` (torchvision name), ``backbone_layer`` (dotted module path),
    ``weights_path`` (local torchvision state_dict of the full network; None = random init from
    ``backbone_seed``), ``input_size`` (pixels the 112 px images are resized to; 224 in the paper).
    Members (§2.2): ``n_members`` (K = 25), ``member_width`` (512), ``block_width`` (256),
    ``n_blocks`` (4); ``readout_units`` (200): the training readout's output count (loss normalizer).
    Training (§2.4): ``epochs``, ``passes`` (passes per session visit in each epoch; default
    1, 2, ..., epochs), ``lr``, ``momentum``, ``clip_value`` (element-wise gradient clip), ``lr_decay``
    (per epoch), ``batch_size``, ``readout_reset_scale`` (§2.3), ``seed`` (member k uses seed + k),
    ``validation_alpha`` (ridge penalty of the validation score: "cv", "default" or a number),
    ``validation_folds``, ``validate_every`` ("session": after every session visit, as the paper;
    "epoch": after the last visit of each epoch, cheaper).
    New sessions (§1.6, §2.5): ``readout_kind`` ("ridge" | "factorized"), ``ridge_alpha``
    ("cv" | "default" | number), ``output_units`` ("standardized" z-scores of the fitting images, or
    "spikes"), ``factorized_epochs``, ``factorized_lr``.
    Data: ``train_sessions``/``validation_session``/``test_session`` (ids; empty/None = by role),
    ``train_images`` ({session: [[start, stop], ...]} 0-based half-open image ranges to train on;
    default all), ``data_dir`` (sessions folder or V4 release folder), ``simulation``
    (``SimulationConfig`` fields, used when there is no data folder).
    Runtime: ``device``, ``threads`` (torch intra-op threads while training; None = leave as is),
    ``feature_batch_size``, ``feature_cache_dir`` (backbone features as .npy; None = memory only).
    """

    backbone: str = "resnet50"
    backbone_layer: str = "layer3.3"
    weights_path: str | None = None
    input_size: int = 224
    backbone_seed: int = 0

    n_members: int = 25
    member_width: int = 512
    block_width: int = 256
    n_blocks: int = 4
    readout_units: int = 200

    epochs: int = 5
    passes: list[int] | None = None
    lr: float = 2.0
    momentum: float = 0.75
    clip_value: float = 0.5
    lr_decay: float = 0.85
    batch_size: int = 64
    readout_reset_scale: float = 1e-3
    seed: int = 31490
    validation_alpha: Any = "cv"
    validation_folds: int = 8
    validate_every: str = "session"

    readout_kind: str = "ridge"
    ridge_alpha: Any = "cv"
    output_units: str = "standardized"
    factorized_epochs: int = 50
    factorized_lr: float = 1e-3

    train_sessions: list[str] = field(default_factory=list)
    validation_session: str | None = None
    test_session: str | None = None
    train_images: dict[str, list[list[int]]] = field(default_factory=dict)
    data_dir: str | None = None
    simulation: dict | None = None

    device: str = "cpu"
    threads: int | None = None
    feature_batch_size: int = 64
    feature_cache_dir: str | None = None

    def __post_init__(self):
        self.train_sessions = [str(s) for s in (self.train_sessions or [])]
        if self.validation_session is not None:
            self.validation_session = str(self.validation_session)
        if self.test_session is not None:
            self.test_session = str(self.test_session)
        self.train_images = {str(k): [list(map(int, r)) for r in v] for k, v in (self.train_images or {}).items()}
        if self.passes is None:
            self.passes = list(range(1, int(self.epochs) + 1))
        self.passes = [int(p) for p in self.passes]
        self.validate()

    def validate(self) -> None:
        def fail(name, expected):
            raise ValueError(f"TeacherConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("n_members", "member_width", "block_width", "readout_units", "epochs", "batch_size",
                     "feature_batch_size", "input_size", "validation_folds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "a positive integer")
        if not isinstance(self.n_blocks, int) or self.n_blocks < 0:
            fail("n_blocks", "an integer >= 0")
        if len(self.passes) != self.epochs or min(self.passes) < 1:
            fail("passes", f"{self.epochs} positive integers (one per epoch)")
        for name in ("lr", "clip_value", "lr_decay", "readout_reset_scale", "factorized_lr"):
            if not float(getattr(self, name)) > 0:
                fail(name, "a positive number")
        if not 0 <= float(self.momentum) < 1:
            fail("momentum", "a number in [0, 1)")
        if self.validate_every not in ("session", "epoch"):
            fail("validate_every", "'session' or 'epoch'")
        if self.readout_kind not in ReadoutHead.KINDS:
            fail("readout_kind", f"one of {ReadoutHead.KINDS}")
        if self.output_units not in ReadoutHead.UNITS:
            fail("output_units", f"one of {ReadoutHead.UNITS}")
        for name in ("ridge_alpha", "validation_alpha"):
            a = getattr(self, name)
            if not (a in ("cv", "default") or (isinstance(a, (int, float)) and a > 0)):
                fail(name, "'cv', 'default' or a positive number")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            fail("threads", "None or a positive integer")
        for sid, ranges in self.train_images.items():
            for r in ranges:
                if len(r) != 2 or not 0 <= r[0] < r[1]:
                    raise ValueError(f"TeacherConfig.train_images[{sid!r}]: expected [start, stop] ranges "
                                     f"with 0 <= start < stop, got {r}")

    # -- conversions ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TeacherConfig":
        return from_dict(cls, d)

    @classmethod
    def load(cls, source: "str | Path | dict | TeacherConfig") -> "TeacherConfig":
        """From a TeacherConfig, a dict, or a YAML file (a top-level ``teacher:`` section is accepted)."""
        if isinstance(source, TeacherConfig):
            return copy.deepcopy(source)
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = Path(source)
        d = read_yaml_mapping(path, "teacher config")
        if set(d) == {"teacher"} and isinstance(d["teacher"], dict):
            d = d["teacher"]
        try:
            return from_dict(cls, d, "")
        except ValueError as e:
            raise ConfigValueError(f"{path}: {e}") from None

    def to_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec(name=self.backbone, layer=self.backbone_layer, input_size=self.input_size,
                            weights_path=self.weights_path, seed=self.backbone_seed)

    def member_spec(self, in_channels: int) -> MemberSpec:
        return MemberSpec(in_channels=in_channels, width=self.member_width, block_width=self.block_width,
                          n_blocks=self.n_blocks)


# ------------------------------------------------------------------------------------------------
# small helpers



@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """Use ``threads`` intra-op threads inside the block, then restore the previous setting."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _zscore(y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y (images, neurons) -> (z-scores, mean, sd) per neuron; constant neurons are an error."""
    y = np.asarray(y, dtype=np.float64)
    if np.isnan(y).any():
        # An image with no repeat for some neuron: use that neuron's mean so it adds no signal.
        col_mean = np.nanmean(y, axis=0)
        y = np.where(np.isnan(y), col_mean[None, :], y)
    mean, sd = y.mean(axis=0), y.std(axis=0)
    if (sd <= 0).any():
        bad = np.flatnonzero(sd <= 0)[:5].tolist()
        raise ValueError(f"{what}: neuron(s) {bad} have constant responses; cannot z-score")
    return (y - mean) / sd, mean, sd


def _half_index(session: Session, half: str) -> np.ndarray:
    h = session.n_images // 2
    if half == "first":
        return np.arange(h)
    if half == "second":
        return np.arange(h, session.n_images)
    if half == "all":
        return np.arange(session.n_images)
    raise ValueError(f"half must be 'first', 'second' or 'all', got {half!r}")


def _check_images(session: Session) -> None:
    if not session.images_available or session.images.size == 0:
        raise ValueError(f"session {session.session_id}: its images are not available; "
                         f"a teacher can only be trained or fitted on sessions with images")


# ------------------------------------------------------------------------------------------------
# the teacher


class EnsembleTeacher:
    """A trained deep ensemble: frozen backbone + K members (+ one fitted readout head).

    ``predict(images)``: uint8 (N, H, W, 3) RGB -> float32 (N, n_neurons), the member-averaged
    readout (z-scores of the fitting images when ``output_units == "standardized"``). Deterministic:
    the backbone and members run in eval mode. ``neuron_ids``: the head's neurons (empty without a
    head, when ``predict`` raises). ``pretrained``: whether the backbone weights came from a file.
    """

    def __init__(self, backbone: Backbone, members: Sequence[Member], head: ReadoutHead | None = None,
                 device: str | torch.device = "cpu", info: dict | None = None):
        if not members:
            raise ValueError("EnsembleTeacher needs at least one member")
        self.device = _resolve_device(device)
        self.backbone = backbone.to(self.device).eval()
        self.members = [m.to(self.device).eval() for m in members]
        self.head = head.to(self.device) if head is not None else None
        if head is not None and head.n_members != len(self.members):
            raise ValueError(f"readout head has {head.n_members} members, the ensemble {len(self.members)}")
        self.info = dict(info or {})

    # -- properties ------------------------------------------------------------------------------
    @property
    def neuron_ids(self) -> tuple[str, ...]:
        return self.head.neuron_ids if self.head is not None else ()

    @property
    def output_units(self) -> str | None:
        return self.head.output_units if self.head is not None else None

    @property
    def pretrained(self) -> bool:
        return bool(self.backbone.pretrained)

    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def member_spec(self) -> MemberSpec:
        return self.members[0].spec

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of a member's embedding."""
        _, fh, fw = self.backbone.out_shape
        side = MemberSpec.embedding_side(fh)
        return self.member_spec.width, side, MemberSpec.embedding_side(fw)

    def to(self, device) -> "EnsembleTeacher":
        self.device = _resolve_device(device)
        self.backbone.to(self.device)
        for m in self.members:
            m.to(self.device)
        if self.head is not None:
            self.head.to(self.device)
        return self

    def with_head(self, head: ReadoutHead | None) -> "EnsembleTeacher":
        """A teacher sharing this one's backbone and members, with another readout head."""
        return EnsembleTeacher(self.backbone, self.members, head, self.device, self.info)

    # -- computation -----------------------------------------------------------------------------
    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Backbone features float32 (N, C, h, w) of uint8 (N, H, W, 3) images."""
        return self.backbone.features(images, batch_size, self.device)

    def embed(self, features: np.ndarray, member: int, batch_size: int = 256) -> np.ndarray:
        """Member ``member``'s embedding float32 (N, C, h, w) of backbone features (N, Cf, hf, wf)."""
        m = self.members[member].eval()
        out = None
        with torch.inference_mode():
            for s in range(0, len(features), batch_size):
                e = m(torch.from_numpy(np.ascontiguousarray(features[s:s + batch_size])).to(self.device))
                if out is None:
                    out = np.empty((len(features), *e.shape[1:]), dtype=np.float32)
                out[s:s + batch_size] = e.float().cpu().numpy()
        if out is None:
            out = np.zeros((0, *self.embedding_shape), dtype=np.float32)
        return out

    def predict_features(self, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """float32 (N, n_neurons) from backbone features (N, Cf, hf, wf)."""
        if self.head is None:
            raise RuntimeError("this teacher has no readout; fit one with fit_session_readout()")
        out = np.empty((len(features), self.head.n_outputs), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(features), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(features[s:s + batch_size])).to(self.device)
                out[s:s + batch_size] = self._predict_batch(x).cpu().numpy()
        return out

    def _predict_batch(self, feats: torch.Tensor) -> torch.Tensor:
        total = None
        for k, m in enumerate(self.members):
            y = self.head.member_output(k, m.eval()(feats))
            total = y if total is None else total + y
        return self.head.finish(total / len(self.members)).float()

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB -> float32 (N, n_neurons); see the class docstring."""
        if self.head is None:
            raise RuntimeError("this teacher has no readout; fit one with fit_session_readout()")
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3) RGB, got shape {images.shape}")
        out = np.empty((len(images), self.head.n_outputs), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                feats = self.backbone(self.backbone.preprocess(images[s:s + batch_size], self.device))
                out[s:s + batch_size] = self._predict_batch(feats).cpu().numpy()
        return out

    __call__ = predict

    # -- identity, save, load --------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {}
        for k, m in enumerate(self.members):
            for name, t in m.state_dict().items():
                state[f"members.{k}.{name}"] = t.detach().to("cpu")
        if self.head is not None:
            for name, t in self.head.state_dict().items():
                state[f"head.{name}"] = t.detach().to("cpu")
        return state

    def spec(self) -> dict:
        """The JSON-able description (everything but the weights; the backbone by path/seed + hash)."""
        return {
            "kind": "EnsembleTeacher",
            "spec_version": TEACHER_SPEC_VERSION,
            "backbone": self.backbone.spec.to_dict(),
            "backbone_fingerprint": self.backbone.fingerprint,
            "pretrained": self.pretrained,
            "member": self.member_spec.to_dict(),
            "n_members": self.n_members,
            "head": self.head.meta() if self.head is not None else None,
        }

    @property
    def teacher_id(self) -> str:
        """Short content hash of the spec and every weight (backbone through its fingerprint)."""
        h = hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode())
        h.update(state_fingerprint(self._state()).encode())
        return h.hexdigest()[:12]

    def save(self, directory: str | Path) -> Path:
        """Write ``teacher.json`` (spec, teacher_id, info) and ``state_dict.pt`` (members + head).

        The backbone's weights are never written: a file-backed backbone is stored as its path and
        sha256, a random one as its seed and weight fingerprint (checked on load).
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        spec = self.spec()
        spec["teacher_id"] = self.teacher_id
        spec["info"] = self.info
        with atomic_path(d / TEACHER_WEIGHTS_FILE) as tmp:
            torch.save(self._state(), tmp)
        write_text_atomic(d / TEACHER_SPEC_FILE, json.dumps(spec, indent=2, default=str))
        return d

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             weights_path: str | Path | None = None) -> "EnsembleTeacher":
        """Load a teacher written by ``save`` (``torch.load(weights_only=True)``).

        weights_path: where the backbone weights file is now, if it moved (its sha256 must match).
        """
        d = Path(directory)
        spec_path, sd_path = d / TEACHER_SPEC_FILE, d / TEACHER_WEIGHTS_FILE
        for p in (spec_path, sd_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing; a saved teacher is a folder with "
                                        f"{TEACHER_SPEC_FILE} and {TEACHER_WEIGHTS_FILE}")
        spec = read_manifest(spec_path, ("kind", "EnsembleTeacher"), ("spec_version", TEACHER_SPEC_VERSION),
                             "EnsembleTeacher spec")
        try:
            bspec = dict(spec["backbone"])
            if weights_path is not None:
                bspec["weights_path"] = str(weights_path)
            backbone = build_backbone(BackboneSpec.from_dict(bspec))
            if backbone.fingerprint != spec["backbone_fingerprint"]:
                raise ValueError(f"{spec_path}: the rebuilt backbone's weights differ from the saved "
                                 f"fingerprint (different torchvision init or weights file)")
            mspec = MemberSpec.from_dict(spec["member"])
            members = [Member(mspec) for _ in range(int(spec["n_members"]))]
            head = ReadoutHead.from_meta(spec["head"]) if spec.get("head") else None
        except (KeyError, TypeError) as e:
            raise ValueError(f"{spec_path}: incomplete teacher spec ({e})") from e
        state = load_state_dict(sd_path)
        try:
            for k, m in enumerate(members):
                prefix = f"members.{k}."
                m.load_state_dict({n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)})
            if head is not None:
                head.load_state_dict({n[5:]: t for n, t in state.items() if n.startswith("head.")})
        except RuntimeError as e:
            raise ValueError(f"{sd_path}: weights do not match the spec in {spec_path}: {e}") from e
        teacher = cls(backbone, members, head, device, spec.get("info"))
        if spec.get("teacher_id") and teacher.teacher_id != spec["teacher_id"]:
            raise ValueError(f"{d}: loaded teacher id {teacher.teacher_id} differs from the saved "
                             f"{spec['teacher_id']}")
        return teacher


class _Embeddings(Sequence):
    """Flattened member embeddings (n, D) of fixed features, computed on demand (one member at a time)."""

    def __init__(self, teacher: EnsembleTeacher, features: np.ndarray, index: np.ndarray | None = None):
        self.teacher, self.features, self.index = teacher, features, index

    def __len__(self) -> int:
        return self.teacher.n_members

    def __getitem__(self, k: int) -> np.ndarray:
        e = self.teacher.embed(self.features, k)
        e = e.reshape(len(e), -1)
        return e if self.index is None else e[self.index]


# ------------------------------------------------------------------------------------------------
# readouts for a session


def _ridge_alpha_spec(alpha) -> Any:
    """Config value -> what ``resolve_alpha`` takes (None means "cv")."""
    if alpha is None or alpha == "cv":
        return "cv"
    if alpha == "default" or (isinstance(alpha, tuple) and alpha[0] == "relative"):
        return alpha
    if isinstance(alpha, (int, float)) and alpha > 0:
        return float(alpha)
    raise ValueError(f"ridge alpha must be None, 'cv', 'default' or a positive number, got {alpha!r}")


def fit_session_readout(teacher: EnsembleTeacher, session: Session, half: str = "first",
                        kind: str = "ridge", alpha=None, output_units: str = "standardized",
                        factorized_epochs: int = 50, factorized_lr: float = 1e-3,
                        cache: FeatureCache | None = None, seed: int = 314159) -> EnsembleTeacher:
    """Fit a readout from the ensemble's embeddings to ``session``'s neurons (method.md §1.6, §2.5).

    Fits on the repeat-averaged responses of the images in ``half`` ("first", as the paper does for
    test sessions; "second"; "all"), z-scored per neuron.
    kind "ridge": one ridge regression per member on its flattened embedding; ``alpha`` None/"cv"
        picks a penalty by 8-fold CV on the fitting images, "default" is the reference rule, a number
        is used as is.
    kind "factorized": per member, mixing (1x1) x spatial map per neuron + bias, initialized from the
        rank-1 SVD of each neuron's ridge weights and trained with Adam (L2 1e-4 on mixing, 1e-2 on
        spatial, as §2.5) for up to ``factorized_epochs``, keeping the epoch with the best median R²
        on a held-out eighth of the fitting images. (No BN between the stages, unlike the reference.)
    Returns a teacher sharing ``teacher``'s backbone and members whose ``neuron_ids`` are the session's.
    """
    _check_images(session)
    idx = _half_index(session, half)
    if len(idx) < 16:
        raise ValueError(f"session {session.session_id}: {len(idx)} images in half {half!r}; need >= 16")
    images = session.images[idx]
    feats = cache.get(teacher.backbone, f"{session.session_id}-{half}", images) if cache else \
        teacher.features(images)
    y, mean, sd = _zscore(session.mean_responses()[:, idx].T, f"session {session.session_id}")
    c, h, w = teacher.embedding_shape
    head = ReadoutHead(kind, teacher.n_members, session.n_neurons, c, h, session.neuron_ids, output_units)
    xs = _Embeddings(teacher, feats)
    alpha = _ridge_alpha_spec(alpha)
    if alpha == "cv":
        alpha, score = choose_ridge_alpha(xs, y, seed=seed)
        log.info("session %s readout: ridge alpha %s x scale (CV median R2 %.3f)", session.session_id, alpha[1], score)
    with torch.no_grad():
        head.target_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        head.target_std.copy_(torch.as_tensor(sd, dtype=torch.float32))
    for k in range(teacher.n_members):
        x = xs[k]
        if kind == "ridge":
            solver = RidgeSolver(x, y)
            wk, bk = solver.coef(resolve_alpha(solver, x, alpha))
            with torch.no_grad():
                head.weight[k].copy_(torch.as_tensor(wk, dtype=torch.float32))
                head.bias[k].copy_(torch.as_tensor(bk, dtype=torch.float32))
        else:
            _fit_factorized_member(head, k, x.reshape(len(x), c, h, w), y, alpha,
                                   factorized_epochs, factorized_lr, seed + k)
    info = dict(teacher.info)
    info["readout"] = {"session": session.session_id, "half": half, "kind": kind, "n_images": int(len(idx)),
                       "alpha": list(alpha) if isinstance(alpha, tuple) else alpha}
    out = teacher.with_head(head.to(teacher.device))
    out.info = info
    return out


def _fit_factorized_member(head: ReadoutHead, k: int, emb: np.ndarray, y: np.ndarray, alpha,
                           epochs: int, lr: float, seed: int) -> None:
    """Fill member ``k`` of a factorized ``head`` from embeddings (n, C, h, w) and z-scored y (n, k)."""
    n, c, h, w = emb.shape
    order = np.random.default_rng(seed).permutation(n)
    n_hold = max(n // 8, 2)
    hold, train = order[:n_hold], order[n_hold:]
    x_flat = emb.reshape(n, -1)
    solver = RidgeSolver(x_flat[train], y[train])
    wk, bk = solver.coef(resolve_alpha(solver, x_flat[train], alpha))
    mixing = np.empty((y.shape[1], c))
    spatial = np.empty((y.shape[1], h, w))
    with blas_threads(1):
        for j in range(y.shape[1]):
            u, s, vt = np.linalg.svd(wk[:, j].reshape(c, h * w), full_matrices=False)
            mixing[j] = u[:, 0] * np.sqrt(s[0])
            spatial[j] = (vt[0] * np.sqrt(s[0])).reshape(h, w)
    ro = FactorizedReadout(y.shape[1], c, h)
    with torch.no_grad():
        ro.mixing.copy_(torch.as_tensor(mixing, dtype=torch.float32))
        ro.spatial.copy_(torch.as_tensor(spatial, dtype=torch.float32))
        ro.spatial_bias.copy_(torch.as_tensor(bk, dtype=torch.float32))
    xt = torch.as_tensor(emb, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.Adam(ro.parameters(), lr=lr, eps=1e-7)
    gen = torch.Generator().manual_seed(seed)
    train_t, hold_t = torch.as_tensor(train), torch.as_tensor(hold)

    def held_out_score() -> float:
        with torch.no_grad():
            p = ro(xt[hold_t]).numpy()
        return median_r2_columns(y[hold], p)

    best, best_state = held_out_score(), copy.deepcopy(ro.state_dict())
    for _ in range(int(epochs)):
        perm = train_t[torch.randperm(len(train_t), generator=gen)]
        for s in range(0, len(perm), 64):
            b = perm[s:s + 64]
            loss = ((ro(xt[b]) - yt[b]) ** 2).mean() + 1e-4 * ro.mixing.pow(2).sum() + 1e-2 * ro.spatial.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(ro.parameters(), 0.5)
            opt.step()
        score = held_out_score()
        if score > best:
            best, best_state = score, copy.deepcopy(ro.state_dict())
    ro.load_state_dict(best_state)
    with torch.no_grad():
        head.mixing[k].copy_(ro.mixing)
        head.mixing_bias[k].copy_(ro.mixing_bias)
        head.spatial[k].copy_(ro.spatial)
        head.bias[k].copy_(ro.spatial_bias)


def evaluate_teacher(teacher: EnsembleTeacher, session: Session, half: str = "second",
                     cache: FeatureCache | None = None) -> dict:
    """Scores of the teacher on ``session``'s images in ``half`` (method.md §1.6, §6).

    The teacher must predict the session's neurons (matched by id). Returns a dict with
    ``median_r2_raw`` (squared Pearson r with the repeat-averaged responses), ``median_r``,
    ``median_r2_er`` (only when the session has raw repeats) and the per-neuron lists.
    """
    _check_images(session)
    cols = {nid: j for j, nid in enumerate(teacher.neuron_ids)}
    missing = [nid for nid in session.neuron_ids if nid not in cols]
    if missing:
        raise ValueError(f"teacher does not predict {len(missing)} neuron(s) of session "
                         f"{session.session_id} (e.g. {missing[:3]}); fit a readout for it first")
    idx = _half_index(session, half)
    images = session.images[idx]
    feats = cache.get(teacher.backbone, f"{session.session_id}-{half}", images) if cache else \
        teacher.features(images)
    pred = teacher.predict_features(feats)[:, [cols[nid] for nid in session.neuron_ids]]
    responses = session.responses[:, idx]
    scores = metrics.evaluate_predictions(responses if session.has_repeats else session.mean_responses()[:, idx],
                                          pred.T.astype(np.float64), session.has_repeats)
    out = {"session": session.session_id, "half": half, "n_neurons": session.n_neurons,
           "n_images": int(len(idx)), "has_repeats": bool(session.has_repeats),
           "median_r2_raw": float(np.nanmedian(scores["r2_raw"])),
           "median_r": float(np.nanmedian(scores["r"])),
           "r2_raw": scores["r2_raw"].tolist(), "r": scores["r"].tolist()}
    if "r2_er" in scores:
        out["median_r2_er"] = float(np.nanmedian(scores["r2_er"]))
        out["r2_er"] = scores["r2_er"].tolist()
    return out


# ------------------------------------------------------------------------------------------------
# training


def _train_index(session: Session, config: TeacherConfig) -> np.ndarray:
    """Training images of a session: ``config.train_images`` (0-based half-open ranges), else the
    session's ``metadata["ensemble_images"]`` (1-based inclusive, as the V4 importer records the
    paper's choice, e.g. 1-600 and 901-1200 for 1909xx), else all."""
    ranges = config.train_images.get(session.session_id)
    if not ranges and session.metadata.get("ensemble_images"):
        ranges = [[int(a) - 1, int(b)] for a, b in session.metadata["ensemble_images"]]
    if not ranges:
        return np.arange(session.n_images)
    idx = np.concatenate([np.arange(a, min(b, session.n_images)) for a, b in ranges])
    if len(idx) == 0:
        raise ValueError(f"TeacherConfig.train_images[{session.session_id!r}] selects no image of its "
                         f"{session.n_images}")
    return idx


def validation_score(teacher: EnsembleTeacher, features: np.ndarray, session: Session, alpha="cv",
                     n_folds: int = 8) -> dict:
    """K-fold ridge-ensemble score of the members on a validation session (§2.4-§2.5).

    Median over neurons of r²_ER of the out-of-fold member-averaged predictions when the session has
    raw repeats, else of raw R². With alpha "cv" the best penalty of the relative grid is reported.
    Returns {"score", "metric", "alpha"}.
    """
    y_mean = session.mean_responses().T  # (images, neurons)
    y, _, _ = _zscore(y_mean, f"validation session {session.session_id}")
    if alpha == "cv":
        alphas = [("relative", g) for g in ALPHA_GRID]
    else:
        alphas = [_ridge_alpha_spec(alpha)]
    index, preds = ridge_cv_predictions(_Embeddings(teacher, features), y, alphas, n_folds)
    metric = "r2_er" if session.has_repeats else "r2_raw"
    best = (-math.inf, None)
    for a, p in zip(alphas, preds):
        if session.has_repeats:
            per_neuron = metrics.r2_er(session.responses[:, index], p.T)
        else:
            per_neuron = metrics.r2_raw(y_mean[index].T, p.T)
        s = float(np.nanmedian(per_neuron)) if np.isfinite(per_neuron).any() else -math.inf
        if s > best[0]:
            best = (s, a)
    a = best[1]
    return {"score": best[0], "metric": metric, "alpha": list(a) if isinstance(a, tuple) else a}


def train_teacher(train_sessions: Sequence[Session], validation_session: Session | None,
                  config: TeacherConfig | dict, callback: Callback | None = None,
                  cache: FeatureCache | None = None) -> EnsembleTeacher:
    """Train the ensemble across sessions (method.md §2.4); see the module docstring.

    train_sessions: sessions with images (each z-scored per neuron over its training images,
        ``config.train_images`` selecting them). validation_session: early-stopping session (None:
        no early stopping, the last members are kept).
    callback(event, info): "features" (per session: shapes, seconds), "session" (after each session
        visit: epoch, session id, passes, lr, mean training loss, validation score, best so far),
        "epoch", "done". Exceptions raised by the callback propagate.
    Returns the best members with a ridge readout for the validation session (fit on all its images)
    when there is one, else without a readout. ``teacher.info["history"]`` holds the visit records.
    """
    config = TeacherConfig.load(config)
    if not train_sessions:
        raise ValueError("train_teacher: no training sessions")
    for s in [*train_sessions, *([validation_session] if validation_session is not None else [])]:
        _check_images(s)
    emit = callback or (lambda event, info: None)
    device = _resolve_device(config.device)
    cache = cache or FeatureCache(config.feature_cache_dir, config.feature_batch_size, device)
    t_start = time.time()
    with _torch_threads(config.threads):
        backbone = build_backbone(config.backbone_spec()).to(device)
        # Features once per session (frozen backbone), kept on the CPU; batches go to the device.
        data = []
        for s in train_sessions:
            t0 = time.time()
            idx = _train_index(s, config)
            feats = cache.get(backbone, s.session_id, s.images if len(idx) == s.n_images else s.images[idx])
            z, _, _ = _zscore(s.mean_responses()[:, idx].T, f"training session {s.session_id}")
            if s.n_neurons > config.readout_units:
                raise ValueError(f"training session {s.session_id} has {s.n_neurons} neurons, more than "
                                 f"TeacherConfig.readout_units={config.readout_units}")
            data.append((s.session_id, feats, z.astype(np.float32)))
            emit("features", {"session": s.session_id, "n_images": int(len(idx)),
                              "shape": list(feats.shape), "seconds": time.time() - t0})
        val_feats = None
        if validation_session is not None:
            t0 = time.time()
            val_feats = cache.get(backbone, validation_session.session_id, validation_session.images)
            emit("features", {"session": validation_session.session_id, "n_images": validation_session.n_images,
                              "shape": list(val_feats.shape), "seconds": time.time() - t0})
        c_feat, h_feat, _ = backbone.out_shape
        mspec = config.member_spec(c_feat)
        side = MemberSpec.embedding_side(h_feat)
        members = [build_member(mspec, seed=config.seed + k).to(device) for k in range(config.n_members)]
        teacher = EnsembleTeacher(backbone, members, None, device)
        gens = [torch.Generator().manual_seed(config.seed + k) for k in range(config.n_members)]
        readout_inits = [readout_init_weights(mspec.width, side, config.readout_units, g) for g in gens]
        order_rng = np.random.default_rng(config.seed)

        history: list[dict] = []
        best_score, best_state, best_where = -math.inf, None, None
        for epoch in range(config.epochs):
            lr = config.lr * config.lr_decay ** epoch
            passes = config.passes[epoch]
            # Re-created each epoch as in the reference, which also resets the momentum buffers.
            member_opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=config.momentum) for m in members]
            session_order = order_rng.permutation(len(data))
            for visit, si in enumerate(session_order):
                sid, feats, z = data[si]
                t0 = time.time()
                losses = []
                for k, member in enumerate(members):
                    losses.append(_train_member_on_session(
                        member, member_opts[k], readout_inits[k], feats, z, passes, lr, config, gens[k], device))
                record = {"epoch": epoch, "visit": visit, "session": sid, "passes": passes, "lr": lr,
                          "train_loss": float(np.mean(losses)), "train_seconds": time.time() - t0}
                last_visit = visit == len(session_order) - 1
                if val_feats is not None and (config.validate_every == "session" or last_visit):
                    t1 = time.time()
                    v = validation_score(teacher, val_feats, validation_session, config.validation_alpha,
                                         config.validation_folds)
                    improved = v["score"] > best_score
                    if improved:
                        best_score = v["score"]
                        best_state = [copy.deepcopy(m.state_dict()) for m in members]
                        best_where = {"epoch": epoch, "visit": visit, "session": sid}
                    record.update({"val_score": v["score"], "val_metric": v["metric"], "val_alpha": v["alpha"],
                                   "best_score": best_score, "improved": improved,
                                   "val_seconds": time.time() - t1})
                history.append(record)
                val = record.get("val_score")
                log.info("teacher epoch %d, session %s (visit %d): train loss %.4f%s, %.0f s", epoch, sid, visit,
                         record["train_loss"], "" if val is None else f", validation {val:.3f}",
                         time.time() - t_start)
                emit("session", dict(record))
            emit("epoch", {"epoch": epoch, "lr": lr, "passes": passes, "best_score": best_score,
                           "val_score": history[-1].get("val_score"), "elapsed_s": time.time() - t_start})
        if best_state is not None:
            for m, st in zip(members, best_state):
                m.load_state_dict(st)
        for m in members:
            m.eval()
        teacher.info = {
            "config": config.to_dict(),
            "train_sessions": [s.session_id for s in train_sessions],
            "validation_session": validation_session.session_id if validation_session is not None else None,
            "best_validation_score": best_score if best_state is not None else None,
            "best_at": best_where,
            "history": history,
            "train_seconds": time.time() - t_start,
            "pretrained": backbone.pretrained,
        }
        if validation_session is not None:
            teacher = fit_session_readout(teacher, validation_session, "all", "ridge", config.ridge_alpha,
                                          config.output_units, cache=cache)
        emit("done", {"best_score": teacher.info["best_validation_score"], "best_at": best_where,
                      "train_seconds": teacher.info["train_seconds"], "pretrained": backbone.pretrained})
    return teacher


def _train_member_on_session(member: Member, opt: torch.optim.Optimizer, readout_init, feats: np.ndarray,
                             z: np.ndarray, passes: int, lr: float, config: TeacherConfig,
                             gen: torch.Generator, device: torch.device) -> float:
    """One session visit of one member: reset the readout (§2.3), ``passes`` shuffled passes of
    SGD on MSE, clipping each gradient element to +-clip_value. Returns the last pass's mean loss."""
    n_img, n_neurons = z.shape
    readout = FactorizedReadout.reset_from(readout_init[0], readout_init[1], n_neurons, gen,
                                           config.readout_reset_scale).to(device)
    readout_opt = torch.optim.SGD(readout.parameters(), lr=lr, momentum=config.momentum)
    params = list(member.parameters()) + list(readout.parameters())
    member.train()
    z_t = torch.from_numpy(z)
    last = []
    for _ in range(passes):
        last = []
        perm = torch.randperm(n_img, generator=gen).numpy()
        for s in range(0, n_img, config.batch_size):
            b = np.sort(perm[s:s + config.batch_size])
            x = torch.from_numpy(feats[b]).to(device)
            y = z_t[b].to(device)
            pred = readout(member(x))
            # Squared error summed over the session's neurons / readout_units = the paper's MSE
            # over 200 outputs whose padded units are exactly 0.
            loss = ((pred - y) ** 2).sum(dim=1).mean() / config.readout_units
            opt.zero_grad(set_to_none=True)
            readout_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(params, config.clip_value)
            opt.step()
            readout_opt.step()
            last.append(float(loss.detach()) * config.readout_units / n_neurons)
    member.eval()
    return float(np.mean(last)) if last else float("nan")


# ------------------------------------------------------------------------------------------------
# the end-to-end function the CLI calls


def _load_sessions(config: TeacherConfig, data_dir: str | Path | None) -> tuple[list[Session], Any]:
    """Sessions and the simulated ground truth (a Teacher of true rates, or None) from ``data_dir``:
    a simulated population folder (``population.json``), a V4 release folder
    (``responses_repeat_averaged/``) or a folder of Parquet sessions; with no folder, a population
    simulated from ``config.simulation``."""
    data_dir = data_dir if data_dir is not None else config.data_dir
    if data_dir is None:
        if config.simulation is None:
            raise ValueError("run_teacher_training: no data folder given and the config has no `simulation`")
        from farm.data.simulate import SimulationConfig, simulate_population

        pop = simulate_population(SimulationConfig.from_dict(dict(config.simulation)))
        return list(pop.sessions), pop.ground_truth
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir}: not found")
    if (data_dir / "population.json").is_file():
        from farm.data.simulate import load_population

        pop = load_population(data_dir)
        return list(pop.sessions), pop.ground_truth
    if (data_dir / "responses_repeat_averaged").is_dir():
        from farm.data.v4release import load_v4_session

        wanted = [*config.train_sessions, config.validation_session, config.test_session]
        wanted = [w for w in dict.fromkeys(wanted) if w is not None]
        if not wanted:
            raise ValueError(f"{data_dir} is a V4 release folder: the config must name train_sessions, "
                             f"validation_session and test_session")
        return [load_v4_session(data_dir, sid) for sid in wanted], None
    from farm.data.sessions import read_sessions

    return read_sessions(data_dir), None


def _pick(sessions: list[Session], config: TeacherConfig) -> tuple[list[Session], Session | None, Session | None]:
    by_id = {s.session_id: s for s in sessions}

    def get(sid, what):
        if sid not in by_id:
            raise ValueError(f"TeacherConfig.{what}: session {sid!r} not in the data ({sorted(by_id)})")
        return by_id[sid]

    train = [get(s, "train_sessions") for s in config.train_sessions] if config.train_sessions else \
        [s for s in sessions if s.role == "train" and s.images_available]
    val = get(config.validation_session, "validation_session") if config.validation_session else \
        next((s for s in sessions if s.role == "validation"), None)
    test = get(config.test_session, "test_session") if config.test_session else \
        next((s for s in sessions if s.role == "test"), None)
    return train, val, test


def _ground_truth_correlation(ground_truth, teacher: EnsembleTeacher, images: np.ndarray) -> dict | None:
    """Per-neuron Pearson r between the teacher and the simulated true rates on ``images``."""
    if ground_truth is None:
        return None
    gt_teacher = ground_truth
    gt_cols = {nid: j for j, nid in enumerate(gt_teacher.neuron_ids)}
    shared = [nid for nid in teacher.neuron_ids if nid in gt_cols]
    if not shared:
        return None
    truth = gt_teacher.predict(images)[:, [gt_cols[n] for n in shared]]
    cols = {nid: j for j, nid in enumerate(teacher.neuron_ids)}
    pred = teacher.predict(images)[:, [cols[n] for n in shared]]
    r = metrics.pearson_r(pred.T, truth.T)
    return {"n_neurons": len(shared), "median_r": float(np.nanmedian(r)), "r": r.tolist()}


def run_teacher_training(config: "str | Path | dict | TeacherConfig", data_dir: str | Path | None,
                         out_dir: str | Path, callback: Callback | None = None) -> tuple[EnsembleTeacher, dict]:
    """Train a teacher, fit the test session's readout on its first half, score its second half.

    data_dir: V4 release folder, Parquet sessions folder, or None (``config.data_dir``, else simulate
    ``config.simulation``). Writes ``out_dir/teacher/`` (the teacher with the test-session readout)
    and ``out_dir/report.json``. The report has the teacher id, whether the backbone was pretrained,
    the best validation score, the test session's median raw R² on its second half (and r²_ER when it
    has repeats), and for simulated data the median Pearson r against the true rates on those images.
    """
    config = TeacherConfig.load(config)
    out_dir = Path(out_dir)
    t0 = time.time()
    with _torch_threads(config.threads):
        sessions, ground_truth = _load_sessions(config, data_dir)
        train, val, test = _pick(sessions, config)
        cache = FeatureCache(config.feature_cache_dir, config.feature_batch_size, _resolve_device(config.device))
        teacher = train_teacher(train, val, config, callback, cache)
        report: dict = {
            "pretrained": teacher.pretrained,
            "backbone": teacher.backbone.spec.to_dict(),
            "train_sessions": [s.session_id for s in train],
            "validation_session": val.session_id if val is not None else None,
            "best_validation_score": teacher.info.get("best_validation_score"),
            "best_at": teacher.info.get("best_at"),
            "validation_metric": teacher.info["history"][-1].get("val_metric") if teacher.info["history"] else None,
            "train_seconds": teacher.info.get("train_seconds"),
        }
        if test is not None:
            teacher = fit_session_readout(teacher, test, "first", config.readout_kind, config.ridge_alpha,
                                          config.output_units, config.factorized_epochs, config.factorized_lr,
                                          cache=cache)
            ev = evaluate_teacher(teacher, test, "second", cache=cache)
            report["test"] = ev
            report["test_session"] = test.session_id
            report["test_median_r2_raw"] = ev["median_r2_raw"]
            if "median_r2_er" in ev:
                report["test_median_r2_er"] = ev["median_r2_er"]
            gt = _ground_truth_correlation(ground_truth, teacher, test.halves()[1].images)
            if gt is not None:
                report["ground_truth"] = gt
                report["ground_truth_median_r"] = gt["median_r"]
            if callback is not None:
                callback("test", {k: v for k, v in report.items() if k.startswith(("test_", "ground_truth_"))})
        report["teacher_id"] = teacher.teacher_id
        report["total_seconds"] = time.time() - t0
        teacher.save(out_dir / "teacher")
        write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    return teacher, report

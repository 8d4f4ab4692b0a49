"""The deep-ensemble teacher (method.md §2): frozen backbone features, K small CNN members, one
factorized readout per member and session; predict, save, load. Its training is
``farm.teacher_training``, its readouts and scores ``farm.teacher_readout``, its config
``farm.teacher_config``.

    teacher = EnsembleTeacher.load("farm_runs/demo/teacher")
    teacher.predict(images)                                             # (N, neurons) float32
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from farm.files import atomic_path, load_state_dict, read_manifest, write_text_atomic
from farm.data.sessions import Session
from farm.models.ensemble import (
    Backbone,
    BackboneSpec,
    Member,
    MemberSpec,
    ReadoutHead,
    build_backbone,
    state_fingerprint,
)

log = logging.getLogger(__name__)


TEACHER_SPEC_FILE = "teacher.json"
TEACHER_WEIGHTS_FILE = "state_dict.pt"
TEACHER_SPEC_VERSION = 1

Callback = Callable[[str, dict], None]


# ------------------------------------------------------------------------------------------------
# small helpers


@contextlib.contextmanager
def torch_threads(threads: int | None):
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


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def zscore(y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def half_index(session: Session, half: str) -> np.ndarray:
    h = session.n_images // 2
    if half == "first":
        return np.arange(h)
    if half == "second":
        return np.arange(h, session.n_images)
    if half == "all":
        return np.arange(session.n_images)
    raise ValueError(f"half must be 'first', 'second' or 'all', got {half!r}")


def check_session_images(session: Session) -> None:
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
        self.device = resolve_device(device)
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
        self.device = resolve_device(device)
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


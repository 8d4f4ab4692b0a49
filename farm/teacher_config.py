"""The teacher's config (``TeacherConfig``): the ensemble's sizes and its training schedule, read
from YAML and validated at load (``farm.dataclass_dict``).

    cfg = TeacherConfig.load("configs/teacher_demo.yaml")
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from farm.files import write_text_atomic
from farm.dataclass_dict import ConfigValueError, from_dict, read_yaml_mapping, to_dict
from farm.models.ensemble import (
    BackboneSpec,
    MemberSpec,
    ReadoutHead,
)


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


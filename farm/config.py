"""One config system: typed dataclasses down to the leaves, YAML in and out, typed dotted overrides.

A job config composes the components' own configs (each component owns its defaults and its range
checks): ``compress`` IS a ``farm.compress.CompressConfig`` (with its distill / prune / retrain /
shared / specialize sections), ``analysis.config`` an ``farm.analysis.AnalysisConfig``;
``data.simulate``, ``bank.bank`` and ``teacher.config`` stay mappings at run time because the job
fills some of their fields (the job's seed, the sessions' image size) but are checked at load as
``SimulationConfig``, ``BankConfig`` and ``TeacherConfig``. ``load_job_config`` validates all of it
before any data, teacher or Ray work: an unknown key, a wrong type or an out-of-range value raises a
``ConfigError`` naming the file, the dotted key path, the value and what is allowed.

    cfg = load_job_config("configs/demo.yaml", overrides=["farm.num_cpus=2", "neurons=sim2:0-3"])
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from farm.dataclass_dict import ConfigValueError, apply_overrides as _apply_overrides, from_dict, non_default_dict, read_yaml_mapping, \
    to_dict

from farm.analysis import AnalysisConfig
from farm.compress import CompressConfig
from farm.data.images import BankConfig
from farm.data.simulate import SimulationConfig
from farm.selection import check_selection
from farm.teacher_config import TeacherConfig
from farm.tracking import default_tracking_uri

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"


class ConfigError(ConfigValueError):
    pass


@dataclass
class DataConfig:
    """Where the sessions come from.

    kind: "simulated" (the embedded default: simulate into ``dir`` if absent), "v4" (import the
    published release from ``source`` into ``dir``), or "sessions" (Parquet sessions already in ``dir``).
    """

    kind: Literal["simulated", "v4", "sessions"] = "simulated"
    dir: str = "farm_data/demo"
    source: str | None = None
    simulate: dict = field(default_factory=dict)


@dataclass
class TeacherSourceConfig:
    """The teacher. kind:
    "ensemble": train the deep ensemble (``config``: TeacherConfig dict or a YAML path), fit the
        readout of ``session`` on its first half, save under ``path`` (reused when present);
    "saved": a saved EnsembleTeacher at ``path``;
    "shared_compact": a published shared compact model (.keras) at ``path``, restricted to ``session``;
    "published_compact": the published per-neuron compact models of ``session`` under ``path``;
    "ground_truth": the simulated population's true rates (for testing the compression alone).
    """

    kind: Literal["ensemble", "saved", "shared_compact", "published_compact", "ground_truth"] = "ensemble"
    path: str | None = None
    session: str | None = None
    config: dict | str | None = None

    def __post_init__(self):
        if self.kind in ("saved", "shared_compact", "published_compact") and not self.path:
            raise ValueError(f"kind {self.kind!r} needs a path")


@dataclass
class BankSpec:
    """The distillation image bank (``bank``: BankConfig fields) built from the images of sessions
    with the given roles (never the evaluated session's), and the held-out split."""

    dir: str | None = None
    source_roles: list[Literal["train", "validation", "test"]] = field(default_factory=lambda: ["train", "validation"])
    heldout: int = 500
    bank: dict = field(default_factory=lambda: {"n_images": 6000})

    def __post_init__(self):
        if self.heldout < 1:
            raise ValueError(f"heldout must be >= 1 held-out image, got {self.heldout}")
        n = self.bank.get("n_images") if isinstance(self.bank, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1 and self.heldout > n // 2:  # n < 1: BankConfig's
            raise ValueError(f"heldout: {self.heldout} held-out images of a {n}-image bank (bank.n_images) leave "
                             f"fewer to train on than to hold out; at most {n // 2}")


@dataclass
class FarmResources:
    """Ray resources per neuron task and where Ray runs (``address`` None: local / RAY_ADDRESS).

    pack: neurons per task, distilled together as one packed network (``compress_neurons``): fewer,
    fuller tasks (a GPU, or small students on a CPU core). 1 = one neuron per task.
    teacher_tasks_min_images: a bank of at least this many images gets the teacher's responses as
    Ray tasks, one per bank shard (each with ``num_cpus`` / ``num_gpus``; the teacher goes to the
    object store once); smaller banks run on the driver. 0 = always on the driver.
    memory_gb: Ray memory (GiB) reserved by each neuron task and each sweep distillation: a node runs
    no more of them at once than its memory resource holds, instead of Ray's memory monitor killing
    and retrying them. None = no reservation (tasks limited by CPUs/GPUs only).
    """

    num_cpus: float = 1
    pack: int = 1
    teacher_tasks_min_images: int = 20_000
    num_gpus: float = 0
    max_retries: int = 3
    device: str = "auto"
    address: str | None = None
    local_num_cpus: int | None = None
    object_store_memory: int | None = None
    memory_gb: float | None = None

    def __post_init__(self):
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ValueError(f"memory_gb must be > 0 GiB per task (or null), got {self.memory_gb}")
        for name, low in (("num_cpus", 0), ("num_gpus", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError("a neuron task needs num_cpus > 0 or num_gpus > 0")
        for name in ("pack", "local_num_cpus"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_retries", "teacher_tasks_min_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:<i> or mps, got {self.device!r}")


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str = "farm"
    register_models: bool = False


@dataclass
class SweepConfig:
    """Ray Tune sweep of pruning thresholds from each neuron's cached distilled model."""

    neurons: str = ""
    taus: list[float] = field(default_factory=lambda: [0.8, 0.9, 0.95])
    criteria: list[Literal["reconstruction", "ablation"]] = field(default_factory=lambda: ["reconstruction"])
    search: Literal["grid", "random"] = "grid"
    num_samples: int = 1
    eps: float = 0.02
    max_concurrent: int = 2
    max_failures: int = 2

    def __post_init__(self):
        if not self.taus or any(not 0 < t <= 1 for t in self.taus):
            raise ValueError(f"taus must be a non-empty list of thresholds in (0, 1], got {self.taus}")
        if not self.criteria:
            raise ValueError("criteria must name at least one pruning criterion")
        if self.neurons:
            check_selection(self.neurons)
        for name in ("num_samples", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eps < 0 or self.max_failures < 0:
            raise ValueError("eps and max_failures must be >= 0")


@dataclass
class AnalyzeConfig:
    """``farm analyze --config``: analyses of a compress job's models (farm.analyze_job).

    neurons: which finished neurons ("" = all). images: bank images drawn at random per model (the
    "normal" baseline, adversarial base images, CKA and signal-correlation images). top_k: maximizing
    natural images kept per model from the whole bank. config: ``farm.analysis.AnalysisConfig``
    fields (e.g. {synth: {n_steps: 200}, analyses: [synth, natural, dots]}).
    Not part of the job id: analysing a job never changes which job it is.
    """

    neurons: str = ""
    images: int = 2000
    top_k: int = 10
    config: AnalysisConfig = field(default_factory=AnalysisConfig)

    def __post_init__(self):
        if self.neurons:
            check_selection(self.neurons)
        if self.images < 1 or self.top_k < 1:
            raise ValueError(f"images and top_k must be >= 1, got {self.images}, {self.top_k}")


@dataclass
class JobConfig:
    name: str = "demo"
    job_id: str | None = None
    out_dir: str = "farm_runs/demo"
    neurons: str = "all"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherSourceConfig = field(default_factory=TeacherSourceConfig)
    bank: BankSpec = field(default_factory=BankSpec)
    compress: CompressConfig = field(default_factory=CompressConfig)
    farm: FarmResources = field(default_factory=FarmResources)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    analysis: AnalyzeConfig = field(default_factory=AnalyzeConfig)

    def __post_init__(self):
        check_selection(self.neurons)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        # the mappings the job completes at run time, checked (and normalized) now
        self.data.simulate = to_dict(from_dict(SimulationConfig, {"seed": self.seed, **self.data.simulate},
                                               "data.simulate"))
        given = dict(self.bank.bank)
        bank = to_dict(from_dict(BankConfig, {"seed": self.seed, **given}, "bank.bank"))
        self.bank.bank = {k: v for k, v in bank.items() if k != "image_size" or "image_size" in given}
        if self.farm.pack > 1 and CompressConfig.from_dict(self.compress).distill.mirrors:
            raise ValueError(f"compress.distill.mirrors: the packed distillation of farm.pack = {self.farm.pack} "
                             f"neurons per task takes no mirrors; set farm.pack: 1 or distill.mirrors: false")
        if self.teacher.kind == "ensemble" and self.teacher.config is not None:
            conf = self.teacher.config
            if isinstance(conf, str):  # a teacher YAML file: checked now, read again when trained
                conf = read_yaml(conf)
            conf = dict(conf.get("teacher", conf))
            checked = to_dict(from_dict(TeacherConfig, conf, "teacher.config"))
            if isinstance(self.teacher.config, dict):
                self.teacher.config = checked

    def to_dict(self) -> dict:
        return to_dict(self)

    def tracking_uri(self) -> str:
        """This job's MLflow store: ``tracking.uri``, else ``sqlite:///<out_dir's parent>/mlflow.db``
        (absolute). Every command resolves its store here: jobs, ``farm ui``, ``farm teacher train``
        and ``farm analyze`` (with no config: the default job's, ``farm_runs/mlflow.db`` under the
        current directory, where ``make demo`` writes)."""
        if self.tracking.uri:
            return self.tracking.uri
        return default_tracking_uri(Path(self.out_dir).resolve().parent)

    def resolved_job_id(self) -> str:
        """The given job id, else a stable hash of the normalized config without tracking, resources
        and analysis: of its values that differ from the fields' defaults, so that spelt-out defaults,
        and fields added to farm later with a default, leave it unchanged (a rerun after an upgrade
        still skips the neurons it finished)."""
        if self.job_id:
            return self.job_id
        d = non_default_dict(self)
        for k in ("farm", "tracking", "job_id", "analysis"):
            d.pop(k, None)
        digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return f"{self.name}-{digest}"


def apply_overrides(d: dict, overrides: list[str] | None) -> dict:
    """``key.sub=value`` strings applied to a copy of ``d``, each value parsed against its field's
    type (``neurons=190923:5`` stays text; ``farm.num_cpus=2`` is a number)."""
    try:
        return _apply_overrides(d, overrides, JobConfig)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, else relative to the repo's configs/ (``demo`` -> configs/demo.yaml)."""
    p = Path(path)
    for cand in (p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config {path}: no such file (also looked in {CONFIG_DIR})")


def read_yaml(path: str | Path) -> dict:
    """The mapping in a config file (a path, or a name in configs/)."""
    try:
        return read_yaml_mapping(resolve_config_path(path))
    except ConfigValueError as e:
        raise ConfigError(str(e)) from None


def load_job_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """The job config at ``path`` (or the defaults) with ``overrides``, validated to the leaves."""
    d = read_yaml(path) if path else {}
    d = apply_overrides(d, overrides)
    where = str(resolve_config_path(path)) if path else "config"
    try:
        return from_dict(JobConfig, d, "")
    except ConfigValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def store_uri(config: str | Path | None = None, overrides: list[str] | None = None) -> str:
    """The MLflow store of the job config at ``config`` (None: the default job's); see
    ``JobConfig.tracking_uri``."""
    return (load_job_config(config, overrides) if config else JobConfig()).tracking_uri()


def dump_job_config(cfg: JobConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""One config system: typed dataclasses, YAML in and out, dotted command-line overrides.

A job config composes the components' own configs (each component owns its defaults: the
simulation's ``SimulationConfig``, the teacher's ``TeacherConfig``, the bank's ``BankConfig``,
compression's ``CompressConfig``); here they stay plain dicts until the component parses them, so
unknown keys are refused by the component that owns them, naming the key.

    cfg = load_job_config("configs/demo.yaml", overrides=["farm.num_cpus=2", "neurons=sim2:0-3"])
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from farm.dataclass_dict import apply_overrides as _apply_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    """Where the sessions come from.

    kind: "simulated" (the embedded default: simulate into ``dir`` if absent), "v4" (import the
    published release from ``source`` into ``dir``), or "sessions" (Parquet sessions already in ``dir``).
    """

    kind: str = "simulated"
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

    kind: str = "ensemble"
    path: str | None = None
    session: str | None = None
    config: Any = None


@dataclass
class BankSpec:
    """The distillation image bank (``bank``: BankConfig fields) built from the images of sessions
    with the given roles (never the evaluated session's), and the held-out split."""

    dir: str | None = None
    source_roles: list = field(default_factory=lambda: ["train", "validation"])
    heldout: int = 500
    bank: dict = field(default_factory=dict)


@dataclass
class FarmResources:
    """Ray resources per neuron task and where Ray runs (``address`` None: local / RAY_ADDRESS).

    pack: neurons per task, distilled together as one packed network (``compress_neurons``): fewer,
    fuller tasks (a GPU, or small students on a CPU core). 1 = one neuron per task.
    teacher_tasks_min_images: a bank of at least this many images gets the teacher's responses as
    Ray tasks, one per bank shard (each with ``num_cpus`` / ``num_gpus``; the teacher goes to the
    object store once); smaller banks run on the driver. 0 = always on the driver.
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


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str = "farm"
    register_models: bool = False


@dataclass
class SweepConfig:
    """Ray Tune sweep of pruning thresholds from each neuron's cached distilled model."""

    neurons: str = ""
    taus: list = field(default_factory=lambda: [0.8, 0.9, 0.95])
    criteria: list = field(default_factory=lambda: ["reconstruction"])
    search: str = "grid"
    num_samples: int = 1
    eps: float = 0.02
    max_concurrent: int = 2
    max_failures: int = 2


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
    config: dict = field(default_factory=dict)


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
    compress: dict = field(default_factory=dict)
    farm: FarmResources = field(default_factory=FarmResources)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    analysis: AnalyzeConfig = field(default_factory=AnalyzeConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved_job_id(self) -> str:
        """The given job id, else a stable hash of everything but tracking/resources."""
        if self.job_id:
            return self.job_id
        d = self.to_dict()
        for k in ("farm", "tracking", "job_id", "analysis"):
            d.pop(k)
        digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return f"{self.name}-{digest}"


def _from_dict(cls, d: dict, where: str):
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        default = names[k].default_factory() if callable(names[k].default_factory) else names[k].default
        if is_dataclass(default):
            kwargs[k] = _from_dict(type(default), v, f"{where}.{k}")
        else:
            kwargs[k] = v
    return cls(**kwargs)


def apply_overrides(d: dict, overrides: list[str] | None) -> dict:
    """``key.sub=value`` strings (value parsed as YAML) applied to a copy of ``d``."""
    try:
        return _apply_overrides(d, overrides)
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
    p = resolve_config_path(path)
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return d


def load_job_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    d = read_yaml(path) if path else {}
    d = apply_overrides(d, overrides)
    cfg = _from_dict(JobConfig, d, str(path or "config"))
    check_compress_section(cfg.compress, str(path or "config"))
    return cfg


def check_compress_section(section: dict, where: str) -> None:
    """Fail at load, before any data, teacher or Ray work, on a compress section that the neuron
    tasks would refuse (unknown keys, bad values, an unknown recipe)."""
    from farm.compress import CompressConfig

    try:
        CompressConfig.from_dict(section)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: compress: {e}") from e


def dump_job_config(cfg: JobConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

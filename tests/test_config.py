"""The job config (YAML + dotted overrides) and the neuron selection grammar."""

from pathlib import Path

import pytest

from farm.config import ConfigError, load_job_config
from farm.selection import parse_neuron_selection

IDS = [f"190923:{i}" for i in range(12)] + [f"sim2:{i}" for i in range(4)]


def test_demo_config_loads_and_overrides_apply():
    cfg = load_job_config("demo", ["farm.num_cpus=2", "neurons=sim2:0-1", "sweep.taus=[0.5, 0.9]"])
    assert cfg.farm.num_cpus == 2 and cfg.neurons == "sim2:0-1" and cfg.sweep.taus == [0.5, 0.9]
    assert cfg.data.kind == "simulated"
    # the job id is stable for a config and changes with what is computed, not with resources
    assert cfg.resolved_job_id() == load_job_config("demo", ["neurons=sim2:0-1", "sweep.taus=[0.5, 0.9]"]).resolved_job_id()
    assert cfg.resolved_job_id() != load_job_config("demo", ["neurons=sim2:0-2"]).resolved_job_id()


def test_unknown_keys_are_refused_with_their_name(tmp_path):
    with pytest.raises(ConfigError, match="farm.*nmu_cpus"):
        load_job_config("demo", ["farm.nmu_cpus=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_job_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_job_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_job_config("demo", ["farm.num_cpus"])


def test_neuron_selection_grammar():
    assert parse_neuron_selection("all", IDS) == IDS
    assert parse_neuron_selection("190923:0-2", IDS) == ["190923:0", "190923:1", "190923:2"]
    assert parse_neuron_selection("190923:0-1,5 sim2:3", IDS) == ["190923:0", "190923:1", "190923:5", "sim2:3"]
    assert parse_neuron_selection("sim2", IDS) == [f"sim2:{i}" for i in range(4)]
    assert parse_neuron_selection("sim2:3;sim2:3", IDS) == ["sim2:3"]  # no duplicates
    with pytest.raises(ValueError, match="no session 'x'"):
        parse_neuron_selection("x:0", IDS)
    with pytest.raises(ValueError, match="190923:12 is not one of"):
        parse_neuron_selection("190923:10-12", IDS)
    with pytest.raises(ValueError, match="not an index"):
        parse_neuron_selection("190923:a", IDS)
    with pytest.raises(ValueError, match="empty"):
        parse_neuron_selection(" ", IDS)


BAD_OVERRIDES = [  # (override, what the message must name)
    ("compress.student_filter=[4,4,4,4,4]", r"compress: unknown key\(s\) \['student_filter'\] \('student_filter' -> did you mean 'student_filters'\?\)"),
    ("compress.prune.tau=1.5", r"compress.prune: PruneConfig.tau must be in \(0, 1\], got 1.5"),
    ("compress.distill.passes=-1", r"compress.distill: DistillConfig.passes must be > 0, got -1"),
    ("compress.distill.lr=fast", r"compress.distill.lr: got 'fast' \(str\), expected a number"),
    ("compress.recipe=fastest", r"compress: compress.recipe: 'fastest' is not a recipe; choose one of"),
    ("neurons=sim7:x", r"neurons: neuron selection 'sim7:x': 'x' is not an index"),
    ("farm.num_cpus=[1]", r"farm.num_cpus: got \[1\] \(list\), expected a number"),
    ("farm.memory_gb=0", r"farm: memory_gb must be > 0 GiB per task \(or null\), got 0"),
    ("bank.bank.n_images=0", r"bank.bank: BankConfig.n_images must be >= 1, got 0"),
    ("bank.bank.n_images=600", r"bank: heldout: 500 held-out images of a 600-image bank \(bank.n_images\) leave "
                               r"fewer to train on than to hold out; at most 300"),
    ("data.simulate.n_neuron=3", r"data.simulate: unknown key\(s\) \['n_neuron'\].*did you mean 'n_neurons'"),
    ("teacher.kind=ensembel", r"teacher.kind: got 'ensembel' \(str\), expected one of 'ensemble', 'saved'"),
    ("sweep.criteria=[reconstructon]", r"sweep.criteria\[0\]: got 'reconstructon'"),
    ("analysis.config.synth.n_step=3", r"analysis.config.synth: unknown key\(s\) \['n_step'\].*did you mean 'n_steps'"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_a_bad_value_anywhere_fails_at_load_naming_its_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config("demo", [override])


def test_overrides_are_parsed_against_the_fields_type():
    # a str field takes the text as written: not the int 190923, not YAML 1.1's base-60 11455385
    assert load_job_config("demo", ["neurons=190923"]).neurons == "190923"
    assert load_job_config("demo", ["neurons=190923:5"]).neurons == "190923:5"
    cfg = load_job_config("demo", ["farm.num_cpus=2", "compress.prune.tau=0.5", "teacher.session=190923",
                                   "farm.address=null"])
    assert cfg.farm.num_cpus == 2.0 and cfg.compress.prune.tau == 0.5 and cfg.teacher.session == "190923"
    assert cfg.farm.address is None
    with pytest.raises(ConfigError, match=r"override compress.distill.lr: value '\[1' is not valid YAML"):
        load_job_config("demo", ["compress.distill.lr=[1"])


def test_a_recipe_fills_every_section_the_yaml_leaves_out(tmp_path):
    """A job's compress section is its recipe's preset under the YAML's keys: the keys the YAML
    leaves out are the recipe's, never CompressConfig()'s defaults (a regression made the demo's
    `fast` recipe prune at the default tau 0.9 in one round instead of 0.85 iteratively)."""
    from farm.recipes import RECIPES

    fast = RECIPES["fast"]
    demo = load_job_config("demo").compress  # its YAML sets distill and retrain, not prune
    assert demo.prune.tau == fast["prune"]["tau"] == 0.85 and demo.prune.iterative is True
    assert demo.iterative_retrain_passes == fast["iterative_retrain_passes"]
    assert demo.retrain.lr == fast["retrain"]["lr"] and demo.retrain.passes == 1  # the YAML's key wins
    path = tmp_path / "job.yaml"
    path.write_text("compress: {recipe: paper, prune: {criterion: ablation}}\n")
    paper = load_job_config(path).compress
    assert paper.prune.tau == RECIPES["paper"]["prune"]["tau"] and paper.prune.criterion == "ablation"
    assert paper.distill.lr_schedule == "constant" and paper.retrain.standardize_targets is False


def test_sections_are_the_components_dataclasses_and_the_job_id_ignores_spelt_out_defaults(tmp_path):
    from farm.analysis import AnalysisConfig
    from farm.compress import CompressConfig
    from farm.config import dump_job_config

    cfg = load_job_config("demo")
    assert isinstance(cfg.compress, CompressConfig) and isinstance(cfg.analysis.config, AnalysisConfig)
    assert cfg.compress.recipe == "fast" and cfg.compress.distill.standardize_targets is True
    spelt = load_job_config("demo", ["compress.distill.adam_eps=1e-7", "data.simulate.gaudy_fraction="
                                     f"{cfg.data.simulate['gaudy_fraction']}", f"seed={cfg.seed}"])
    assert spelt.resolved_job_id() == cfg.resolved_job_id()
    assert load_job_config("demo", ["compress.distill.adam_eps=1e-6"]).resolved_job_id() != cfg.resolved_job_id()
    dump_job_config(cfg, tmp_path / "job.yaml")  # what a job writes is a config that loads to the same job
    again = load_job_config(tmp_path / "job.yaml")
    assert again == cfg and again.resolved_job_id() == cfg.resolved_job_id()


def test_the_cli_refuses_a_bad_config_before_any_work_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    out, data = tmp_path / "out", tmp_path / "data"
    for bad in ("compress.prune.tau=1.5", "neurons=sim7:x", "compress.student_filter=[4,4,4,4,4]"):
        p = subprocess.run([sys.executable, "-m", "farm.cli", "compress", "--config", "configs/demo.yaml",
                            f"out_dir={out}", f"data.dir={data}", f"tracking.uri=sqlite:///{tmp_path}/m.db", bad],
                           capture_output=True, text=True, timeout=120, cwd=str(Path(__file__).resolve().parents[1]))
        assert p.returncode == 2, (bad, p.stdout, p.stderr)
        assert "farm: error:" in p.stderr and bad.split("=")[0].split(".")[-1] in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                                        if not p.name.startswith("teacher_")), ids=lambda p: p.name)
def test_every_job_config_in_configs_loads(path):
    """Every job config shipped in configs/ passes the load-time checks (its sections, recipe and
    selection), so a config edited by hand fails here and not in a user's first job. Its name begins
    with its file's name (a default promoted from another file may keep its old, longer name, so its
    job id, and a resumed run, stay the same)."""
    cfg = load_job_config(path)
    assert cfg.name.startswith(path.stem.replace("_", "-"))
    assert cfg.resolved_job_id().startswith(cfg.name + "-")


def test_no_two_job_configs_in_configs_share_a_name():
    """Each shipped config has its own name, so two of them never share a job id (and so never
    skip each other's neurons as finished)."""
    paths = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                   if not p.name.startswith("teacher_"))
    names = [load_job_config(p).name for p in paths]
    assert len(paths) >= 2 and len(set(names)) == len(names), dict(zip(names, paths))


def test_the_job_id_hashes_only_what_differs_from_the_defaults_so_new_fields_leave_it_alone():
    """A field added to a config class later, with a default, must not change the id of a job that
    never set it: a rerun after the upgrade still finds (and skips) the neurons it finished."""
    from dataclasses import dataclass, field

    from farm.dataclass_dict import non_default_dict

    @dataclass
    class Section:
        lr: float = 1e-4
        betas: tuple = (0.9, 0.999)

    @dataclass
    class Before:
        name: str = "x"
        section: Section = field(default_factory=Section)
        optional: Section | None = None

    @dataclass
    class SectionAfter(Section):
        mirrors: bool = False  # the field added later

    @dataclass
    class After(Before):
        section: SectionAfter = field(default_factory=SectionAfter)
        passes: float = 1.0  # another one

    before = non_default_dict(Before(section=Section(lr=1e-3), optional=Section()))
    after = non_default_dict(After(section=SectionAfter(lr=1e-3), optional=Section()))
    assert before == after == {"section": {"lr": 1e-3}, "optional": {}}  # a None-by-default section: present
    assert non_default_dict(Before()) == {}
    assert non_default_dict(After(section=SectionAfter(mirrors=True))) == {"section": {"mirrors": True}}
    cfg = load_job_config("demo")
    assert cfg.resolved_job_id() != load_job_config("demo", ["compress.retrain.mirrors=true"]).resolved_job_id()

"""The job config (YAML + dotted overrides) and the neuron selection grammar."""

import pytest

from farm.config import ConfigError, load_job_config
from farm.farm import parse_neuron_selection

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

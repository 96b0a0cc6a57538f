"""Configs: validated when built, errors that name the field, presets as data, overrides, stable hashes."""

import dataclasses
import subprocess
import sys

import pytest

from raysys.config import (
    ConfigError,
    PilotConfig,
    PretrainConfig,
    StudyConfig,
    TuningConfig,
    build,
    config_hash,
    load_study,
    to_dict,
)


@pytest.mark.parametrize("override, field", [
    ("pretrain.continual_steps=0", "pretrain.continual_steps"),
    ("tuning.lr=-1", "tuning.lr"),
    ("tuning.types=[\"finetune\",\"prefix\"]", "tuning.types"),
    ("tuning.lora.rank=0", "tuning.lora.rank"),
    ("tuning.adapter.bottleneck=0", "tuning.adapter.bottleneck"),
    ("tuning.eval_every_steps=1000", "tuning.eval_every_steps"),
    ("pilot.alphas=[0.0,0.5,1.5]", "pilot.alphas"),
    ("pilot.alphas=[0.0,0.5]", "pilot.alphas"),
    ("pilot.hops=[0]", "pilot.hops"),
    ("pilot.control_length=9", "pilot.control_length"),
    ("corpora.1.source=\"ftp\"", "corpora[1].source"),
    ("tasks.0.domain=\"nowhere\"", "task d1_rel.domain"),
    ("seeds=[1,1]", "seeds"),
    ("tune_plms=[7]", "tune_plms"),
    ("pretrain.batch_size=\"big\"", "pretrain.batch_size"),
    ("pretrain.bogus=1", "pretrain"),
])
def test_invalid_values_name_their_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_study("tiny", [override])
    assert field in str(err.value)


def test_overrides_reach_nested_fields_and_list_items():
    study = load_study("tiny", ["tuning.lr=5e-4", "corpora.1.max_documents=100", "seeds=[1,2,3]",
                                "tuning.lora.targets=[\"query\"]", "pilot.alphas=[0,0.25,1]"])
    assert study.tuning.lr == 5e-4 and study.corpora[1].max_documents == 100 and study.seeds == (1, 2, 3)
    assert study.tuning.lora.targets == ("query",) and study.pilot.alphas == (0.0, 0.25, 1.0)
    with pytest.raises(ConfigError, match="not an index"):
        load_study("tiny", ["corpora.9.name=x"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_study("tiny", ["tuning.lr"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_study("huge")


def test_presets_build_and_differ_where_they_should():
    tiny, paper = load_study("tiny"), load_study("paper")
    assert tiny.model.name_or_path is None and paper.model.name_or_path == "roberta-base"
    assert paper.model.hidden_size == 768 and paper.model.num_layers == 12
    assert paper.tuning.lr == 2e-5 and paper.tuning.batch_size == 16 and paper.tuning.max_length == 128
    assert paper.seeds == (20, 30, 40) and paper.tuning.adapter.bottleneck == 24
    assert set(tiny.tuning.types) == set(paper.tuning.types) == {"finetune", "lora", "adapter"}
    assert len(tiny.pilot.alphas) == 26 and tiny.control_length == 3 and paper.control_length == 0


def test_per_type_learning_rate_and_budget():
    tuning = TuningConfig(types=("finetune", "adapter"), lr=1e-3, pet_lr=5e-3, max_steps=100, pet_max_steps=250)
    assert (tuning.lr_for("finetune"), tuning.lr_for("adapter")) == (1e-3, 5e-3)
    assert (tuning.max_steps_for("finetune"), tuning.max_steps_for("lora")) == (100, 250)
    assert tuning.pet_spec("finetune") is None and tuning.pet_spec("adapter") == {"bottleneck": 24}
    with pytest.raises(ConfigError, match="unknown 'prefix'"):
        tuning.pet_spec("prefix")


def test_pretrained_chain_needs_an_independent_control_checkpoint():
    with pytest.raises(ConfigError, match="pilot.control_name_or_path"):
        load_study("paper", ["pilot.control_length=2"])
    study = load_study("paper", ["pilot.control_length=2", "pilot.control_name_or_path=\"/ckpt/roberta-seed2\""])
    assert study.control_length == 2


def test_configs_are_frozen_and_round_trip():
    study = load_study("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.tuning.lr = 1.0
    assert build(StudyConfig, to_dict(study)) == study
    assert PilotConfig().alphas[0] == 0.0 and PilotConfig().alphas[-1] == 1.0 and len(PilotConfig().alphas) == 26


def test_hash_is_stable_and_sensitive():
    a = PretrainConfig()
    assert config_hash(a, "x") == config_hash(PretrainConfig(), "x")
    assert config_hash(a) != config_hash(dataclasses.replace(a, lr=2e-3))
    assert config_hash({"b": 1, "a": 2}) == config_hash({"a": 2, "b": 1})
    assert len(config_hash(a)) == 16


def _cli(*args):
    return subprocess.run([sys.executable, "sweeps/full_paper.py", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_bad_override_exits_2_naming_the_field(tmp_path):
    out = _cli("--storage", str(tmp_path / "never"), "--set", "tuning.lora.rank=0")
    assert out.returncode == 2 and "tuning.lora.rank" in out.stderr
    assert not (tmp_path / "never").exists()


def test_cli_prints_the_resolved_config():
    out = _cli("--print-config", "--set", "tuning.lr=0.0005")
    assert out.returncode == 0 and '"lr": 0.0005' in out.stdout and '"name": "tiny"' in out.stdout

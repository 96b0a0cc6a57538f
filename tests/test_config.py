"""raysys/config.py: typed, frozen, validated configs; presets; dotted overrides; stable hashes; and the command line's
handling of bad overrides and --print-config (sweeps/full_paper.py, run as a subprocess)."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysys.config import (
    PRESET_DIR,
    AdapterConfig,
    ConfigError,
    CorpusConfig,
    LoraConfig,
    MethodsConfig,
    ModelConfig,
    PilotConfig,
    PretrainConfig,
    SearchConfig,
    StudyConfig,
    TaskConfig,
    TuningConfig,
    WorldConfig,
    apply_override,
    available_presets,
    build,
    load_preset,
    load_study,
    to_dict,
)
from raysys.identity import config_hash

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------- field validation


@pytest.mark.parametrize("make,field", [
    (lambda: PretrainConfig(continual_steps=-5), "pretrain.continual_steps"),
    (lambda: PretrainConfig(initial_steps=-1), "pretrain.initial_steps"),
    (lambda: PretrainConfig(mask_prob=1.0), "pretrain.mask_prob"),
    (lambda: PretrainConfig(sequence_length=4), "pretrain.sequence_length"),
    (lambda: TuningConfig(max_steps=0), "tuning.max_steps"),
    (lambda: TuningConfig(pet_norms="raw"), "tuning.pet_norms"),
    (lambda: PilotConfig(lora_path="product"), "pilot.lora_path"),
    (lambda: TuningConfig(checkpoint_every_seconds=-1), "tuning.checkpoint_every_seconds"),
    (lambda: PretrainConfig(checkpoint_every_seconds=-1), "pretrain.checkpoint_every_seconds"),
    (lambda: PretrainConfig(worker_resource="GPU"), "pretrain.worker_resource"),
    (lambda: PretrainConfig(worker_resource="8 gpus"), "pretrain.worker_resource"),
    (lambda: SearchConfig(algorithm="bayes"), "methods.search.algorithm"),
    (lambda: SearchConfig(trials=0), "methods.search.trials"),
    (lambda: SearchConfig(lr=(0.0, 1e-3)), "methods.search.lr"),
    (lambda: SearchConfig(temperature=(5.0, 1.0)), "methods.search.temperature"),
    (lambda: SearchConfig(kd_weight=(0.5, 1.5)), "methods.search.kd_weight"),
    (lambda: MethodsConfig(names=("init", "distill"), search=SearchConfig(algorithm="optuna")),
     "methods.search.algorithm"),
    (lambda: TuningConfig(types=("finetune", "prompt")), "tuning.types"),
    (lambda: TuningConfig(types=("lora", "lora")), "tuning.types"),
    (lambda: TuningConfig(max_steps=10, eval_every_steps=20), "tuning.eval_every_steps"),
    (lambda: ModelConfig(num_layers=0), "model.num_layers"),
    (lambda: ModelConfig(hidden_size=130, num_heads=4), "model.hidden_size"),
    (lambda: ModelConfig(dropout=1.0), "model.dropout"),
    (lambda: WorldConfig(num_domains=0), "world.num_domains"),
    (lambda: WorldConfig(num_labels=17, num_classes=4), "world.num_labels"),
    (lambda: WorldConfig(task_train=1000, task_dev=1000, task_test=1000), "world.task_train"),
    (lambda: CorpusConfig("wb", source="text"), "corpus wb.path"),
    (lambda: CorpusConfig("wb", max_documents=0), "corpus wb.max_documents"),
    (lambda: CorpusConfig(""), "corpus.name"),
    (lambda: TaskConfig("chemprot", "bio", source="jsonl"), "task chemprot.path"),
    (lambda: PilotConfig(alphas=(0.0, 0.5)), "pilot.alphas"),
    (lambda: PilotConfig(hops=(0,)), "pilot.hops"),
    (lambda: PilotConfig(alphas=(0.0, 0.5, 1.5)), "pilot.alphas"),
    (lambda: PilotConfig(alphas=(0.0, 0.5, 0.5, 1.0)), "pilot.alphas"),
    (lambda: LoraConfig(rank=0), "tuning.lora.rank"),
    (lambda: LoraConfig(targets=()), "tuning.lora.targets"),
    (lambda: AdapterConfig(bottleneck=0), "tuning.adapter.bottleneck"),
    (lambda: TuningConfig(max_grad_norm=-1.0), "tuning.max_grad_norm"),
    (lambda: TuningConfig(weight_decay=-0.01), "tuning.weight_decay"),
    (lambda: PretrainConfig(weight_decay=-0.01), "pretrain.weight_decay"),
    (lambda: PretrainConfig(seed=2**63), "pretrain.seed"),
    (lambda: WorldConfig(seed=-1), "world.seed"),
    (lambda: SearchConfig(seed=2**31), "methods.search.seed"),
    (lambda: PilotConfig(hops=(1, 1)), "pilot.hops"),
    (lambda: PilotConfig(control_seed=-3), "pilot.control_seed"),
    (lambda: MethodsConfig(sources=()), "methods.sources"),
    (lambda: MethodsConfig(betas=(1.0, 1.0)), "methods.betas"),
    (lambda: CorpusConfig("a/b"), "corpus.name"),
    (lambda: CorpusConfig(" d1"), "corpus.name"),
    (lambda: TaskConfig("..", "d1"), "task.name"),
    (lambda: TaskConfig("t\\x", "d1"), "task.name"),
    (lambda: TaskConfig("t", "d1", source="jsonl", path="x", splits=("train", "dev", "dev")), "task t.splits"),
    (lambda: TaskConfig("t", "d1", source="jsonl", path="x", splits=("train", "a/dev", "test")), "task t.splits"),
    (lambda: TaskConfig("t", "d1", text_field="x", label_field="x"), "task t.text_field"),
])
def test_validation_errors_name_the_field(make, field):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(f"{field}: "), str(err.value)


def test_seeds_reach_the_limit_every_derived_stream_stays_within():
    import numpy as np
    import torch

    from raysys.config import SEED_LIMIT

    top = SEED_LIMIT - 1
    assert PretrainConfig(seed=top).seed == top  # accepted, and the streams derived from it seed torch and NumPy:
    torch.Generator().manual_seed((top * 7919 + 7) * 1000003 + 10**9)  # pre-training's per-step stream
    np.random.RandomState((top * 100003 + 10**4) % 2**32)  # an Optuna search's sampler
    with pytest.raises(ConfigError, match=r"^seeds: a seed must be in 0\.\.2\*\*31 - 1, got 2147483648"):
        load_study("tiny", [f"seeds=[1,{SEED_LIMIT}]"])


def test_hub_split_names_are_the_hubs_and_a_hop_past_a_short_chain_beside_one_within_it_is_allowed():
    assert TaskConfig("t", "d1", source="hf", path="ag_news", splits=("train", "test[:50%]", "test[50%:]"))
    assert load_study("tiny", ["pilot.hops=[1,9]"]).pilot.hops == (1, 9)  # the defaults (1, 2) on a chain of two


def test_defaults_are_valid_and_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    PretrainConfig(), TuningConfig(), ModelConfig(), WorldConfig(), PilotConfig()
    assert PretrainConfig(initial_steps=0).initial_steps == 0  # 0 = start from a checkpoint


def test_per_type_learning_rate_budget_and_pet_spec():
    tuning = TuningConfig(types=("finetune", "adapter"), lr=1e-3, pet_lr=5e-3, max_steps=100, pet_max_steps=250)
    assert (tuning.lr_for("finetune"), tuning.lr_for("adapter"), tuning.lr_for("lora")) == (1e-3, 5e-3, 5e-3)
    assert (tuning.max_steps_for("finetune"), tuning.max_steps_for("lora")) == (100, 250)
    plain = TuningConfig(lr=2e-4, max_steps=40)  # unset PET values fall back to fine-tuning's
    assert (plain.lr_for("lora"), plain.max_steps_for("adapter")) == (2e-4, 40)
    assert tuning.pet_spec("finetune") is None
    assert tuning.pet_spec("adapter") == {"bottleneck": 24}
    assert tuning.pet_spec("lora") == {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["query", "value"]}
    with pytest.raises(ConfigError, match=r"^tuning type: unknown 'prefix'"):
        tuning.pet_spec("prefix")
    with pytest.raises(ConfigError, match=r"^tuning\.eval_every_steps"):
        TuningConfig(max_steps=100, pet_max_steps=10, eval_every_steps=25)


def test_pretrained_chain_accepts_an_independent_control_checkpoint():
    study = load_study("paper", ["pilot.control_length=2", 'pilot.control_name_or_path="/ckpt/roberta-seed2"'])
    assert study.control_length == 2 and study.pilot.control_name_or_path == "/ckpt/roberta-seed2"
    with pytest.raises(ConfigError, match=r"^pilot\.control_name_or_path: "):
        load_study("paper", ["pilot.control_length=2"])


def _tiny_dict() -> dict:
    return load_preset("tiny")


def test_build_rejects_unknown_keys_naming_them():
    data = _tiny_dict()
    data["colour"] = "blue"
    with pytest.raises(ConfigError, match=r"^StudyConfig: unknown key\(s\) \['colour'\]"):
        build(StudyConfig, data)
    data = _tiny_dict()
    data["tuning"]["lora"]["rnak"] = 4
    with pytest.raises(ConfigError, match=r"^tuning\.lora: unknown key\(s\) \['rnak'\]; known: .*'rank'"):
        build(StudyConfig, data)
    data = _tiny_dict()
    data["corpora"][2]["pth"] = "x"
    with pytest.raises(ConfigError, match=r"^corpora\[2\]: unknown key\(s\) \['pth'\]"):
        build(StudyConfig, data)


@pytest.mark.parametrize("path,value,message", [
    (("pretrain", "batch_size"), "128", r"^pretrain\.batch_size: expected an integer, got '128'"),
    (("pretrain", "batch_size"), True, r"^pretrain\.batch_size: expected an integer"),
    (("pretrain", "batch_size"), 12.5, r"^pretrain\.batch_size: expected an integer"),
    (("pretrain", "lr"), "fast", r"^pretrain\.lr: expected a number"),
    (("pretrain", "use_gpu"), 1, r"^pretrain\.use_gpu: expected true/false"),
    (("name",), 7, r"^name: expected a string"),
    (("seeds",), 20, r"^seeds: expected a list"),
    (("seeds",), [20, "30"], r"^seeds\[1\]: expected an integer"),
    (("tuning",), 3, r"^tuning: expected a table"),
    (("corpora", 1, "source"), "ftp", r"^corpora\[1\]\.source: 'ftp' is not one of \['builtin'"),
    (("tasks", 0, "splits"), ["train", "dev"], r"^tasks\[0\]\.splits: expected 3 values, got 2"),
    (("tuning", "pet_lr"), "x", r"^tuning\.pet_lr: expected a number"),
])
def test_build_wrong_type_names_the_field(path, value, message):
    data = _tiny_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        build(StudyConfig, data)


def test_build_coerces_plain_values():
    data = _tiny_dict()
    data["pretrain"]["lr"] = 1  # an int where a float is expected
    data["tuning"]["pet_lr"] = None
    study = build(StudyConfig, data)
    assert study.pretrain.lr == 1.0 and isinstance(study.pretrain.lr, float)
    assert study.tuning.pet_lr is None
    assert study.seeds == (20, 30) and isinstance(study.seeds, tuple)
    assert isinstance(study.corpora, tuple) and all(isinstance(c, CorpusConfig) for c in study.corpora)
    assert study.tasks[0].splits == ("train", "dev", "test")


def test_build_missing_required_field():
    with pytest.raises(ConfigError, match=r"^CorpusConfig: .*'name'"):
        build(CorpusConfig, {"source": "builtin"})
    data = _tiny_dict()
    del data["tasks"]
    with pytest.raises(ConfigError, match=r"^StudyConfig: .*'tasks'"):
        build(StudyConfig, data)


@pytest.mark.parametrize("overrides,message", [
    (["tasks.0.domain=d9"], r"^task d1_rel\.domain: 'd9' is not one of \['d0', 'd1', 'd2', 'd3'\]"),
    (["corpora.1.name=d0"], r"^corpora: domain names must be unique"),
    (["corpora.3.name=d7", "tasks.2.domain=d7"], r"^corpus d7: builtin domains are \['d0', 'd1', 'd2', 'd3'\]"),
    (["tasks.0.domain=d0"], r"^task d1_rel\.domain: a builtin task belongs to a builtin domain"),
    (["seeds=[1,1]"], r"^seeds: must be distinct"),
    (["tune_plms=[0,4]"], r"^tune_plms: PLM index 4 outside 0\.\.3"),
    (["pilot.control_length=5"], r"^pilot\.control_length: the control chain cannot be longer"),
    (['model.name_or_path="roberta-base"'], r"^pilot\.control_name_or_path: "),
    (["corpora=[{\"name\": \"d0\"}]"], r"^corpora: a chain needs D0 and at least one further domain"),
])
def test_study_cross_field_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_study("tiny", overrides)


# ---------------------------------------------------------------------------------------------- overrides


def test_apply_override_dotted_keys_list_indices_and_json_values():
    data = _tiny_dict()
    before = copy.deepcopy(data)
    out = apply_override(data, "tuning.lr=5e-4")
    assert out is data
    assert data["tuning"]["lr"] == 5e-4
    apply_override(data, "corpora.1.name=x")
    assert data["corpora"][1] == {"name": "x"}  # a plain word is taken as a string
    apply_override(data, 'corpora.2.name="123"')
    assert data["corpora"][2]["name"] == "123"  # quoted JSON stays a string
    apply_override(data, "seeds=[1, 2,3]")
    assert data["seeds"] == [1, 2, 3]
    apply_override(data, "seeds.1=7")
    assert data["seeds"] == [1, 7, 3]
    apply_override(data, "pretrain.use_gpu=true")
    assert data["pretrain"]["use_gpu"] is True
    apply_override(data, "tuning.pet_max_steps=null")
    assert data["tuning"]["pet_max_steps"] is None
    apply_override(data, "tuning.lora.targets=[\"query\",\"key\"]")
    assert data["tuning"]["lora"]["targets"] == ["query", "key"]
    apply_override(data, 'corpora.3={"name": "d3", "max_documents": 10}')
    assert data["corpora"][3] == {"name": "d3", "max_documents": 10}
    apply_override(data, "name=a=b")  # only the first '=' separates key and value
    assert data["name"] == "a=b"
    apply_override(data, " pilot.hops =[3]")
    assert data["pilot"]["hops"] == [3]
    apply_override(data, "pilot.control_seed=4")  # a new key inside an existing table
    assert data["pilot"]["control_seed"] == 4
    untouched = {k: v for k, v in before.items() if k not in ("tuning", "corpora", "seeds", "pretrain", "name",
                                                               "pilot")}
    assert untouched == {k: data[k] for k in untouched}


def test_load_study_applies_overrides_in_order():
    study = load_study("tiny", ["tuning.lr=5e-4", "corpora.1.max_documents=100", "seeds=[1,2,3]", "seeds.2=9",
                                "pretrain.batch_size=8", "tuning.types=[\"lora\"]"])
    assert study.tuning.lr == 5e-4
    assert study.corpora[1] == CorpusConfig("d1", max_documents=100)
    assert study.seeds == (1, 2, 9)
    assert study.pretrain.batch_size == 8
    assert study.tuning.types == ("lora",)
    assert load_study("tiny") == build(StudyConfig, _tiny_dict())  # presets are re-read, never mutated


@pytest.mark.parametrize("assignment,message", [
    ("tuning.lr", r"^--set: expected key=value, got 'tuning\.lr'"),
    ("corpora.4.name=x", r"^--set corpora\.4: '4' is not an index into a list of 4"),
    ("corpora.-1.name=x", r"^--set corpora\.-1: '-1' is not an index into a list of 4"),
    ("corpora.one.name=x", r"^--set corpora\.one: 'one' is not an index"),
    ("seeds.5=1", r"^--set seeds\.5: '5' is not an index into a list of 2"),
    ("pretrain.lr.a.b=1", r"^--set pretrain\.lr\.a: cannot descend into a value"),
])
def test_apply_override_bad_paths_are_config_errors(assignment, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(_tiny_dict(), assignment)


@pytest.mark.parametrize("assignment,message", [
    ("bad.key=1", r"^StudyConfig: unknown key\(s\) \['bad'\]"),
    ("colour=1", r"^StudyConfig: unknown key\(s\) \['colour'\]"),
    ("tuning.bogus=1", r"^tuning: unknown key\(s\) \['bogus'\]"),
    ("tuning.lora.rnak=2", r"^tuning\.lora: unknown key\(s\) \['rnak'\]"),
    ("corpora.0.bogus=1", r"^corpora\[0\]: unknown key\(s\) \['bogus'\]"),
    ("pretrain.batch_size=big", r"^pretrain\.batch_size: expected an integer, got 'big'"),
    ("pretrain.continual_steps=-1", r"^pretrain\.continual_steps: must be > 0"),
    ("corpora.1.source=ftp", r"^corpora\[1\]\.source: 'ftp' is not one of"),
])
def test_unknown_or_invalid_override_names_the_field(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load_study("tiny", [assignment])


@pytest.mark.parametrize("assignment", ["name.x=1", "seeds.0.x=1", "pretrain.lr.x=1"])
def test_override_below_a_scalar_is_a_config_error(assignment):
    with pytest.raises(ConfigError, match=r"cannot descend into a value"):
        load_study("tiny", [assignment])


def test_unknown_preset_lists_the_available_ones():
    assert available_presets() == ["paper", "tiny"]
    with pytest.raises(ConfigError, match=r"^--preset: unknown preset 'huge'; available: \['paper', 'tiny'\]"):
        load_study("huge")


# ------------------------------------------------------------------------------------------------- presets


def test_tiny_preset_builds():
    study = load_study("tiny")
    assert study.name == "tiny"
    assert [c.name for c in study.corpora] == ["d0", "d1", "d2", "d3"]
    assert all(c.source == "builtin" for c in study.corpora)
    assert [(t.name, t.domain) for t in study.tasks] == [("d1_rel", "d1"), ("d2_rel", "d2"), ("d3_rel", "d3")]
    assert study.model.name_or_path is None and study.model.num_layers == 2
    assert study.tuning.types == ("finetune", "lora", "adapter")
    assert study.plms_to_tune == (0, 1, 2, 3)
    assert study.control_length == 2 and study.pilot.hops == (1,)
    assert study.pilot.alphas[0] == 0.0 and study.pilot.alphas[-1] == 1.0 and len(study.pilot.alphas) == 11
    assert study.pretrain.replay == 0.25 and study.tuning.max_steps == 300  # the paper's regime (issue 20)


def test_paper_preset_builds():
    study = load_study("paper")  # a packaged preset's data paths are relative to the working directory
    cwd = Path.cwd()
    assert study.name == "paper"
    assert study.model.name_or_path == "roberta-base"
    assert (study.model.hidden_size, study.model.num_layers, study.model.max_positions) == (768, 12, 512)
    assert [(c.name, c.source, c.path) for c in study.corpora] == [
        ("wb", "text", f"{cwd}/data/corpora/wb/*.txt"), ("bio", "text", f"{cwd}/data/corpora/bio/*.txt"),
        ("reviews", "text", f"{cwd}/data/corpora/reviews/*.txt")]
    assert [(t.name, t.domain, t.source, t.path) for t in study.tasks] == [
        ("chemprot", "bio", "jsonl", f"{cwd}/data/tasks"), ("helpfulness", "reviews", "jsonl", f"{cwd}/data/tasks")]
    assert study.seeds == (20, 30, 40)
    assert study.pretrain.initial_steps == 0 and study.pretrain.use_gpu is True
    assert study.tuning.max_steps_for("finetune") == 2610 and study.tuning.max_steps_for("adapter") == 6525
    assert study.tuning.lr_for("lora") == 2e-5
    assert study.tuning.weight_decay == 0.0  # the official scripts keep HF's default
    assert study.control_length == 0


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_to_dict_round_trips_through_json_and_build(preset):
    study = load_study(preset)
    plain = json.loads(json.dumps(to_dict(study)))
    assert build(StudyConfig, plain) == study
    assert config_hash(build(StudyConfig, plain)) == config_hash(study)


# --------------------------------------------------------------------------------------- frozen and hashing


def test_configs_are_frozen_and_hashable():
    study = load_study("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.pretrain.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.corpora[0].path = "x"
    with pytest.raises(TypeError):
        study.seeds[0] = 1  # tuples, not lists
    assert hash(study) == hash(load_study("tiny"))
    assert {study.world: 1}[load_study("tiny").world] == 1


def test_config_hash_is_stable_and_discriminating():
    a, b = load_study("tiny"), load_study("tiny")
    h = config_hash(a)
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == config_hash(b)
    assert config_hash(a.pretrain, "link", 3) == config_hash(b.pretrain, "link", 3)
    assert config_hash(load_study("tiny", ["tuning.lr=5e-4"])) != h
    assert config_hash(load_study("tiny", ["seeds=[30,20]"])) != h  # list order matters
    assert config_hash(a.pretrain, "x") != config_hash(a.pretrain, "y")
    assert config_hash(a.pretrain, "x") != config_hash("x", a.pretrain)
    assert config_hash(a.pretrain) != config_hash(a.tuning)
    # a config hashes as its plain view: what a worker rebuilds from a dict keys the same artifacts
    assert config_hash(PretrainConfig()) == config_hash(to_dict(PretrainConfig()))


def test_config_hash_is_independent_of_dict_key_order():
    data = _tiny_dict()
    reordered = {k: data[k] for k in reversed(list(data))}
    reordered["pretrain"] = {k: data["pretrain"][k] for k in reversed(list(data["pretrain"]))}
    reordered["corpora"] = [dict(reversed(list(c.items()))) for c in data["corpora"]]
    assert list(reordered) != list(data)
    assert config_hash(build(StudyConfig, reordered)) == config_hash(build(StudyConfig, data))
    assert config_hash(reordered) == config_hash(data)
    assert config_hash({"a": 1, "b": [1, {"x": 2, "y": 3}]}) == config_hash({"b": [1, {"y": 3, "x": 2}], "a": 1})
    assert config_hash({"a": 1, "b": 2}) != config_hash({"a": 2, "b": 1})


# ---------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def bad_override_process(tmp_path_factory):
    """`full_paper.py --set bad.key=1` as a real process (it costs seconds of imports), started here and awaited
    by the test that checks it, so the in-process test below runs meanwhile."""
    tmp = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "sweeps" / "full_paper.py"), "--set", "bad.key=1",
               "--storage", str(tmp / "store")]
    proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, tmp
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_cli_print_config_prints_the_resolved_config(bad_override_process, tmp_path, capsys):
    from raysys.sweep import driver as sweep

    argv = ["--print-config", "--set", "tuning.lr=5e-4", "--set", "corpora.1.max_documents=50",
            "--storage", str(tmp_path / "store")]
    assert sweep.main(argv) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    expected = load_study("tiny", ["tuning.lr=5e-4", "corpora.1.max_documents=50"])
    assert printed == json.loads(json.dumps(to_dict(expected)))
    assert printed["tuning"]["lr"] == 5e-4 and printed["corpora"][1]["max_documents"] == 50
    assert build(StudyConfig, printed) == expected
    assert not (tmp_path / "store").exists()
    assert sweep.main(["--preset", "paper", "--print-config"]) == 0
    assert build(StudyConfig, json.loads(capsys.readouterr().out)) == load_study("paper")
    # in-process, the same bad override returns 2 with the field named
    assert sweep.main(["--set", "tuning.lora.rank=0", "--storage", str(tmp_path / "store")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: tuning.lora.rank: must be >= 1")


def test_cli_bad_override_exits_2_naming_the_field_without_starting_ray(bad_override_process):
    proc, tmp = bad_override_process
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert "error: StudyConfig: unknown key(s) ['bad']" in stderr
    assert "Traceback" not in stderr
    assert stdout == ""  # main prints "raysys: study ..." before it starts Ray; nothing got that far
    assert not (tmp / "store").exists()


def test_a_preset_can_be_a_toml_file_of_your_own(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text((PRESET_DIR / "tiny.toml").read_text().replace('name = "tiny"', 'name = "mine"'))
    assert load_study(str(mine)).name == "mine"
    with pytest.raises(ConfigError, match=r"--preset: unknown preset '.*nope\.toml'.*or a \.toml file"):
        load_study(str(tmp_path / "nope.toml"))
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(ConfigError, match=r"--preset .*bad\.toml: invalid TOML"):
        load_study(str(tmp_path / "bad.toml"))


# ------------------------------------------------------------------------------------------ the GPU speed path


def test_speed_fields_validate_and_name_themselves():
    with pytest.raises(ConfigError, match="pretrain.precision"):
        load_study("tiny", ["pretrain.precision=fp16"])
    with pytest.raises(ConfigError, match="tuning.precision"):
        load_study("tiny", ["tuning.precision=half"])
    with pytest.raises(ConfigError, match=r"pretrain.micro_batch_size: .* \(batch_size / num_workers = 128\)"):
        load_study("tiny", ["pretrain.micro_batch_size=48"])  # tiny: 128 sequences, one worker
    with pytest.raises(ConfigError, match="pretrain.batch_size: 129 is not divisible by pretrain.num_workers = 2"):
        load_study("tiny", ["pretrain.batch_size=129", "pretrain.num_workers=2"])
    for field in ("tuning", "methods", "pilot"):
        with pytest.raises(ConfigError, match=f"{field}.gpus_per_trial: a fraction in \\(0, 1\\] or a whole number"):
            load_study("tiny", [f"{field}.gpus_per_trial=1.5"])
        assert getattr(load_study("tiny", [f"{field}.gpus_per_trial=0.25"]), field).gpus_per_trial == 0.25
        assert getattr(load_study("tiny", [f"{field}.gpus_per_trial=2"]), field).gpus_per_trial == 2.0


def test_the_paper_preset_runs_bf16_with_accumulation_and_gpu_shares():
    paper = load_study("paper")
    p = paper.pretrain
    assert (p.precision, p.use_gpu, p.batch_size, p.num_workers, p.micro_batch_size) == ("bf16", True, 2048, 8, 32)
    assert paper.tuning.precision == "bf16" and paper.tuning.length_bucketing
    assert (paper.tuning.gpus_per_trial, paper.methods.gpus_per_trial, paper.pilot.gpus_per_trial) == (1.0, 0.5, 0.25)


def test_relative_paths_resolve_against_the_study_file_and_set_against_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    (folder / "ckpt").mkdir(parents=True)
    (folder / "mine.toml").write_text(
        'name = "mine"\n[model]\nname_or_path = "ckpt"\n[pilot]\ncontrol_length = 0\n'
        '[[corpora]]\nname = "a"\nsource = "text"\npath = "corpora/a/*.txt"\n'
        '[[corpora]]\nname = "b"\nsource = "text"\npath = "s3://bucket/b/*.txt"\n'
        '[[tasks]]\nname = "t"\ndomain = "b"\nsource = "jsonl"\npath = "../tasks"\n')
    monkeypatch.chdir(tmp_path)
    study = load_study(str(folder / "mine.toml"), ["corpora.1.path=elsewhere/b/*.txt"])
    assert study.model.name_or_path == str(folder / "ckpt")  # an existing folder: a local checkpoint
    assert study.corpora[0].path == str(folder / "corpora" / "a" / "*.txt")
    assert study.corpora[1].path == str(tmp_path / "elsewhere" / "b" / "*.txt")  # given with --set: the cwd
    assert study.tasks[0].path == str(tmp_path / "tasks")
    assert load_study(str(folder / "mine.toml")).corpora[1].path == "s3://bucket/b/*.txt"  # URIs stay
    hub = load_study(str(folder / "mine.toml"), ["model.name_or_path=roberta-base"])
    assert hub.model.name_or_path == "roberta-base"  # no such folder: a hub name
    assert hub.world == WorldConfig()  # no [world] table: only built-in sources read it


def test_hub_options_belong_to_hub_sources():
    with pytest.raises(ConfigError, match=r"corpus wb\.config_name: config_name, revision and streaming"):
        CorpusConfig("wb", source="text", path="x", streaming=True)
    with pytest.raises(ConfigError, match=r"task t\.config_name"):
        TaskConfig("t", "d1", source="jsonl", path="x", revision="main")
    assert CorpusConfig("c4", source="hf", path="allenai/c4", config_name="en", streaming=True).streaming

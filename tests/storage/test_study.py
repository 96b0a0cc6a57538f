"""study.json: the study a storage holds round-trips, a broken one is refused naming the file, and one written
before `methods.methods` became `methods.names` still reads; a changed study is a new version, never written over
the old one."""

import json
from pathlib import Path

import pytest

from raysys.config import ConfigError, load_study, to_dict
from raysys.storage.store import Store
from raysys.storage.study import (
    STUDY_FILE,
    current_version,
    load_saved_study,
    load_version,
    read_progress,
    save_study,
    study_versions,
    write_progress,
)


def test_saved_study_round_trips_and_a_broken_one_names_the_file(tmp_path):
    study = load_study("tiny", ["seeds=[7]"])
    store = Store(tmp_path / "s")
    save_study(study, store)
    assert load_saved_study(store) == study
    (tmp_path / STUDY_FILE).write_text('{"seeds": "x"}')
    with pytest.raises(ConfigError, match="study.json"):
        load_saved_study(Store(tmp_path))
    with pytest.raises(FileNotFoundError, match="no study here"):
        load_saved_study(Store(tmp_path / "empty"))


def test_a_study_saved_before_methods_names_reads_as_today(tmp_path):
    study = load_study("tiny", ['methods.names=["vanilla","init"]'])
    old = to_dict(study)
    old["methods"] = {("methods" if k == "names" else k): v for k, v in old["methods"].items()}
    (tmp_path / STUDY_FILE).write_text(json.dumps(old))
    assert load_saved_study(Store(tmp_path)) == study


def test_progress_round_trips(tmp_path):
    store = Store(tmp_path)
    assert read_progress(store) is None
    write_progress(store, {"stage": "tuning", "done": 3})
    assert read_progress(store) == {"stage": "tuning", "done": 3}


def _files(tmp_path):
    return sorted(p.name for p in (tmp_path / "studies").iterdir())


def test_a_changed_study_is_a_new_version_and_an_old_one_comes_back_as_itself(tmp_path):
    store = Store(tmp_path)
    first, second = load_study("tiny"), load_study("tiny", ["tuning.lr=5e-4"])
    assert save_study(first, store) is None  # a first start: version 1, nothing to say
    [v1] = study_versions(store)
    kept = (tmp_path / v1.file).read_bytes()
    assert v1.number == 1 and kept == (tmp_path / STUDY_FILE).read_bytes()
    assert save_study(first, store) is None and len(study_versions(store)) == 1  # the same study: no change

    line = save_study(second, store)
    v2 = current_version(store)
    assert v2.number == 2 and v2.identity != v1.identity and load_saved_study(store) == second
    assert f"changed from version 1 ({v1.identity[:12]}) to new version 2 ({v2.identity[:12]})" in line
    assert "tuning.lr: 0.001 -> 0.0005" in line and line.count("->") == 1  # only what differs
    assert (tmp_path / v1.file).read_bytes() == kept and load_version(store, 1) == first

    line = save_study(first, store)  # the first study again: recognised, not a version 3
    assert "from version 2" in line and "back to version 1" in line and "tuning.lr: 0.0005 -> 0.001" in line
    assert current_version(store) == v1 and _files(tmp_path) == sorted(Path(v.file).name for v in (v1, v2))
    assert (tmp_path / STUDY_FILE).read_bytes() == kept


def test_resources_are_not_a_new_study_but_study_json_says_how_it_runs_now(tmp_path):
    store = Store(tmp_path)
    save_study(load_study("tiny"), store)
    busier = load_study("tiny", ["tuning.cpus_per_trial=2", "methods.search.parallel=8"])
    assert save_study(busier, store) is None
    assert len(study_versions(store)) == 1 and load_saved_study(store) == busier


def test_a_study_json_from_before_versions_is_kept_as_version_1(tmp_path):
    old = json.dumps(to_dict(load_study("tiny"))).encode()  # not as save_study formats it: kept as it is
    (tmp_path / STUDY_FILE).write_bytes(old)
    store = Store(tmp_path)
    line = save_study(load_study("tiny", ["seeds=[7]"]), store)
    assert "from version 1" in line and "seeds: [20, 30] -> [7]" in line
    v1, v2 = study_versions(store)
    assert (tmp_path / v1.file).read_bytes() == old and current_version(store) == v2

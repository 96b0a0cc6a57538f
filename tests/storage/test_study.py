"""study.json: the study a storage holds round-trips, a broken one is refused naming the file, and one written
before `methods.methods` became `methods.names` still reads."""

import json

import pytest

from raysys.config import ConfigError, load_study, to_dict
from raysys.storage.store import Store
from raysys.storage.study import STUDY_FILE, load_saved_study, read_progress, save_study, write_progress


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

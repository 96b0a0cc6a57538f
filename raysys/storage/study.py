"""The two files that describe a storage as a whole: `study.json`, the config of the study it holds (so that
`raysys status|report` need only the storage), and `progress.json`, the state of the sweep running on it."""

from __future__ import annotations

import json

from raysys.config import ConfigError, StudyConfig, build, to_dict
from raysys.storage.store import Store

STUDY_FILE = "study.json"
PROGRESS_FILE = "progress.json"
# Config keys renamed since storages were first written: old name -> new name, per section.
_RENAMED = {"methods": {"methods": "names"}}


def save_study(study: StudyConfig, store: Store) -> None:
    store.write_bytes(STUDY_FILE, json.dumps(to_dict(study), indent=1).encode())


def load_saved_study(store: Store) -> StudyConfig:
    payload = store.read_bytes(STUDY_FILE)
    if payload is None:
        raise FileNotFoundError(f"{store.uri(STUDY_FILE)}: no study here (not a raysys storage, or no sweep has "
                                "started in it)")
    try:
        return build(StudyConfig, _renamed(json.loads(payload)))
    except ValueError as err:  # not JSON, not UTF-8, or not a valid study (ConfigError)
        raise ConfigError(f"{store.uri(STUDY_FILE)}: {err}") from err


def _renamed(data):
    if not isinstance(data, dict):
        return data
    for section, names in _RENAMED.items():
        table = data.get(section)
        if isinstance(table, dict):
            data[section] = {names.get(k, k): v for k, v in table.items()}
    return data


def write_progress(store: Store, state: dict) -> None:
    store.write_bytes(PROGRESS_FILE, json.dumps(state).encode())


def read_progress(store: Store) -> dict | None:
    """The sweep's last progress, or None: none written yet, or a damaged file (each sweep rewrites it whole)."""
    payload = store.read_bytes(PROGRESS_FILE)
    try:
        return None if payload is None else json.loads(payload)
    except ValueError:
        return None

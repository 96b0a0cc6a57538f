"""The files that describe a storage as a whole: `study.json`, the config of the study it holds now (so that
`raysys status|report` need only the storage), `studies/`, every study it has held, and `progress.json`, the state
of the sweep running on it.

A storage can hold the rows of several studies: a rerun with `--set tuning.lr=...` into the same `--storage` adds
its cells beside the old ones (the shared ones, pre-training say, are reused). So a changed study is never written
over the old one silently: each identity (raysys.identity.study_identity) a storage has held is a *version*,
`studies/<version>-<identity12>.json`, written once and never replaced; `study.json` is the current one, and the
driver says when a start changes it, and what differs. A study that comes back gets its old version number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from raysys.config import ConfigError, StudyConfig, build, to_dict
from raysys.identity import study_fields, study_identity
from raysys.storage.store import Store

STUDY_FILE = "study.json"
VERSIONS_DIR = "studies"
PROGRESS_FILE = "progress.json"
# Config keys renamed since storages were first written: old name -> new name, per section.
_RENAMED = {"methods": {"methods": "names"}}


@dataclass(frozen=True)
class StudyVersion:
    number: int
    identity: str  # study_identity of its config, as the code reading it computes it
    file: str  # where its config is, relative to the storage root

    @property
    def label(self) -> str:
        return f"version {self.number} ({self.identity[:12]})"


def save_study(study: StudyConfig, store: Store) -> str | None:
    """Make `study` the storage's current study, recording it as a version if it is new. Returns a line saying
    so when this changes the storage's study (None on a first start or for the same study)."""
    payload = json.dumps(to_dict(study), indent=1).encode()
    before = store.read_bytes(STUDY_FILE)
    versions = study_versions(store)
    previous = None
    if before is not None:
        previous = _matching(versions, _identity(store, STUDY_FILE, before))
        if previous is None:  # written before versions existed (or by hand): kept as a version first
            previous = _record(store, versions, before)
    known = _matching(versions, study_identity(study))
    version = known or _record(store, versions, payload)
    if payload != before:  # the same study may differ in resources: study.json says how it runs now
        store.write_bytes(STUDY_FILE, payload)
    if previous is None or previous.number == version.number:
        return None
    try:
        what = changes(load_version(store, previous.number), study)
    except ConfigError:
        what = "the previous config no longer reads"
    to = f"back to {version.label}" if known else f"to new {version.label}"
    return (f"raysys: the study in {store.shown} changed from {previous.label} {to}: {what}. "
            f"Its report shows {version.label}'s cells only (raysys report --version {previous.number} for the "
            "previous one; a separate --storage keeps studies apart)")


def _identity(store: Store, rel: str, payload: bytes) -> str:
    try:
        return study_identity(_parse(store, rel, payload))
    except ConfigError:  # a config this code no longer reads: it is its bytes
        return hashlib.sha256(payload).hexdigest()[:16]


def _matching(versions: list[StudyVersion], identity: str) -> StudyVersion | None:
    return next((v for v in versions if v.identity == identity), None)


def _record(store: Store, versions: list[StudyVersion], payload: bytes) -> StudyVersion:
    """A new version holding `payload`, appended to `versions`. Its file is never written again."""
    number = 1 + max((v.number for v in versions), default=0)
    identity = _identity(store, STUDY_FILE, payload)
    version = StudyVersion(number, identity, f"{VERSIONS_DIR}/{number}-{identity[:12]}.json")
    store.write_bytes(version.file, payload)
    versions.append(version)
    return version


def study_versions(store: Store) -> list[StudyVersion]:
    """Every study the storage has held, oldest first; identities are computed again from the configs (the name's
    hash is the one of the code that wrote it)."""
    out = []
    for name in store.list_files(VERSIONS_DIR, ".json"):
        number = name.partition("-")[0]
        if number.isdigit():
            rel = f"{VERSIONS_DIR}/{name}"
            out.append(StudyVersion(int(number), _identity(store, rel, store.read_bytes(rel)), rel))
    return sorted(out, key=lambda v: v.number)


def current_version(store: Store, versions: list[StudyVersion] | None = None) -> StudyVersion | None:
    """The version study.json is (None for a storage from before versions, whose study.json is its only one)."""
    return version_of(load_saved_study(store), store, versions)


def version_of(study: StudyConfig, store: Store, versions: list[StudyVersion] | None = None) -> StudyVersion | None:
    return _matching(study_versions(store) if versions is None else versions, study_identity(study))


def load_version(store: Store, number: int) -> StudyConfig:
    """The config of version `number` of the storage's study."""
    versions = study_versions(store)
    version = next((v for v in versions if v.number == number), None)
    if version is None:
        raise ValueError(f"--version {number}: {store.shown} holds versions {[v.number for v in versions]} of its "
                         "study")
    return _parse(store, version.file, store.read_bytes(version.file))


def changes(old: StudyConfig, new: StudyConfig, most: int = 6) -> str:
    """What differs between two studies, as `key: old -> new`, resources aside."""
    a, b = _flat(study_fields(old)), _flat(study_fields(new))
    keys = sorted(set(a) | set(b))
    diff = [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in keys if a.get(k) != b.get(k)]
    more = f"; and {len(diff) - most} more" if len(diff) > most else ""
    return "; ".join(diff[:most]) + more if diff else "no field differs"


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _short(value, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def load_saved_study(store: Store) -> StudyConfig:
    payload = store.read_bytes(STUDY_FILE)
    if payload is None:
        raise FileNotFoundError(f"{store.uri(STUDY_FILE)}: no study here (not a raysys storage, or no sweep has "
                                "started in it)")
    return _parse(store, STUDY_FILE, payload)


def _parse(store: Store, rel: str, payload: bytes) -> StudyConfig:
    try:
        return build(StudyConfig, _renamed(json.loads(payload)))
    except ValueError as err:  # not JSON, not UTF-8, or not a valid study (ConfigError)
        raise ConfigError(f"{store.uri(rel)}: {err}") from err


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

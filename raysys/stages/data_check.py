"""The up-front check of a study's data, before any Ray work (the driver, `--dry-run`): every problem of every
source at once — a glob matching nothing, a missing or empty task split, a malformed line or a field of the wrong
type (file and line number), a missing field, a dev/test label the training split lacks (and where it first is), a
file that is not UTF-8 or not readable Parquet, a local checkpoint path that is no checkpoint — and, for the data
that passes, its fingerprint (its identity in every hash, raysys.core.sources).

Only data something uses is required: D0 when M0 is trained or the tokenizer is trained on it (a checkpoint kept
as it is needs neither), the tasks when a stage past pre-training runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from raysys.config import CorpusConfig, StudyConfig, TaskConfig, is_uri


class DataCheckError(ValueError):
    """The study's data has problems; `problems` lists each, naming its file or field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the study's data has problems:\n" + "\n".join(f"  - {p}" for p in problems))


def corpus_needed(study: StudyConfig, index: int) -> bool:
    """Every later link trains on its corpus; D0 is read to train M0 or, from scratch, the tokenizer."""
    return index > 0 or study.pretrain.initial_steps > 0 or not study.model.name_or_path


def tasks_needed(only: tuple[str, ...]) -> bool:
    return any(name != "pretrain" for name in only)


def _first_document(spec: CorpusConfig) -> None:
    """Reads up to the first document: a jsonl/parquet corpus without its text field fails here, not mid-run."""
    from raysys.core import sources

    if next(sources.documents(spec), None) is None:
        raise sources.DataError(f"corpus {spec.name}: no documents in {spec.path}")


def check_corpus(spec: CorpusConfig, cache) -> tuple[str | None, list[str]]:
    """(fingerprint, problems) of one corpus."""
    from raysys.core import sources

    if spec.source == "builtin":
        return None, []
    try:
        if spec.source == "hf":  # a hub corpus is checked where it is read (the driver may have no hub access)
            return sources.fingerprint(spec, cache), []
        files = sources.corpus_files(spec)
        found = sources.fingerprint_files(files, cache)
        # every file: one of another encoding (or a damaged shard) among many would fail pre-training mid-run
        problems = [p for f in files if (p := cache.checked(f, f"{spec.source}:{spec.text_field}",
                                                              lambda f, s=spec: sources.file_problem(s, f)))]
        if problems:
            return None, problems
        _first_document(spec)
        return found, []
    except sources.DataError as err:
        return None, [str(err)]


def _splits(spec: TaskConfig, files) -> tuple[dict, list[str]]:
    from raysys.core import data

    rows, problems = {}, []
    for split in data.SPLITS:
        try:
            rows[split] = data.read_split(spec, split, files)
        except data.DataError as err:
            problems.append(str(err))
    return rows, problems


def check_task(spec: TaskConfig, cache) -> tuple[str | None, list[str]]:
    """(fingerprint, problems) of one task: every split read and parsed, dev/test labels within train's."""
    from raysys.core import data, sources

    if spec.source == "builtin":
        return None, []
    files, problems = None, []
    if spec.source != "hf":
        files = {}
        for split, name in zip(data.SPLITS, spec.splits):  # name every missing split, not only the first
            try:
                files[split] = sources.task_file(spec, name)
            except sources.DataError as err:
                problems.append(str(err))
        if problems:
            return None, problems
    rows, problems = _splits(spec, files)
    if "train" in rows:
        known = data.label_names(rows["train"])
        for split in ("dev", "test"):
            unknown = data.unknown_labels(rows.get(split, []), known)
            if unknown:
                where = data.first_unknown(rows[split], known, (files or {}).get(split), spec.source)
                problems.append(f"task {spec.name}/{split}: labels {unknown} not in the training labels "
                                f"{[str(x) for x in known]}" + (f" (the first at {where})" if where else ""))
    if problems:
        return None, problems
    return (sources.hub_fingerprint(spec, list(spec.splits)) if spec.source == "hf"
            else sources.fingerprint_files(list(files.values()), cache)), []


def checkpoint_problems(study: StudyConfig) -> list[str]:
    """A checkpoint named by a local path (absolute or starting with '.', which a hub name never is) must be a
    folder with a config.json: otherwise it is taken for a hub name and fails on the cluster."""
    named = {"model.name_or_path": study.model.name_or_path,
             "pilot.control_name_or_path": study.pilot.control_name_or_path if study.control_length else None}
    problems = []
    for where, path in named.items():
        if not path or is_uri(path) or not path.startswith(("/", ".", "~")):
            continue
        folder = Path(path).expanduser()
        if not folder.is_dir():
            problems.append(f"{where}: no checkpoint folder at {path}")
        elif not (folder / "config.json").is_file():
            problems.append(f"{where}: {path} holds no config.json, so it is no checkpoint")
    return problems


def check_data(study: StudyConfig, only: tuple[str, ...]) -> StudyConfig:
    """The study with every used source fingerprinted; DataCheckError listing every problem otherwise. A source
    nothing uses is fingerprinted when it is there and skipped when it is not."""
    from raysys.core import sources

    cache, problems = sources.DigestCache(), checkpoint_problems(study)
    corpora, tasks = [], []
    for index, spec in enumerate(study.corpora):
        found, issues = check_corpus(spec, cache)
        problems += issues if corpus_needed(study, index) else []
        corpora.append(dataclasses.replace(spec, fingerprint=found))
    for spec in study.tasks:
        found, issues = check_task(spec, cache)
        problems += issues if tasks_needed(only) else []
        tasks.append(dataclasses.replace(spec, fingerprint=found))
    model = dataclasses.replace(study.model, checkpoint_fingerprint=sources.checkpoint_fingerprint(
        study.model.name_or_path, cache))
    pilot = dataclasses.replace(study.pilot, control_checkpoint_fingerprint=sources.checkpoint_fingerprint(
        study.pilot.control_name_or_path, cache))
    cache.save()
    if problems:
        raise DataCheckError(problems)
    return dataclasses.replace(study, corpora=tuple(corpora), tasks=tuple(tasks), model=model, pilot=pilot)

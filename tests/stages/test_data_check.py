"""raysys/stages/data_check.py: every problem of a study's data named up front; only used data required; the
data that passes fingerprinted (also over S3, through pyarrow.fs)."""

import dataclasses
import json
import re

import pytest

from raysys.config import CorpusConfig, StudyConfig, TaskConfig, build, load_study
from raysys.stages.chain import plan_chain
from raysys.stages.data_check import DataCheckError, check_data

ALL = ("pretrain", "tuning")


def _write_task(root, name, rows_by_split, ext="jsonl"):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (folder / f"{split}.{ext}").write_text(
            rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))


def _rows(labels):
    return [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)]


def _study(tmp_path, **model):
    """A study over files only (written here): no [world] table. A checkpoint given: no control chain."""
    for name in ("gen", "bio"):
        (tmp_path / "corpora" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpora" / name / "part.txt").write_text("a b c\nd e f\n")
    _write_task(tmp_path / "tasks", "chem", {"train": _rows("ab"), "dev": _rows("ab"), "test": _rows("ba")})
    return _study_at(tmp_path, **model)


def _study_at(root, **model):
    return build(StudyConfig, {
        "name": "mine", "model": model, "pilot": {"control_length": 0} if model else {},
        "corpora": [{"name": n, "source": "text", "path": str(root / "corpora" / n / "*.txt")} for n in ("gen", "bio")],
        "tasks": [{"name": "chem", "domain": "bio", "source": "jsonl", "path": str(root / "tasks")}]})


def test_a_study_over_files_needs_no_world_table_and_gets_fingerprints(tmp_path):
    study = check_data(_study(tmp_path), ALL)
    assert all(c.fingerprint.startswith("files:") for c in study.corpora)
    assert study.tasks[0].fingerprint.startswith("files:")
    assert len(plan_chain(study).plm_hashes) == 2


def test_every_problem_is_named_at_once(tmp_path):
    study = _study(tmp_path)
    (tmp_path / "corpora" / "bio" / "part.txt").unlink()
    _write_task(tmp_path / "tasks", "chem", {"dev": '{"text": "x", "label": "a"}\n{"text": oops}\n'})
    _write_task(tmp_path / "tasks", "help", {"train": _rows("ab"), "dev": _rows("abc"), "test": _rows("ab")})
    _write_task(tmp_path / "tasks", "gone", {"train": _rows("ab")})
    tasks = study.tasks + tuple(TaskConfig(n, "bio", source="jsonl", path=str(tmp_path / "tasks"))
                                for n in ("help", "gone"))
    with pytest.raises(DataCheckError) as err:
        check_data(dataclasses.replace(study, tasks=tasks), ALL)
    problems = err.value.problems
    assert len(problems) == 5, problems
    assert re.search(r"corpus bio: no files match '.*/bio/\*\.txt'", problems[0])
    assert re.search(r"chem/dev\.jsonl:2: invalid JSON", problems[1])
    assert problems[2] == (f"task help/dev: labels ['c'] not in the training labels ['a', 'b'] (the first at "
                           f"{tmp_path / 'tasks' / 'help' / 'dev.jsonl'}:3)")
    assert re.search(r"missing task file .*gone/dev\.jsonl$", problems[3])  # each missing split named
    assert re.search(r"missing task file .*gone/test\.jsonl$", problems[4])
    assert str(err.value).startswith("the study's data has problems:\n  - corpus bio")


def test_a_missing_field_is_named_with_its_file_and_line(tmp_path):
    study = _study(tmp_path)
    _write_task(tmp_path / "tasks", "chem", {"test": [{"text": "x", "label": "a"}, {"sentence": "y", "label": "b"}]})
    with pytest.raises(DataCheckError, match=r"chem/test\.jsonl:2: missing field 'text'"):
        check_data(study, ALL)
    (tmp_path / "corpora" / "gen" / "part.jsonl").write_text('{"body": "x"}\n')
    jsonl = dataclasses.replace(study.corpora[0], source="jsonl", path=str(tmp_path / "corpora" / "gen" / "*.jsonl"))
    _write_task(tmp_path / "tasks", "chem", {"test": _rows("ba")})
    with pytest.raises(DataCheckError, match=r"part\.jsonl:1: field 'text' not in the record \(have \['body'\]\)"):
        check_data(dataclasses.replace(study, corpora=(jsonl,) + study.corpora[1:]), ALL)


def test_unused_data_is_not_required(tmp_path):
    """D0 under a checkpoint kept as it is (0 steps, its own tokenizer) is never read; tasks only past pre-training."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    study = _study(tmp_path, name_or_path=str(tmp_path / "ckpt"))
    study = dataclasses.replace(study, pretrain=dataclasses.replace(study.pretrain, initial_steps=0))
    (tmp_path / "corpora" / "gen" / "part.txt").unlink()
    checked = check_data(study, ALL)
    assert checked.corpora[0].fingerprint is None and checked.corpora[1].fingerprint
    plan_chain(checked)  # D0 enters no hash
    trained = dataclasses.replace(study, pretrain=dataclasses.replace(study.pretrain, initial_steps=10))
    with pytest.raises(DataCheckError, match="corpus gen: no files match"):
        check_data(trained, ALL)
    (tmp_path / "tasks" / "chem" / "dev.jsonl").unlink()
    assert check_data(study, ("pretrain",)).tasks[0].fingerprint is None
    with pytest.raises(DataCheckError, match="missing task file"):
        check_data(study, ("pretrain", "tuning"))


def test_builtin_studies_are_unchanged_by_the_check():
    study = load_study("tiny")
    assert check_data(study, ALL) == study


def test_an_s3_corpus_is_globbed_fingerprinted_and_streamed(s3_uri):
    import pyarrow.fs as pafs

    from raysys.core import sources

    base, query = s3_uri("corpora/wb").split("?")
    fs, path = pafs.FileSystem.from_uri(f"{base}?{query}")
    for i in range(2):
        with fs.open_output_stream(f"{path}/part-{i}.txt") as f:
            f.write(f"s3 doc {i}a\ns3 doc {i}b\n".encode())
    spec = CorpusConfig("wb", source="text", path=f"{base}/*.txt?{query}")
    assert list(sources.documents(spec)) == ["s3 doc 0a", "s3 doc 0b", "s3 doc 1a", "s3 doc 1b"]
    checked = check_data_for(spec)
    assert checked.startswith("files:")
    assert [f.name for f in sources.corpus_files(spec)] == ["part-0.txt", "part-1.txt"]


def check_data_for(spec):
    from raysys.core.sources import DigestCache, fingerprint

    return fingerprint(spec, DigestCache())


def test_an_edited_task_gets_new_tuned_models_and_teacher_outputs_a_moved_one_keeps_them(tmp_path):
    """The hashes downstream of a task file: a tuned model, the encoded data distillation caches teachers under,
    and so the teacher cache key. Moving the folder changes none of them; editing a file changes all of them."""
    import shutil

    from raysys.identity import tuned_hash
    from raysys.stages.recipe import data_key
    from raysys.storage.artifacts import TeacherCache

    def keys(study):
        study = check_data(study, ALL)
        chain = plan_chain(study)
        task = study.tasks[0]
        tuned = tuned_hash(study, chain.plm_hashes[1], task, "finetune", 20)
        data = data_key(study, task, "kshot", 4, 20, chain.tokenizer_hash)
        return tuned, data, TeacherCache.key(None, tuned, data, True)

    first = keys(_study(tmp_path / "a"))
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert keys(_study_at(tmp_path / "b")) == first
    _write_task(tmp_path / "b" / "tasks", "chem", {"dev": _rows("ba")})
    edited = keys(_study_at(tmp_path / "b"))
    assert all(x != y for x, y in zip(edited, first))


def test_a_local_checkpoint_is_named_by_its_files_moving_it_keeps_its_plms_editing_it_does_not(tmp_path):
    """M0 from a local checkpoint folder: the check fingerprints its files, and that fingerprint, not the path,
    names the chain (tokenizer and every PLM): a moved folder keeps them, a weight file edited in place does not."""
    import shutil

    from raysys.core import models

    study = load_study("tiny")
    tokenizer = models.train_tokenizer(["a b c d e f g"] * 50, 300)
    folder = tmp_path / "ckpt"
    models.new_masked_lm(study.model, tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "note").write_text("not part of the checkpoint")

    def chain(path):
        checked = check_data(load_study("tiny", [f"model.name_or_path={path}", "pretrain.initial_steps=0",
                                                 "pilot.control_length=0"]), ("pretrain",))
        plan = plan_chain(checked)
        return checked.model.checkpoint_fingerprint, plan.tokenizer_hash, plan.plm_hashes

    first = chain(folder)
    fingerprint = first[0]
    assert fingerprint.startswith("files:")
    (folder / ".cache" / "note").write_text("changed")  # hidden files are not the checkpoint
    assert chain(folder) == first
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.move(folder, moved)
    assert chain(moved) == first
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    edited = chain(moved)
    assert edited[0] != fingerprint and edited[1] != first[1] and not set(edited[2]) & set(first[2])
    # a hub name has no files here: it is named as given
    assert load_study("tiny", ["model.name_or_path=some/hub-model", "pilot.control_length=0"]
                      ).model.checkpoint_fingerprint == ""


def test_a_corpus_file_of_another_encoding_is_named_with_its_line_and_a_sound_one_is_scanned_once(tmp_path,
                                                                                                monkeypatch):
    """Past the first document too (the check reads every file whole); training itself refuses it as well,
    never replacing the bytes."""
    from raysys.core import sources

    study = _study(tmp_path)
    part = tmp_path / "corpora" / "bio" / "part.txt"
    part.write_bytes(b"a b c\n" * 5000 + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataCheckError, match=rf"{re.escape(str(part))}:5001: not UTF-8 text \(byte 0xe9\)"):
        check_data(study, ALL)
    with pytest.raises(sources.DataError, match=r"part\.txt:5001: not UTF-8"):
        list(sources.documents(study.corpora[1]))
    part.write_bytes(b"a b c\n" * 5000)
    check_data(study, ALL)
    monkeypatch.setattr(sources, "utf8_problem", lambda file: pytest.fail(f"{file.uri} scanned again"))
    check_data(study, ALL)


def test_a_large_corpus_file_is_checked_by_the_blocks_its_digest_samples(tmp_path, monkeypatch):
    """Blocks start and end inside multi-byte characters: that is no error; a bad byte in one is, by offset."""
    from raysys.core import sources

    monkeypatch.setattr(sources, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 61)
    path = tmp_path / "big.txt"
    payload = ("\u00e9t\u00e9 \u20ac\n" * 800).encode()
    path.write_bytes(payload)
    file = sources.named_file(str(path), "big.txt", "corpus")
    assert file.size > 1000 and sources.utf8_problem(file) is None
    path.write_bytes(payload[:-5] + b"\xff" + payload[-4:])
    problem = sources.utf8_problem(sources.named_file(str(path), "big.txt", "corpus"))
    assert problem == f"{path}: not UTF-8 text (byte 0xff at offset {len(payload) - 5}); convert the file to UTF-8"


def test_empty_undecodable_and_mistyped_task_files_are_named(tmp_path):
    study = _study(tmp_path)
    folder = tmp_path / "tasks" / "chem"
    (folder / "dev.jsonl").write_text("")
    (folder / "test.jsonl").write_bytes(b'{"text": "x", "label": "a"}\n{"text": "\xff", "label": "b"}\n')
    (folder / "train.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": ["x"], "label": "b"}\n')
    with pytest.raises(DataCheckError) as err:
        check_data(study, ALL)
    assert [re.sub(r"^.*/tasks/", "", p) for p in err.value.problems] == [
        "chem/train.jsonl:2: field 'text' is [\"x\"], not text", "chem/dev.jsonl: no examples",
        "chem/test.jsonl:2: not UTF-8 text (byte 0xff); convert the file to UTF-8"]

"""Bad inputs, one case per kind: config values, preset files, storages, driver flags, data files and requests no
node of the cluster holds. Each runs the driver as a user would (a real run, not --dry-run, unless the flag is a
--dry-run one) and must exit 2 naming the culprit — the field, flag or file — with no traceback, having written
nothing: the working directory, a new storage folder included, is as it was, and a storage already there is byte
for byte the same. Every case but the cluster ones is refused before Ray starts."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys.storage import results
from raysys.storage.store import Store
from raysys.sweep import cluster
from raysys.sweep import driver as sweep


@dataclass(frozen=True)
class Case:
    """`argv(root)`: the arguments (after writing what the case needs under `root`, the working directory);
    `named`: a pattern the error must match, `{root}` standing for the folder; `ray`: the check needs the Ray
    (the cluster's resources), so the case runs on the tests' session Ray."""

    id: str
    argv: Callable[[Path], list[str]]
    named: str
    ray: bool = False


def tiny(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda root: ["--preset", "tiny", *[a for o in overrides for a in ("--set", o)]]


# --------------------------------------------------------------------------------- a study over files


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(labels: str) -> list[dict]:
    return [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)]


def file_study(root: Path) -> Path:
    """A study file over data under root/data: corpora gen (text) and bio (text), a jsonl task chem and a Parquet
    task help."""
    data = root / "data"
    for name in ("gen", "bio"):
        (data / "corpora" / name).mkdir(parents=True)
        (data / "corpora" / name / "part-0.txt").write_text("a b c\nd e f\n")
    for split, labels in (("train", "abab"), ("dev", "ab"), ("test", "ba")):
        _jsonl(data / "tasks" / "chem" / f"{split}.jsonl", _rows(labels))
        (data / "tasks" / "help").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(_rows(labels)), data / "tasks" / "help" / f"{split}.parquet")
    preset = root / "mine.toml"
    preset.write_text(
        'name = "mine"\n[model]\n'
        + "".join(f'[[corpora]]\nname = "{n}"\nsource = "text"\npath = "data/corpora/{n}/*.txt"\n' for n in ("gen", "bio"))
        + "".join(f'[[tasks]]\nname = "{t}"\ndomain = "bio"\nsource = "{s}"\npath = "data/tasks"\n'
                  for t, s in (("chem", "jsonl"), ("help", "parquet"))))
    return preset


def broken(damage: Callable[[Path], None], *overrides: str) -> Callable[[Path], list[str]]:
    """The file study with `damage(data folder)` done to it."""
    def argv(root: Path) -> list[str]:
        preset = file_study(root)
        damage(root / "data")
        return ["--preset", str(preset), *[a for o in overrides for a in ("--set", o)]]
    return argv


def _append(path: str, text: bytes) -> Callable[[Path], None]:
    return lambda data: (data / path).open("ab").write(text)


def _replace(path: str, payload: bytes) -> Callable[[Path], None]:
    return lambda data: (data / path).write_bytes(payload)


def _truncate(path: str) -> Callable[[Path], None]:
    return lambda data: (data / path).write_bytes((data / path).read_bytes()[:40])


def _unlink(pattern: str) -> Callable[[Path], None]:
    return lambda data: [p.unlink() for p in data.glob(pattern)]


def _parquet_corpus(data: Path) -> None:
    pq.write_table(pa.table({"text": ["x y z"] * 20}), data / "corpora" / "bio" / "part-0.parquet")
    _truncate("corpora/bio/part-0.parquet")(data)


def preset_file(payload: bytes) -> Callable[[Path], list[str]]:
    def argv(root: Path) -> list[str]:
        (root / "mine.toml").write_bytes(payload)
        return ["--preset", str(root / "mine.toml")]
    return argv


def flags(*args: str) -> Callable[[Path], list[str]]:
    return lambda root: ["--preset", "tiny", *args]


def storage_file(root: Path) -> list[str]:
    (root / "a-file").write_text("not a folder")
    return ["--preset", "tiny", "--storage", str(root / "a-file")]


def checkpoint(config: dict | None, *overrides: str) -> Callable[[Path], list[str]]:
    """The tiny study from a local checkpoint folder holding `config` as its config.json (None: nothing)."""
    def argv(root: Path) -> list[str]:
        (root / "ckpt").mkdir()
        if config is not None:
            (root / "ckpt" / "config.json").write_text(json.dumps(config))
        sets = [f"model.name_or_path={root / 'ckpt'}", "pilot.control_length=0", *overrides]
        return ["--preset", "tiny", *[a for o in sets for a in ("--set", o)]]
    return argv


TINY_TOML = (Path(__file__).resolve().parents[1] / "raysys" / "presets" / "tiny.toml").read_bytes()
F = r"{root}/data"  # the data folder, in `named`

CASES = [
    # config values that validation accepted and that then trained wrongly, hung or failed mid-run
    Case("clip-norm-negative", tiny("tuning.max_grad_norm=-1"), r"tuning\.max_grad_norm: must be > 0"),
    Case("clip-norm-zero", tiny("tuning.max_grad_norm=0"), r"tuning\.max_grad_norm: must be > 0"),
    Case("tuning-weight-decay-negative", tiny("tuning.weight_decay=-0.1"), r"tuning\.weight_decay: must be >= 0"),
    Case("pretrain-weight-decay-negative", tiny("pretrain.weight_decay=-1e-3"), r"pretrain\.weight_decay: must be >= 0"),
    Case("max-positions-below-sequence-length", tiny("model.max_positions=12"),
         r"model\.max_positions: 12 is shorter than pretrain\.sequence_length = 16"),
    Case("max-positions-below-task-length", tiny("tuning.max_length=128"),
         r"model\.max_positions: 64 is shorter than tuning\.max_length = 128"),
    Case("seed-beyond-64-bits", tiny(f"seeds=[{2**64 + 1}]"), r"seeds: a seed must be in 0\.\.2\*\*31 - 1"),
    Case("seed-negative", tiny("seeds=[-1]"), r"seeds: a seed must be in"),
    Case("pretrain-seed-too-large", tiny(f"pretrain.seed={2**40}"), r"pretrain\.seed: a seed must be in"),
    Case("world-seed-too-large", tiny(f"world.seed={2**64}"), r"world\.seed: a seed must be in"),
    Case("search-seed-negative", tiny("methods.search.seed=-5"), r"methods\.search\.seed: a seed must be in"),
    Case("control-seed-is-the-main-seed", tiny("pilot.control_seed=0"), r"pilot\.control_seed: equals pretrain\.seed"),
    Case("no-plms-to-tune", tiny("tune_plms=[]"), r"tune_plms: name at least one PLM index"),
    Case("plms-to-tune-repeated", tiny("tune_plms=[1,1]"), r"tune_plms: values must be distinct"),
    Case("pilot-hops-past-the-chain", tiny("pilot.hops=[7]"), r"pilot\.hops: no hop in \[7\] joins two tuned PLMs"),
    Case("pilot-hops-join-no-tuned-pair", tiny("tune_plms=[1,3]"), r"pilot\.hops: no hop in \[1\] joins two tuned"),
    Case("methods-hops-past-the-chain", tiny("methods.hops=[9]", "methods.sources=null"),
         r"methods\.hops: no tuned PLM has a successor"),
    Case("methods-sources-empty", tiny("methods.sources=[]"), r"methods\.sources: name at least one PLM index"),
    Case("methods-tasks-empty", tiny("methods.tasks=[]"), r"methods\.tasks: name at least one task"),
    Case("training-free-tasks-empty", tiny("methods.training_free.tasks=[]"),
         r"methods\.training_free\.tasks: name at least one task"),
    Case("grid-value-repeated", tiny("methods.temperatures=[5.0,5.0]"), r"methods\.temperatures: values must be"),
    Case("control-chain-of-one", tiny("pilot.control_length=1"), r"pilot\.control_length: 1 makes a control chain"),
    Case("task-name-with-a-path", tiny('tasks.0.name="../evil"'), r"task\.name: '\.\./evil' is not a plain name"),
    Case("task-name-hidden", tiny('tasks.0.name=".d1"'), r"task\.name: '\.d1' is not a plain name"),
    Case("task-name-empty", tiny('tasks.0.name=""'), r"task\.name: must not be empty"),
    Case("corpus-name-with-a-backslash", tiny('corpora.1.name="d1\\\\x"'), r"corpus\.name: .* is not a plain name"),
    Case("task-split-with-a-path", broken(lambda data: None, 'tasks.0.splits=["train","../dev","test"]'),
         r"task chem\.splits: '\.\./dev' is not a plain name"),
    Case("learning-rate-not-a-number", tiny("tuning.lr=NaN"), r"tuning\.lr: expected a finite number"),
    Case("learning-rate-infinite", tiny("tuning.lr=1e999"), r"tuning\.lr: expected a finite number"),
    Case("learning-rate-negative", tiny("tuning.lr=-1"), r"tuning\.lr: must be > 0"),
    Case("batch-size-zero", tiny("pretrain.batch_size=0"), r"pretrain\.batch_size: must be > 0"),
    Case("unknown-key", tiny("bad.key=1"), r"StudyConfig: unknown key\(s\) \['bad'\]"),
    Case("wrong-type", tiny('pretrain.batch_size="many"'), r"pretrain\.batch_size: expected an integer"),
    # preset files
    Case("preset-not-utf8", preset_file(TINY_TOML.replace(b'name = "tiny"', b'name = "t\xefny"')),
         r"--preset {root}/mine\.toml:4: not UTF-8 text \(byte 0xef\)"),
    Case("preset-not-toml", preset_file(b"name = \n"), r"--preset {root}/mine\.toml: invalid TOML"),
    Case("preset-unknown", flags("--preset", "nope"), r"--preset: unknown preset 'nope'"),
    # storages
    Case("storage-empty", flags("--storage", ""), r"--storage: empty"),
    Case("storage-blank", flags("--storage", "  "), r"--storage: empty"),
    Case("storage-unknown-scheme", flags("--storage", "nosuch://bucket/x"), r"--storage 'nosuch://bucket/x'"),
    Case("storage-is-a-file", storage_file, r"--storage {root}/a-file: is a file, not a folder"),
    # driver flags and cluster addresses
    Case("num-cpus-negative", flags("--num-cpus", "-2"), r"--num-cpus: must be >= 1, got -2"),
    Case("num-cpus-zero", flags("--num-cpus", "0"), r"--num-cpus: must be >= 1, got 0"),
    Case("search-trials-zero", flags("--search-trials", "0"), r"--search-trials: must be >= 1, got 0"),
    Case("max-failures-zero", flags("--max-failures", "0"), r"--max-failures: must be >= 1, got 0"),
    Case("assume-tflops-negative", flags("--dry-run", "--assume-tflops", "-1"), r"--assume-tflops: must be a number > 0"),
    Case("assume-tflops-nan", flags("--dry-run", "--assume-tflops", "nan"), r"--assume-tflops: must be a number > 0"),
    Case("address-empty", flags("--address", ""), r"--address: empty"),
    Case("address-unreachable", flags("--address", "127.0.0.1:9"), r"--address 127\.0\.0\.1:9: no Ray cluster answers"),
    # data files, checked up front
    Case("task-line-not-json", broken(_append("tasks/chem/train.jsonl", b'{"text": "half a record"\n')),
         F + r"/tasks/chem/train\.jsonl:5: invalid JSON"),
    Case("task-dev-label-unseen", broken(_append("tasks/chem/dev.jsonl", b'{"text": "x", "label": "c"}\n')),
         r"task chem/dev: labels \['c'\] not in the training labels \['a', 'b'\] \(the first at " + F
         + r"/tasks/chem/dev\.jsonl:3\)"),
    Case("task-file-empty", broken(_replace("tasks/chem/test.jsonl", b"")), F + r"/tasks/chem/test\.jsonl: no examples"),
    Case("task-file-not-utf8", broken(_append("tasks/chem/train.jsonl", b'{"text": "caf\xe9", "label": "a"}\n')),
         F + r"/tasks/chem/train\.jsonl:5: not UTF-8 text \(byte 0xe9\)"),
    Case("task-label-null", broken(_append("tasks/chem/train.jsonl", b'{"text": "x", "label": null}\n')),
         F + r"/tasks/chem/train\.jsonl:5: field 'label' is null, not a class name or number"),
    Case("task-text-not-text", broken(_append("tasks/chem/dev.jsonl", b'{"text": 7, "label": "a"}\n')),
         F + r"/tasks/chem/dev\.jsonl:3: field 'text' is 7, not text"),
    Case("task-split-missing", broken(_unlink("tasks/chem/dev.jsonl")), r"missing task file " + F
         + r"/tasks/chem/dev\.jsonl"),
    Case("task-parquet-truncated", broken(_truncate("tasks/help/dev.parquet")),
         F + r"/tasks/help/dev\.parquet: not a readable Parquet file"),
    Case("corpus-missing", broken(_unlink("corpora/bio/*.txt")), r"corpus bio: no files match '" + F
         + r"/corpora/bio/\*\.txt'"),
    Case("corpus-not-utf8-mid-file", broken(_append("corpora/gen/part-0.txt", b"x\n" * 6000 + b"caf\xe9\n")),
         F + r"/corpora/gen/part-0\.txt:6003: not UTF-8 text \(byte 0xe9\)"),
    Case("corpus-parquet-truncated", broken(_parquet_corpus, 'corpora.1.source="parquet"',
                                            "corpora.1.path=data/corpora/bio/*.parquet"),
         F + r"/corpora/bio/part-0\.parquet: not a readable Parquet file"),
    # checkpoints and what the stages need, checked before Ray starts
    Case("checkpoint-folder-missing", tiny("model.name_or_path=/nonexistent/roberta", "pilot.control_length=0"),
         r"model\.name_or_path: no checkpoint folder at /nonexistent/roberta"),
    Case("checkpoint-folder-without-config", checkpoint(None), r"model\.name_or_path: {root}/ckpt holds no config\.json"),
    Case("checkpoint-of-another-architecture", checkpoint({"model_type": "bert"}, "model.architecture=modernbert"),
         r"model\.architecture: 'modernbert', but model\.name_or_path \({root}/ckpt\) is a 'bert' checkpoint"),
    Case("outdated-weights-missing", flags("--only", "methods"),
         r"the methods need \d+ outdated tuned model\(s\) that do not exist"),
    # requests no node holds (the session Ray: one node of 2 CPUs)
    Case("trial-cpus-beyond-every-node", tiny("tuning.cpus_per_trial=64"),
         r"stage tuning: a trial needs 64 CPU on one node.*its nodes alive: 1 x \[2 CPU, \d+ GPU.*"
         r"tuning\.cpus_per_trial", ray=True),
    Case("trial-gpus-beyond-every-node", tiny("tuning.gpus_per_trial=64"),
         r"stage tuning: a trial needs 1 CPU, 64 GPU on one node.*tuning\.gpus_per_trial", ray=True),
    Case("pilot-cpus-beyond-every-node", tiny("pilot.cpus_per_trial=3"),
         r"stage compatibility: a trial needs 3 CPU.*pilot\.cpus_per_trial", ray=True),
    Case("ddp-workers-beyond-the-cluster", tiny("pretrain.num_workers=4", "pretrain.cpus_per_worker=1"),
         r"stage pretrain: each of its 4 workers, all at once, needs 1 CPU on one node, and the cluster holds 2 "
         r"at once.*pretrain\.num_workers", ray=True),
    Case("worker-resource-nobody-offers", tiny('pretrain.worker_resource="pretrain_gpu"'),
         r"stage pretrain: its one worker needs 2 CPU, 1 pretrain_gpu on one node.*pretrain\.worker_resource", ray=True),
]


# ------------------------------------------------------------------------------------------- the checks


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def prior_storage(folder: Path) -> None:
    """A storage an earlier sweep left: rows, a damaged row file, the study, progress and an artifact."""
    store = Store(folder)
    results.write_rows(store, "tuning_runs", "c0ffee", [{**results.provenance(results.now()), "task": "d1_rel"}])
    (folder / "results" / "tuning_runs" / "dead.parquet").write_bytes(b"PAR1 cut short")
    (folder / "study.json").write_text('{"name": "earlier"}')
    (folder / "progress.json").write_text('{"final": true}')
    (folder / "artifacts" / "plm" / "abc").mkdir(parents=True)
    (folder / "artifacts" / "plm" / "abc" / "config.json").write_text("{}")


def _no_ray(*args, **kwargs):
    raise AssertionError("the driver started Ray before refusing the input")


@pytest.mark.parametrize("prior", [False, True], ids=["new-storage", "prior-storage"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_refused_naming_it_and_writes_nothing(case, prior, tmp_path, monkeypatch, capsys, request):
    root = tmp_path / "work"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("RAY_ADDRESS", "")
    if case.ray:
        request.getfixturevalue("ray_cluster")
    else:  # refused before any Ray work, also in a process that runs a Ray (as the test session may)
        monkeypatch.setattr(sweep, "init_ray", _no_ray)
        monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    argv = case.argv(root)
    if "--storage" not in argv:
        argv += ["--storage", str(root / "store")]
    if prior:
        prior_storage(root / "store")
    before = snapshot(root)
    try:
        code = sweep.main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    out = capsys.readouterr()
    assert code == 2, out.err + out.out
    assert re.search(case.named.format(root=re.escape(str(root))), out.err, re.DOTALL), out.err
    assert out.err.startswith("error: ") and "Traceback" not in out.err + out.out
    assert snapshot(root) == before  # no storage made, no file touched (a prior storage's bytes included)


def test_the_catalogue_covers_every_kind_once():
    assert len({c.id for c in CASES}) == len(CASES) >= 60

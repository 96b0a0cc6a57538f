"""Experiment tracking: TensorBoard event files for every training trial (always), MLflow with `--tracker`."""

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest

from raysys.config import load_study
from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.storage.store import Store
from raysys.sweep import driver as sweep
from raysys.sweep.trackers import tracking_callbacks


def _event_tags(path: Path) -> set[str]:
    """Scalar tags of a TensorBoard event file (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    tags, data = set(), path.read_bytes()
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12 : 12 + length])
        tags |= {v.tag for v in event.summary.value}
        data = data[16 + length :]
    return tags


def test_every_training_trial_writes_its_curve_as_tensorboard_events(micro_run):
    study, store, _ = micro_run
    files = sorted((store.local / "ray" / "tune").glob("tuning-*/*/events.out.tfevents.*"))
    assert files, "no TensorBoard event files under <storage>/ray/tune"
    # (other tests add tuning experiments to this store whose cells fail before training: no curve there)
    curves = [f for f in files if {"ray/tune/dev_accuracy", "ray/tune/train_loss", "ray/tune/step"} <= _event_tags(f)]
    assert len(curves) >= len(stage("tuning").plan(study, plan_chain(study)))


def test_a_trial_is_named_and_configured_by_its_cells_fields(micro_run):
    """Trackers and the dashboard filter trials by their config's flat fields, and list them by name."""
    import json

    study, store, _ = micro_run
    cells = {(c.task, c.tuning_type, c.seed) for c in stage("tuning").plan(study, plan_chain(study))}
    found = set()
    for params in sorted((store.local / "ray" / "tune").glob("tuning-*/tuning-*/params.json")):
        config = json.loads(params.read_text())
        (cell,) = config["group"]["cells"]  # a tuning trial runs one cell
        assert {k: config[k] for k in ("task", "tuning_type", "seed", "chain", "plm_index")} == \
            {k: cell[k] for k in ("task", "tuning_type", "seed", "chain", "plm_index")}
        assert params.parent.name.startswith(f"tuning-{cell['chain']}-{cell['plm_index']}-{cell['task']}-"), \
            params.parent.name
        found.add((config["task"], config["tuning_type"], config["seed"]))
    assert cells <= found


def _session_hparams(path: Path) -> dict:
    """The hyper-parameters of a TensorBoard event file's HParams session (what the HParams view tabulates)."""
    from tensorboardX.proto import event_pb2, plugin_hparams_pb2

    data = path.read_bytes()
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        for value in event_pb2.Event.FromString(data[12 : 12 + length]).summary.value:
            if value.tag == "_hparams_/session_start_info":
                info = plugin_hparams_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                return {k: v.string_value or v.number_value for k, v in info.session_start_info.hparams.items()}
        data = data[16 + length :]
    return {}


def test_tensorboards_hparams_view_gets_each_trials_cell_fields(micro_run):
    study, store, _ = micro_run
    cells = {(c.task, c.tuning_type, c.seed) for c in stage("tuning").plan(study, plan_chain(study))}
    sessions = [_session_hparams(f) for f in (store.local / "ray" / "tune").glob("tuning-*/tuning-*/events.out.*")]
    found = {(h["group/fields/task"], h["group/fields/tuning_type"], int(h["group/fields/seed"]))
             for h in sessions if h}
    assert cells <= found


@pytest.fixture(scope="module")
def mlflow_tracked(micro_run, tmp_path_factory):
    """The micro study's compatibility baselines run again in a copy of its store with `--tracker mlflow` and the
    default tracking store (sqlite:///<storage>/mlflow.db): (study, store, cells run, the MLflow runs)."""
    from mlflow.tracking import MlflowClient

    from raysys.sweep.trackers import mlflow_uri

    study, shared, _ = micro_run
    store = Store(tmp_path_factory.mktemp("mlflow") / "copy")
    shutil.copytree(shared.root, store.root)
    shutil.rmtree(store.local / "results" / "baselines")  # these cells run again, now tracked
    ran = sweep.run_study(study, store, only=("compatibility",), log=lambda *_: None, tracker="mlflow")
    client = MlflowClient(mlflow_uri(store))
    experiment = client.get_experiment_by_name(f"raysys-{study.name}")
    return study, store, ran["compatibility"]["ran"], client.search_runs([experiment.experiment_id])


def test_mlflow_tracker_logs_each_trial(mlflow_tracked):
    _, store, ran, runs = mlflow_tracked
    assert ran > 0 and (store.local / "mlflow.db").is_file()
    # one MLflow run per trial; compatibility's evaluation cells share trials (raysys.sweep.launchers.trial_groups)
    assert 1 < len(runs) < ran
    assert sum(r.data.metrics["cells_ok"] for r in runs) == ran
    assert all(r.data.tags["stage"] == "compatibility" for r in runs)


README = (Path(__file__).parents[2] / "README.md").read_text()


def _readme_command(program: str) -> list[str]:
    """The README's command line that runs `program` (in backquotes), split as a shell would."""
    import shlex

    (line,) = set(re.findall(rf"`({program} [^`]+)`", README))
    return shlex.split(line)


@contextlib.contextmanager
def _serving(command: list[str], cwd: Path):
    """A viewer's server started as the user would (from `cwd`); yields `get(url, ready)`, which polls `url` until
    `ready(body)` and returns the body."""
    import subprocess
    import sys
    import urllib.request

    log = cwd / f"{command[0]}.log"
    # the virtualenv's commands, as in a shell that activated it
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with log.open("wb") as out:
        server = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "PATH": path})

    def get(url: str, ready, timeout: float = 120.0) -> str:
        deadline, body = time.time() + timeout, None
        while time.time() < deadline and server.poll() is None:
            try:
                body = urllib.request.urlopen(url, timeout=5).read().decode()
                if ready(body):
                    return body
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"{' '.join(command)}: {url} never ready (exit {server.poll()}); last body "
                             f"{(body or '')[:300]!r}; log:\n{log.read_text()[-2000:]}")

    try:
        yield get
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_readme_storage(store: Store, tmp_path: Path) -> Path:
    """A working directory in which the README's `runs/tiny` is this store."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(store.root)
    return tmp_path


def test_the_readmes_tensorboard_command_shows_the_tuning_curves(micro_run, tmp_path):
    study, store, _ = micro_run
    command = _readme_command("tensorboard")
    assert command[:2] == ["tensorboard", "--logdir"]
    port = _free_port()
    with _serving([*command, "--host", "127.0.0.1", "--port", str(port)], _as_readme_storage(store, tmp_path)) as get:
        body = get(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", lambda b: "ray/tune/dev_accuracy" in b)
    # a run per trial folder (`<experiment>/<trial>`); every tuning trial has its dev curve
    curves = {run for run, tags in json.loads(body).items() if "ray/tune/dev_accuracy" in tags}
    tuning = {run for run in curves if run.split("/")[-1].startswith("tuning-")}
    assert len(tuning) >= len(stage("tuning").plan(study, plan_chain(study)))


def test_the_readmes_mlflow_ui_command_serves_the_tracked_runs(mlflow_tracked, tmp_path):
    study, store, _, runs = mlflow_tracked
    command = _readme_command("mlflow ui")
    assert command[:3] == ["mlflow", "ui", "--backend-store-uri"]
    port, name = _free_port(), f"raysys-{study.name}"
    cwd = _as_readme_storage(store, tmp_path)
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    with _serving([*command, "--port", str(port)], cwd) as get:
        found = get(f"{api}/experiments/get-by-name?experiment_name={name}", lambda b: name in b)
        page = get(f"http://127.0.0.1:{port}/", lambda b: "<html" in b.lower())
    assert json.loads(found)["experiment"]["experiment_id"] == runs[0].info.experiment_id
    assert "mlflow" in page.lower()  # the UI itself (mlflow-skinny has only the API)


def test_unknown_tracker_setup_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--tracker: unknown 'neptune'; known: mlflow, wandb"):
        tracking_callbacks("neptune", load_study("tiny"), Store(tmp_path), "tuning")
    assert not (tmp_path / "results").exists()


def _wandb_records(path: Path):
    """The records of a W&B run file (`run-<id>.wandb`): LevelDB's log format — 32 KiB blocks of chunks, each with
    a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) — after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(path: Path) -> tuple[dict, list[dict]]:
    """(a W&B run's config, its logged history rows), read back from its offline run file."""
    config, history = {}, []
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            config["_group"] = record.run.run_group
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return config, history


@pytest.fixture(scope="module")
def tracked_tuning(micro_run, tmp_path_factory):
    """Two of the micro study's tuning cells run again in a copy of its store, with `--tracker wandb` (no API key
    here: offline) and the progress file rewritten at every step of Tune's loop, read meanwhile by `raysys status`
    as a user would in another terminal: (study, store, the cells, what status printed while they ran)."""
    import threading

    from raysys.report.status import status_text

    study, shared, _ = micro_run
    store = Store(tmp_path_factory.mktemp("tracked") / "copy")
    shutil.copytree(shared.root, store.root)
    cells = [c for c in stage("tuning").plan(study, plan_chain(study)) if c.chain == "main"][:2]
    for cell in cells:
        for table in ("tuning_runs", "tuning_curves"):
            (store.local / "results" / table / f"{cell.cell_hash}.parquet").unlink()
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(status_text(store))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    environment = {k: os.environ.pop(k) for k in ("WANDB_MODE", "WANDB_API_KEY") if k in os.environ}
    patch = pytest.MonkeyPatch()
    patch.setattr(sweep, "PROGRESS_EVERY_S", 0.0)
    patch.setenv("NETRC", str(store.local / "no-netrc"))  # no `wandb login` on this machine either
    watcher.start()
    try:
        ran = sweep.run_study(study, store, only=("tuning",), log=lambda *_: None, tracker="wandb")
    finally:
        stop.set()
        watcher.join()
        patch.undo()
        os.environ.update(environment)
    assert ran["tuning"]["ran"] == len(cells)
    return study, store, cells, seen


def test_wandb_tracker_logs_each_trial_offline_with_its_cell_fields_and_curve(tracked_tuning):
    from raysys.storage import results

    study, store, cells, _ = tracked_tuning
    files = sorted((store.local / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == len(cells), files  # one offline run per trial, waiting for `wandb sync`
    runs = [_wandb_run(f) for f in files]
    by_cell = {(c["task"], c["tuning_type"], c["seed"], c["plm_index"]): (c, h) for c, h in runs}
    for cell in cells:
        config, history = by_cell[(cell.task, cell.tuning_type, cell.seed, cell.plm_index)]
        assert config["_group"] == "tuning" and config["chain"] == cell.chain
        curve = [r for r in results.read_table(store, "tuning_curves").to_pylist()
                 if r["cell_hash"] == cell.cell_hash]
        logged = [(h["step"], h["dev_accuracy"]) for h in history if "dev_accuracy" in h]
        assert logged == [(r["step"], r["dev_accuracy"]) for r in sorted(curve, key=lambda r: r["step"])]
        assert len(logged) == study.tuning.max_steps // study.tuning.eval_every_steps  # every evaluation


def test_status_lists_the_running_trials_with_their_current_dev_accuracy(tracked_tuning):
    _, _, cells, seen = tracked_tuning
    running = [text for text in seen if "running:" in text]
    assert running, "raysys status never saw the sweep running"
    current = [line.strip() for text in running for line in text.splitlines() if "dev accuracy" in line]
    assert current, "no running trial's dev accuracy was shown"
    for line in current:  # `tuning-main-<plm>-<task>-<type>-<seed>-<id>: step 8, dev accuracy 41.7%, train loss 1.234`
        match = re.fullmatch(r"(tuning-main-\S+): step (\d+), dev accuracy (\d+\.\d)%(, train loss \d+\.\d{3})?", line)
        assert match, line
        assert any(match[1].startswith(f"tuning-main-{c.plm_index}-{c.task}-{c.tuning_type}-{c.seed}-")
                   for c in cells), line
    assert seen[-1].rstrip().endswith("no sweep is running on this storage")

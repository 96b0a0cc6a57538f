"""Experiment tracking: TensorBoard event files for every training trial (always), MLflow with `--tracker`."""

import shutil
import struct
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


def test_mlflow_tracker_logs_each_trial(micro_run, tmp_path):
    from mlflow.tracking import MlflowClient

    study, shared, _ = micro_run
    store = Store(tmp_path / "copy")
    shutil.copytree(shared.root, store.root)
    shutil.rmtree(store.local / "results" / "baselines")  # these cells run again, now tracked
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ran = sweep.run_study(study, store, only=("compatibility",), log=lambda *_: None, tracker="mlflow",
                          tracking_uri=uri)
    assert ran["compatibility"]["ran"] > 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"raysys-{study.name}")
    runs = client.search_runs([experiment.experiment_id])
    # one MLflow run per trial; compatibility's evaluation cells share trials (raysys.sweep.launchers.trial_groups)
    assert 1 < len(runs) < ran["compatibility"]["ran"]
    assert sum(r.data.metrics["cells_ok"] for r in runs) == ran["compatibility"]["ran"]
    assert all(r.data.tags["stage"] == "compatibility" for r in runs)


def test_unknown_tracker_setup_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--tracker"):
        tracking_callbacks("wandb", load_study("tiny"), Store(tmp_path), "tuning")
    assert not (tmp_path / "results").exists()

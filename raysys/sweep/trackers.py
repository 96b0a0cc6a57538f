"""Experiment trackers beside Tune's own loggers (TensorBoard event files are always written per trial)."""

from __future__ import annotations

import os

from raysys.config import StudyConfig
from raysys.storage.store import Store


def mlflow_uri(store: Store, uri: str | None = None) -> str:
    """Where `--tracker mlflow` logs: the given URI, else $MLFLOW_TRACKING_URI, else an SQLite file in the storage
    (MLflow 3's `./mlruns` file store refuses new writes unless MLFLOW_ALLOW_FILE_STORE is set)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store.local / 'mlflow.db'}"


def tracking_callbacks(tracker: str | None, study: StudyConfig, store: Store, stage: str,
                       uri: str | None = None) -> tuple:
    """The callbacks of `--tracker` for one stage's experiments (none without a tracker)."""
    if tracker is None:
        return ()
    if tracker != "mlflow":
        raise ValueError(f"--tracker: unknown '{tracker}'; known: mlflow")
    try:
        import mlflow  # noqa: F401 — fail here, with the fix, not inside Tune
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError as err:
        raise ValueError("--tracker mlflow needs MLflow: pip install -e '.[mlflow]' (in the raysys checkout)") from err
    return (MLflowLoggerCallback(tracking_uri=mlflow_uri(store, uri), experiment_name=f"raysys-{study.name}",
                                 tags={"stage": stage, "storage": store.shown}),)

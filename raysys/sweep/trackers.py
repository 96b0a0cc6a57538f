"""Experiment trackers beside Tune's own loggers (TensorBoard event files are always written per trial)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from raysys.config import StudyConfig
from raysys.storage.store import Store

TRACKERS = ("mlflow", "wandb")


def mlflow_uri(store: Store, uri: str | None = None) -> str:
    """Where `--tracker mlflow` logs: the given URI, else $MLFLOW_TRACKING_URI, else an SQLite file in the storage
    (MLflow 3's `./mlruns` file store refuses new writes unless MLFLOW_ALLOW_FILE_STORE is set)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store.local / 'mlflow.db'}"


def wandb_dir(store: Store) -> Path:
    """Where `--tracker wandb` keeps its runs (offline runs wait there for `wandb sync`)."""
    return store.local / "wandb"


def wandb_mode() -> str:
    """$WANDB_MODE when set; else online when an API key is at hand ($WANDB_API_KEY, or `wandb login`'s entry in
    ~/.netrc or the file $NETRC names, as wandb reads them), offline otherwise: a sweep never stops for want of a
    login, and `wandb sync` uploads its runs later."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


def tracker_line(tracker: str | None, store: Store, uri: str | None = None) -> str | None:
    """What the driver says of its tracker before it starts: where the runs go."""
    if tracker == "mlflow":
        return f"tracking: MLflow at {mlflow_uri(store, uri)}"
    if tracker == "wandb":
        mode = wandb_mode()
        where = wandb_dir(store) / "wandb"
        return f"tracking: W&B, {mode}" + (f", runs in {where} (upload: wandb sync {where}/offline-run-*)"
                                           if mode == "offline" else "")
    return None


def tracking_callbacks(tracker: str | None, study: StudyConfig, store: Store, stage: str,
                       uri: str | None = None) -> tuple:
    """The callbacks of `--tracker` for one stage's experiments (none without a tracker)."""
    if tracker is None:
        return ()
    if tracker == "mlflow":
        return (_mlflow(study, store, stage, uri),)
    if tracker == "wandb":
        return (_wandb(study, store, stage),)
    raise ValueError(f"--tracker: unknown '{tracker}'; known: {', '.join(TRACKERS)}")


def _mlflow(study: StudyConfig, store: Store, stage: str, uri: str | None):
    try:
        import mlflow  # noqa: F401 — fail here, with the fix, not inside Tune
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError as err:
        raise ValueError("--tracker mlflow needs MLflow: pip install -e '.[mlflow]' (in the raysys checkout)") from err
    return MLflowLoggerCallback(tracking_uri=mlflow_uri(store, uri), experiment_name=f"raysys-{study.name}",
                                tags={"stage": stage, "storage": store.shown})


def _wandb(study: StudyConfig, store: Store, stage: str):
    try:
        import wandb  # noqa: F401
        from ray.air.integrations.wandb import WandbLoggerCallback
    except ImportError as err:
        raise ValueError("--tracker wandb needs wandb: pip install -e '.[wandb]' (in the raysys checkout)") from err

    class Callback(WandbLoggerCallback):
        def setup(self, *args, **kwargs):
            Path(self.kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            # Ray's setup demands an API key unless the driver's $WANDB_MODE says offline; here the mode is given
            if self.kwargs["mode"] != "offline":
                super().setup(*args, **kwargs)

    # one W&B project per study, a group per stage: runs filter by the trial config's flat cell fields
    return Callback(project=f"raysys-{study.name}", group=stage, mode=wandb_mode(), dir=str(wandb_dir(store)),
                    tags=[stage])

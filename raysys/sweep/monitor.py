"""Custom Ray metrics, shown in the Ray dashboard's Metrics view (Prometheus + Grafana) and served by every node's
metrics endpoint (`ray_` prefix): the sweep's progress per stage, recorded by the driver, and the current training
loss and throughput of each running trial, recorded by the trial (docs/monitoring.md)."""

from __future__ import annotations

import math

from ray.util.metrics import Gauge

_GAUGES: dict[str, Gauge] = {}


def _gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> Gauge:
    """One Gauge object per process and name (Ray registers a metric once per process)."""
    if name not in _GAUGES:
        _GAUGES[name] = Gauge(name, description=description, tag_keys=tag_keys)
    return _GAUGES[name]


def record_stage(stage: str, total: int, done: int, failed: int, running: int) -> None:
    """`raysys_cells{stage, state}`: cells planned (total), done, failed, and trials running."""
    gauge = _gauge("raysys_cells", "cells of a sweep stage, by state (total, done, failed; running trials)",
                   ("stage", "state"))
    for state, value in (("total", total), ("done", done), ("failed", failed), ("running", running)):
        gauge.set(value, tags={"stage": stage, "state": state})


def record_trial(stage: str, cell: str, metrics: dict) -> None:
    """`raysys_train_loss{stage, cell}` and `raysys_tokens_per_second{stage, cell}` of a training trial, from the
    metrics it reports at each evaluation (`train_loss`, or `loss` for pre-training)."""
    tags = {"stage": stage, "cell": cell[:12]}
    loss = metrics.get("train_loss", metrics.get("loss"))
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        _gauge("raysys_train_loss", "current training loss of a trial", ("stage", "cell")).set(loss, tags=tags)
    speed = metrics.get("tokens_per_second")
    if isinstance(speed, (int, float)) and math.isfinite(speed):
        _gauge("raysys_tokens_per_second", "training throughput of a trial (non-padding tokens per second)",
               ("stage", "cell")).set(speed, tags=tags)

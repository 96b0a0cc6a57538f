"""raysys/sweep/monitor.py: the sweep's progress and each trial's loss and throughput reach Ray's metrics endpoint (what
Prometheus scrapes for the dashboard's Metrics view)."""

import re
import time
import urllib.request


def _metrics_text(ray) -> str:
    port = ray._private.worker.global_worker.node.metrics_export_port
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _samples(text: str, name: str) -> list[tuple[dict, float]]:
    out = []
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match:
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))), float(match.group(2))))
    return out


def _wait_for(ray, name: str, predicate, timeout: float = 90.0) -> list[tuple[dict, float]]:
    """Metrics are exported every few seconds: poll until a sample satisfies `predicate`."""
    deadline = time.time() + timeout
    while True:
        samples = _samples(_metrics_text(ray), name)
        if any(predicate(tags, value) for tags, value in samples) or time.time() > deadline:
            return samples
        time.sleep(2)


def test_stage_progress_is_exported_by_the_driver(ray_cluster, tmp_path):
    from raysys.storage.store import Store
    from raysys.sweep.progress import Progress

    # a stage name no other test's driver reports: the session's other sweeps export their own stages' gauges
    progress = Progress("probe", lambda: 3, 5, Store(tmp_path), log=lambda *_: None)
    progress.failed = 1
    progress.report(running=2)  # what the Tune callback does every 15 s while the stage runs
    mine = lambda tags, value: tags.get("stage") == "probe"
    samples = _wait_for(ray_cluster, "ray_raysys_cells", lambda t, v: mine(t, v) and t["state"] == "running")
    assert {t["state"]: v for t, v in samples if mine(t, v)} == {"total": 5, "done": 3, "failed": 1, "running": 2}


def test_a_trials_loss_and_throughput_are_exported(ray_cluster):
    @ray_cluster.remote(num_cpus=0)
    class Trial:
        def report(self):
            import tempfile

            from ray import tune

            from raysys.storage.store import Store
            from raysys.sweep.launchers import checkpointer_factory  # the hook every training trial reports through

            checkpointer = checkpointer_factory(tune, Store(tempfile.mkdtemp()), "tuning")("c0ffee" * 4, 600.0)
            checkpointer.report({"step": 8, "train_loss": 0.75, "tokens_per_second": 1234.5})
            return True

    trial = Trial.remote()
    assert ray_cluster.get(trial.report.remote())
    mine = lambda tags, value: tags.get("cell") == "c0ffeec0ffee" and tags.get("stage") == "tuning"
    loss = _wait_for(ray_cluster, "ray_raysys_train_loss", mine)
    speed = _wait_for(ray_cluster, "ray_raysys_tokens_per_second", mine)
    assert [v for t, v in loss if mine(t, v)] == [0.75]
    assert [v for t, v in speed if mine(t, v)] == [1234.5]
    ray_cluster.kill(trial)

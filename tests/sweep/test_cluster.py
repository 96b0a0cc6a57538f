"""Which Ray the driver runs on: an explicit address must answer, `auto` must find one, `local` starts a new one;
`--preset auto` follows the GPUs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysys.sweep import cluster
from raysys.sweep import driver as sweep

SCRIPT = Path(__file__).resolve().parents[2] / "sweeps" / "full_paper.py"


def test_the_driver_attaches_to_a_running_cluster_and_refuses_an_unreachable_one(ray_cluster, monkeypatch):
    gcs = ray_cluster.get_runtime_context().gcs_address
    assert cluster.discover_cluster(gcs) == (gcs, f"the cluster at {gcs} (--address)")
    monkeypatch.setenv("RAY_ADDRESS", gcs)
    assert cluster.discover_cluster(None) == (gcs, f"the cluster at {gcs} ($RAY_ADDRESS)")
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster.discover_cluster("local") == (None, "a new local Ray (--address local)")
    with pytest.raises(cluster.ClusterError, match="--address auto: no running Ray cluster"):
        cluster.discover_cluster("auto")  # the test cluster came from ray.init, not `ray start`


def test_an_unreachable_address_stops_the_driver_before_any_work(tmp_path):
    storage = tmp_path / "never"
    started = time.time()
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--address", "127.0.0.1:9",
                          "--storage", str(storage)], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2 and "--address 127.0.0.1:9: no Ray cluster answers there" in out.stderr
    assert time.time() - started < 60 and not storage.exists()


def test_auto_preset_is_paper_with_gpus_and_says_why(tmp_path, capsys):
    assert cluster.choose_preset(0) == ("tiny", "no GPU in the cluster")
    assert cluster.choose_preset(8) == ("paper", "8 GPU(s) in the cluster")
    assert sweep.main(["--dry-run", "--storage", str(tmp_path / "plan")]) == 0  # the default preset is auto
    out = capsys.readouterr().out
    assert "--preset auto -> tiny (no GPU in this machine)" in out and "(preset tiny)" in out

"""On a cluster of more than one node the storage must be one every node sees: tested on a two-node
`ray.cluster_utils.Cluster` run by a separate process (this session's own Ray stays as it is), then with a third
node started in a private mount namespace, where the driver's storage folder is hidden under an empty tmpfs — the
way a worker's own disk hides the head's."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "sweeps" / "full_paper.py"

HOLD_CLUSTER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                  head_node_args={"num_cpus": 1, "gcs_server_port": int(sys.argv[1]), "include_dashboard": False})
cluster.add_node(num_cpus=1)
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes our stdin
cluster.shutdown()
"""

PROBE = """
import json, sys
import ray
from raysys.storage.store import Store
from raysys.sweep.storage_check import unshared_nodes
ray.init(address=sys.argv[1], configure_logging=False)
print(json.dumps({"nodes": len([n for n in ray.nodes() if n["Alive"]]), "unshared": unshared_nodes(Store(sys.argv[2]))}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(address: str, storage: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, address, str(storage)], capture_output=True, text=True,
                         timeout=300, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wait_for_nodes(address: str, count: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if _probe(address, Path("/nonexistent-raysys-probe"))["nodes"] >= count:
            return
        time.sleep(1)
    raise AssertionError(f"the cluster never reached {count} nodes")


@pytest.fixture
def two_node_cluster():
    """(address of a two-node local Cluster); the machine's `ray start` address file is left as it was."""
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.is_file() else None
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLUSTER, str(_free_port())], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        yield holder.stdout.readline().strip()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)


@pytest.fixture
def hidden_storage_node(two_node_cluster, tmp_path):
    """A third node that sees an empty tmpfs at `tmp_path/hidden`: (address, the hidden folder)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], check=False).returncode:
        pytest.fail("needs `unshare -m` (root, util-linux) to give one node a disk of its own")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    ray = Path(sys.executable).with_name("ray")
    node = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         (f'mount -t tmpfs tmpfs "{hidden}" && exec "{ray}" start --address={two_node_cluster} --num-cpus=1 '
          "--object-store-memory=100000000 --block")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_nodes(two_node_cluster, 3)
        yield two_node_cluster, hidden
    finally:
        processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        for proc in processes:
            proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(processes, timeout=30)


def test_a_storage_every_node_reads_passes_and_so_does_one_node(two_node_cluster, ray_cluster, tmp_path):
    from raysys.storage.store import Store
    from raysys.sweep.storage_check import unshared_nodes

    probed = _probe(two_node_cluster, tmp_path / "shared")
    assert probed == {"nodes": 2, "unshared": {}}
    assert not (tmp_path / "shared").exists()  # the probe made the folder and took it away again
    # this session's one-node Ray: nothing to share with, nothing probed or written
    assert unshared_nodes(Store(tmp_path / "alone")) == {} and not (tmp_path / "alone").exists()


def test_a_storage_one_node_cannot_see_is_refused_before_any_work(hidden_storage_node):
    address, hidden = hidden_storage_node
    assert _probe(address, hidden / "run")["unshared"] != {}
    existing = hidden / "earlier-run"
    (existing / "results").mkdir(parents=True)
    (existing / "results" / "keep").write_text("kept")
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--storage", str(existing),
                             "--address", address, "--fresh", "--only", "pretrain"],
                            capture_output=True, text=True, timeout=300, check=False, cwd=ROOT, env=env)
    assert driver.returncode == 2, driver.stdout[-2000:] + driver.stderr[-2000:]
    error = driver.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: --storage {existing}: not shared by every node of this 3-node cluster")
    assert error.count("the file the driver wrote is not there") == 1 and "s3://" in error
    # refused unchanged: --fresh moved nothing aside, nothing was written
    assert sorted(p.name for p in hidden.iterdir()) == ["earlier-run"]
    assert [p.name for p in existing.iterdir()] == ["results"] and (existing / "results" / "keep").read_text() == "kept"

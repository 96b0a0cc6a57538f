"""Clusters of more than one node, on a `ray.cluster_utils.Cluster` run by a separate process (this session's own
Ray stays as it is): a stage started on one node grows onto a node that joins while it runs; the storage must be
one every node sees — tested with a third node started in a private mount namespace, where the driver's storage
folder is hidden under an empty tmpfs, the way a worker's own disk hides the head's."""

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
print(cluster.address, flush=True)
for line in sys.stdin:  # "add": one more node of 1 CPU; the end of stdin: shut down
    cluster.add_node(num_cpus=1)
    print("added", flush=True)
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


class HeldCluster:
    """A local Cluster in its own process: its address, and `add_node()`."""

    def __init__(self, holder: subprocess.Popen):
        self.holder, self.address = holder, holder.stdout.readline().strip()
        self.nodes = 1

    def add_node(self) -> None:
        self.holder.stdin.write("add\n")
        self.holder.stdin.flush()
        assert self.holder.stdout.readline().strip() == "added"
        self.nodes += 1


@pytest.fixture(scope="module")
def cluster():
    """A one-node local Cluster (1 CPU) that the module's tests grow; the machine's `ray start` address file
    (which a Cluster overwrites) is left as it was."""
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.is_file() else None
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLUSTER, str(_free_port())], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        yield HeldCluster(holder)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)


@pytest.fixture
def two_node_cluster(cluster):
    while cluster.nodes < 2:
        cluster.add_node()
    return cluster.address


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


def _overlapping(spans: list[tuple[float, float]]) -> bool:
    return any(s1 < e2 and s2 < e1 for i, (s1, e1) in enumerate(spans) for s2, e2 in spans[i + 1:])


def test_a_stage_started_on_one_node_grows_onto_a_node_that_joins(cluster, micro_run, tmp_path):
    """Tuning cells of a new seed, one CPU each, on a one-CPU cluster: one at a time, until a second node joins
    mid-stage; from then on two run at once (no cap on concurrent trials fixed when the stage started). The cells
    take seconds: a trial whose cell is shorter than a new node's actor start-up finishes first and hands its
    process on (actor reuse), which is right for such cells."""
    from raysys.storage import results
    from raysys.storage.store import Store
    from tests.conftest import MICRO_OVERRIDES

    assert cluster.nodes == 1
    _, shared, _ = micro_run
    store = Store(tmp_path / "grow")
    shutil.copytree(shared.root, store.root)
    before = {r["cell_hash"] for r in results.read_table(store, "tuning_runs").to_pylist()}
    sets = [x for o in [*MICRO_OVERRIDES, "seeds=[21]", 'tuning.types=["finetune"]', "tuning.max_steps=240",
                                    "tuning.eval_every_steps=120"] for x in ("--set", o)]
    driver = subprocess.Popen([sys.executable, str(SCRIPT), "--preset", "tiny", "--storage", str(store.root),
                               "--address", cluster.address, "--only", "tuning", *sets],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)

    def new_rows() -> list[dict]:
        return [r for r in results.read_table(store, "tuning_runs").to_pylist() if r["cell_hash"] not in before]

    try:
        deadline = time.time() + 300
        while len(new_rows()) < 2 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        cluster.add_node()
        joined = time.time()
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    rows = new_rows()
    assert len(rows) >= 6 and {r["status"] for r in rows} == {"ok"}
    spans = sorted((r["started_at"].timestamp(), r["started_at"].timestamp() + r["seconds"]) for r in rows)
    alone = [span for span in spans if span[1] < joined]
    assert len(alone) >= 2 and not _overlapping(alone)  # one CPU: one cell at a time
    assert _overlapping([span for span in spans if span[0] > joined])  # the joined node's CPU is used


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
                             "--address", address, "--fresh", "--only", "pretrain",
                             "--set", "pretrain.cpus_per_worker=1"],  # a worker its 1-CPU nodes hold
                            capture_output=True, text=True, timeout=300, check=False, cwd=ROOT, env=env)
    assert driver.returncode == 2, driver.stdout[-2000:] + driver.stderr[-2000:]
    error = driver.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: --storage {existing}: not shared by every node of this 3-node cluster")
    assert error.count("the file the driver wrote is not there") == 1 and "s3://" in error
    # refused unchanged: --fresh moved nothing aside, nothing was written
    assert sorted(p.name for p in hidden.iterdir()) == ["earlier-run"]
    assert [p.name for p in existing.iterdir()] == ["results"] and (existing / "results" / "keep").read_text() == "kept"

"""Which Ray the driver runs on: an explicit address must answer, `auto` must find one, `local` starts a new one;
`--preset auto` is the paper only where its pre-training's GPUs fit (up now or addable) and its data is there."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysys.sweep import cluster
from raysys.sweep import driver as sweep
from tests.conftest import write_paper_data

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


def _never_asked() -> list[str]:
    pytest.fail("the data was checked although the GPUs are short")


def test_auto_is_paper_only_where_its_pretraining_fits_and_its_data_is_there():
    assert cluster.choose_preset(1, 0, 8, _never_asked) == cluster.AutoChoice(
        "tiny", "the cluster has 1 GPU for DDP workers and can grow to 1; the paper preset's pre-training needs 8 "
                "(pretrain.num_workers)")
    assert cluster.choose_preset(0, 0, 8, _never_asked, "this machine", "a new local Ray does not grow").why == (
        "this machine has 0 GPUs for DDP workers and can grow to 0 (a new local Ray does not grow); the paper "
        "preset's pre-training needs 8 (pretrain.num_workers)")
    assert cluster.choose_preset(1, 6, 8, _never_asked).preset == "tiny"  # 7 at most
    grows = cluster.choose_preset(1, 7, 8, list)
    assert grows == cluster.AutoChoice("paper", "the cluster has 1 GPU for DDP workers and can grow to 8, enough "
                                                "for the paper preset's 8; its data is there")
    missing = cluster.choose_preset(16, 0, 8, lambda: ["corpus bio: no files match 'data/corpora/bio/*.txt'",
                                                       "missing task file a", "missing task file b"])
    assert missing == cluster.AutoChoice(
        "tiny", "the cluster has 16 GPUs for DDP workers and can grow to 16, enough for the paper preset's 8, but "
                "its data is not there: corpus bio: no files match 'data/corpora/bio/*.txt' (+2 more)")


def test_the_largest_cluster_counts_gpus_that_have_a_workers_cpus_beside_them():
    assert cluster.NodeShape(cpus=8, gpus=1).ddp_workers(1.0) == 1
    assert cluster.NodeShape(cpus=4, gpus=8).ddp_workers(1.0) == 4  # a worker per GPU needs its CPU too
    assert cluster.NodeShape(cpus=2, gpus=1).ddp_workers(4.0) == 0
    assert cluster.NodeShape(cpus=8, gpus=0.5).ddp_workers(1.0) == 0  # a share of a GPU holds no DDP worker
    head, one, eight = cluster.NodeShape(8, 0), cluster.NodeShape(8, 1), cluster.NodeShape(96, 8)
    types = (cluster.NodeType("gpu_1x", one, 8), cluster.NodeType("gpu_8x", eight, 2))
    assert cluster.Autoscaler("c", head, types, max_workers=None).most_ddp_workers(1.0) == 2 * 8 + 8
    assert cluster.Autoscaler("c", head, types, max_workers=3).most_ddp_workers(1.0) == 2 * 8 + 1  # 8x first
    assert cluster.Autoscaler("c", head, types, max_workers=0).most_ddp_workers(1.0) == 0
    facts = cluster.ClusterFacts("the cluster", (head, one), cluster.Autoscaler("c", head, types, max_workers=10))
    assert (facts.ddp_workers(1.0), facts.addable_ddp_workers(1.0)) == (1, 23)
    with pytest.raises(ValueError, match="why the cluster cannot grow"):
        cluster.ClusterFacts("the cluster", (head,))
    with pytest.raises(ValueError, match="max_workers"):
        cluster.NodeType("gpu_1x", one, -1)


def test_the_autoscaler_is_read_from_the_config_ray_up_leaves_on_the_head(tmp_path):
    """`ray up` writes the cluster file, node types' resources filled in from the cloud, as JSON (a YAML subset)."""
    config = {"cluster_name": "raysys", "max_workers": 9, "head_node_type": "head",
              "available_node_types": {
                  "head": {"resources": {"CPU": 8}, "node_config": {"InstanceType": "m6i.2xlarge"}},
                  "gpu_1x": {"min_workers": 1, "max_workers": 8, "node_config": {},
                             "resources": {"CPU": 8, "GPU": 1, "memory": 10**10, "accelerator_type:L40S": 1}},
                  "gpu_8x": {"min_workers": 0, "max_workers": 2, "resources": {"CPU": 96, "GPU": 8},
                             "node_config": {}}}}
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(json.dumps(config))
    read = cluster.read_autoscaler(path)
    assert read.head == cluster.NodeShape(8, 0) and read.max_workers == 9
    assert {t.name: (t.shape, t.max_workers) for t in read.types} == {
        "head": (cluster.NodeShape(8, 0), 0), "gpu_1x": (cluster.NodeShape(8, 1), 8),
        "gpu_8x": (cluster.NodeShape(96, 8), 2)}
    assert read.most_ddp_workers(1.0) == 16 + 7
    path.write_text("available_node_types: [not, a, mapping")
    with pytest.raises(cluster.ClusterError, match="cannot read the autoscaler's config"):
        cluster.read_autoscaler(path)


def test_auto_on_this_machine_is_tiny_says_why_once_and_print_config_prints_that_study(tmp_path):
    """The README's `--print-config` on a machine without the paper's GPUs: the tiny study, and one line saying
    why, on stderr (stdout is the JSON alone)."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--print-config", "--address", "local"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["name"] == "tiny"
    gpus = cluster.local_gpus()
    said = [line for line in out.stderr.splitlines() if "--preset auto" in line]
    why = (f"this machine has {gpus} GPU{'' if gpus == 1 else 's'} for DDP workers and can grow to {gpus} (a new "
           "local Ray does not grow); the paper preset's pre-training needs 8 (pretrain.num_workers)")
    assert said == [f"raysys: --preset auto -> tiny ({why})"], out.stderr[-3000:]


GPU_CLUSTER = cluster.ClusterFacts(
    "the cluster at 10.0.0.1:6379", (cluster.NodeShape(8, 0), cluster.NodeShape(8, 1)),
    cluster.Autoscaler("ray_bootstrap_config.yaml", cluster.NodeShape(8, 0),
                       (cluster.NodeType("gpu_1x", cluster.NodeShape(8, 1), 8),
                        cluster.NodeType("gpu_8x", cluster.NodeShape(96, 8), 2)), max_workers=10))


def test_auto_on_a_gpu_cluster_with_the_data_plans_the_paper_and_without_it_the_tiny_study(tmp_path, capsys,
                                                                                        monkeypatch):
    """One GPU up and 23 more the autoscaler may add: the paper's plan; its corpora gone: the tiny plan, with the
    first missing file named. Each run decides once and says so once."""
    write_paper_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--dry-run", "--storage", str(tmp_path / "plan")]
    assert sweep.main(argv, facts=GPU_CLUSTER) == 0
    out = capsys.readouterr().out
    why = ("the cluster at 10.0.0.1:6379 has 1 GPU for DDP workers and can grow to 24, enough for the paper "
           "preset's 8")
    assert [line for line in out.splitlines() if "--preset auto" in line] == [
        f"raysys: --preset auto -> paper ({why}; its data is there)"]
    assert "(preset paper)" in out and "(preset tiny)" not in out
    assert sweep.main(["--print-config"], facts=GPU_CLUSTER) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["name"] == "paper" and printed.err.count("--preset auto -> paper") == 1
    for corpus in ("bio", "reviews"):
        (tmp_path / "data" / "corpora" / corpus / "part-0.txt").unlink()
    assert sweep.main(argv, facts=GPU_CLUSTER) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "--preset auto" in line]
    missing = f"corpus bio: no files match '{tmp_path}/data/corpora/bio/*.txt' (+1 more)"
    assert said == [f"raysys: --preset auto -> tiny ({why}, but its data is not there: {missing})"], out
    assert "(preset tiny)" in out


FAKE_GPU_CLUSTER = r"""
import json, os, subprocess, sys
from ray.cluster_utils import Cluster

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Ray counts the GPUs it is told a node has: two nodes of 4 stand in for an 8-GPU cluster (nothing runs on them)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                        "dashboard_port": None})
for _ in range(2):
    cluster.add_node(num_cpus=4, num_gpus=4)
cluster.wait_for_nodes()
address = cluster.address
try:
    driver = subprocess.run([sys.executable, sys.argv[1], "--address", address, *sys.argv[2:]],
                            capture_output=True, text=True, timeout=240, env={**os.environ, "RAY_ADDRESS": ""})
finally:
    cluster.shutdown()
print(json.dumps({"address": address, "rc": driver.returncode, "stdout": driver.stdout,
                  "stderr": driver.stderr[-3000:]}))
"""


def test_auto_asks_the_cluster_it_attaches_to_for_its_gpus(tmp_path):
    """A real Ray cluster of a head and two 4-GPU nodes (Ray takes the GPU count it is given): `--dry-run` reads
    its alive nodes through Ray's state API — no driver joins it — and, the data being there, plans the paper."""
    write_paper_data(tmp_path)
    script = tmp_path / "fake_gpu_cluster.py"
    script.write_text(FAKE_GPU_CLUSTER)
    out = subprocess.run([sys.executable, str(script), str(SCRIPT), "--dry-run", "--storage", str(tmp_path / "p")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=400, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, report["stdout"][-3000:] + report["stderr"]
    said = [line for line in report["stdout"].splitlines() if "--preset auto" in line]
    why = (f"the cluster at {report['address']} has 8 GPUs for DDP workers and can grow to 8 (no autoscaler config "
           f"here: {cluster.BOOTSTRAP_CONFIG} is on the head of a `ray up` cluster), enough for the paper preset's 8")
    assert said == [f"raysys: --preset auto -> paper ({why}; its data is there)"], report
    assert "(preset paper)" in report["stdout"]


def test_a_stage_fits_only_where_one_node_alive_or_addable_holds_its_trial_or_all_its_workers():
    """CPUs on one node and GPUs on another do not add up; a share of a GPU packs onto one; a Train job needs all
    its workers at once; a custom resource counts only where a node (or node type) offers it."""
    shape = cluster.NodeShape
    assert shape(8, 1).holds({"CPU": 4, "GPU": 0.25}) == 2 and shape(8, 2).holds({"CPU": 1, "GPU": 0.25}) == 8
    assert shape(8, 0).holds({"CPU": 1, "GPU": 1}) == 0 and shape(8, 0, (("pretrain_gpu", 8.0),)).holds(
        {"CPU": 1, "pretrain_gpu": 1}) == 8
    trial = cluster.Demand("stage tuning", (("CPU", 4.0), ("GPU", 1.0)),
                           settings="tuning.cpus_per_trial, tuning.gpus_per_trial")
    split = cluster.ClusterFacts("the cluster", (shape(2, 1), shape(8, 0), shape(8, 0)), no_autoscaler="none here")
    assert cluster.fit_problem(trial, split) == (
        "stage tuning: a trial needs 4 CPU, 1 GPU on one node, and the cluster holds 0 at once, so Ray would wait "
        "forever; its nodes alive: 1 x [2 CPU, 1 GPU]; 2 x [8 CPU, 0 GPU] (none here). Ask less "
        "(tuning.cpus_per_trial, tuning.gpus_per_trial) or add nodes that hold it")
    assert cluster.fit_problem(trial, GPU_CLUSTER) is None  # the 8-CPU, 1-GPU node alive
    ddp = cluster.Demand("stage pretrain", (("CPU", 1.0), ("GPU", 1.0), ("pretrain_gpu", 1.0)), count=8,
                         settings="pretrain.num_workers", unit="each of its 8 workers, all at once,")
    problem = cluster.fit_problem(ddp, GPU_CLUSTER)  # GPUs to spare, but no node type offers pretrain_gpu
    assert problem.startswith("stage pretrain: each of its 8 workers, all at once, needs 1 CPU, 1 GPU, 1 "
                              "pretrain_gpu on one node, and the cluster at 10.0.0.1:6379 holds 0 at once")
    assert "the node types its autoscaler (ray_bootstrap_config.yaml) may add: gpu_1x [8 CPU, 1 GPU] up to 8; " \
           "gpu_8x [96 CPU, 8 GPU] up to 2" in problem
    offered = cluster.ClusterFacts("c", (shape(8, 0),), cluster.Autoscaler(
        "a", shape(8, 0), (cluster.NodeType("gpu_8x", shape(96, 8, (("pretrain_gpu", 8.0),)), 1),), max_workers=1))
    assert cluster.fit_problem(ddp, offered) is None  # none alive: the autoscaler adds the node it asks for
    nine = cluster.Demand("stage pretrain", ddp.needs, count=9)
    assert "holds 8 at once" in cluster.fit_problem(nine, offered)
    with pytest.raises(cluster.ClusterError, match=r"(?s)stage tuning: .*\nstage pretrain: "):
        cluster.require_fit([trial, nine], split)
    cluster.require_fit([trial], GPU_CLUSTER)

"""One Ray cluster per test session (starting Ray costs seconds), and one micro study run shared by the stage
tests: it goes through every stage with real Ray Tune/Train, real HF models and real Parquet files.

Under pytest-xdist (README command 2 runs two workers) each worker is a session with its own Ray; the micro study
is run once for all of them (the first worker to ask runs it, under a file lock) and each worker gets its own copy,
so that a test changing its store in place cannot race another worker's. A module runs whole on one worker; the
modules that start clusters of their own on fixed ports, or move the machine's `ray start` address file, run as
one unit and so never overlap (`pytest_xdist_make_scheduler`)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Ray Train polls its workers every 1 s in a sweep; the tests' links last a few steps, and each report waits for
# a poll (raysys.sweep.launchers.TRAIN_POLL_S): 0.2 s here, the same weights (subprocess drivers inherit it)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# The URI-storage tests use a local S3 (moto's server). Set before Ray starts, so that every worker inherits them:
# any credentials do for moto; no instance-metadata lookups; remote stores cache under a throwaway folder.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "raysys-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "raysys-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAYSYS_CACHE", tempfile.mkdtemp(prefix="raysys-test-cache-"))

import pytest

from raysys.config import load_study

MICRO_OVERRIDES = [
    "world.general_sentences=2000", "world.domain_sentences=2000",
    "world.task_train=48", "world.task_dev=48", "world.task_test=64",
    "pretrain.initial_steps=10", "pretrain.continual_steps=10", "pretrain.batch_size=16",
    "pretrain.log_every_steps=5", "pretrain.num_workers=2", "pretrain.cpus_per_worker=1", "pilot.control_length=3",
    "pilot.hops=[1,2]", "methods.kshot.max_steps=12", "methods.kshot.eval_every_steps=4",
    "tuning.max_steps=12", "tuning.eval_every_steps=4",
    "pilot.alphas=[0.0,0.5,1.0]", "seeds=[20]", "pilot.similarity_examples=16",
    'methods.tasks=["d1_rel","d2_rel"]', "methods.shots=[4]", "methods.temperatures=[5.0]",
    "methods.kd_weights=[0.9]", "methods.betas=[10.0]", "methods.training_free.steps=6",
    'methods.training_free.tasks=["d1_rel","d2_rel"]', 'methods.transfer_starts=["ties"]',
    "methods.text_distill.sentences=64", "methods.text_distill.steps=8", "methods.text_distill.eval_every_steps=4",
]


def with_stand_in_fingerprints(study):
    """A study over files the test does not have, with fingerprints standing in for them (enough to plan it)."""
    import dataclasses

    return dataclasses.replace(
        study, corpora=tuple(dataclasses.replace(c, fingerprint=f"files:{c.name}") for c in study.corpora),
        tasks=tuple(dataclasses.replace(t, fingerprint=f"files:{t.name}") for t in study.tasks))


def write_paper_data(root):
    """Stand-ins for the paper preset's data under `root/data` (its paths are relative to the working directory);
    none for WB: M0 is roberta-base kept as it is, so D0 is never read."""
    for corpus in ("bio", "reviews"):
        (root / "data" / "corpora" / corpus).mkdir(parents=True)
        (root / "data" / "corpora" / corpus / "part-0.txt").write_text(f"a {corpus} sentence\n")
    for task in ("chemprot", "helpfulness"):
        (root / "data" / "tasks" / task).mkdir(parents=True)
        for split in ("train", "dev", "test"):
            (root / "data" / "tasks" / task / f"{split}.jsonl").write_text('{"text": "x", "label": "a"}\n')


def start_test_ray():
    """A new local Ray for the tests, even when `ray start` runs a cluster on this machine (address="local")."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2,
             configure_logging=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in (
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY",
                 "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_USAGE_STATS_ENABLED")}})
    return ray


@pytest.fixture(scope="session")
def ray_cluster():
    ray = start_test_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def micro_study():
    return load_study("tiny", MICRO_OVERRIDES)


# Modules that start Ray clusters of their own (fixed ports, `ray start`'s address file, `ray up`): one xdist unit
MACHINE_WIDE = {"test_ray_up.py", "test_multinode.py", "test_cluster.py", "test_driver.py"}


def pytest_collection_modifyitems(config, items):
    """The order keeps both xdist workers busy while the micro study builds: the machine-wide modules first (the
    longest unit), then the modules that do not need the micro study, then those that do; within the machine-wide
    unit the tests that need it last. Sorting is stable and the same on every worker."""
    needs = {item: "micro_run" in getattr(item, "fixturenames", ()) for item in items}
    module_needs: dict[Path, bool] = {}
    for item in items:
        module_needs[item.path] = module_needs.get(item.path, False) or needs[item]

    def rank(item):
        machine_wide = item.path.name in MACHINE_WIDE
        return (0 if machine_wide else 1 + module_needs[item.path], needs[item] if machine_wide else 0)

    items.sort(key=rank)


def pytest_xdist_make_scheduler(config, log):
    """Each module is scheduled whole, on one worker (its module-scoped fixtures are built once), and the modules
    in MACHINE_WIDE as one unit, so that they never overlap. (xdist's own `--dist loadgroup` marks do not group
    under pytest 9, which no longer reads the node id xdist rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "machine-wide" if Path(module).name in MACHINE_WIDE else module

    return ModuleScheduling(config, log)


def _shared_temp(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (each worker's base temp is a child of it); the base temp
    itself without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def session_workers(marker: str):
    """This session's Ray worker processes whose title holds `marker`: children of this session's raylet only, so
    that a test killing trials (as the OOM killer would) leaves another session's Ray alone."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        if proc.info["ppid"] == raylet and marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


REPO = Path(__file__).resolve().parents[1]
_BUILDS: list[subprocess.Popen] = []  # the micro study's build, where this process started it


def _start_micro_build(shared: Path) -> None:
    """Start tests/micro_build.py into `shared` unless a process of this run already did (or it is done)."""
    from filelock import FileLock

    with FileLock(str(shared / "micro.lock")):
        if (shared / "micro-build.pid").is_file():
            return
        with open(shared / "micro-build.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tests.micro_build", str(shared)], cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT)
        (shared / "micro-build.pid").write_text(str(proc.pid))
        _BUILDS.append(proc)


def pytest_collection_finish(session):
    """As soon as a collected test needs the micro study, build it in the background, in a process with a Ray of
    its own: the tests that do not need it run meanwhile (on every xdist worker) instead of waiting for it."""
    if session.config.option.collectonly:
        return
    if any("micro_run" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_micro_build(_shared_temp(session.config._tmp_path_factory))


def pytest_sessionfinish(session, exitstatus):
    """A build this process started outlives its tests only while another worker may still need it: wait for it,
    unless the run was interrupted."""
    for proc in _BUILDS:
        if proc.poll() is None:
            if exitstatus == pytest.ExitCode.INTERRUPTED:
                proc.terminate()
            proc.wait(timeout=1800)


def _built_micro_study(shared: Path) -> dict:
    """Wait for the background build; what run_study reported. Its failure fails the tests needing it, with its
    log."""
    _start_micro_build(shared)
    counts, log = shared / "micro-ran.json", shared / "micro-build.log"
    pid, deadline = int((shared / "micro-build.pid").read_text()), time.time() + 1800
    while not counts.is_file():
        try:
            os.kill(pid, 0)
            alive = not (shared / "micro-failed.txt").is_file()
        except OSError:
            alive = False
        if not alive or time.time() > deadline:
            time.sleep(0.5)  # a build that just finished writes its counts before it exits
            if counts.is_file():
                break
            raise RuntimeError(f"the micro study's build ({'failed' if not alive else 'still running after 30 min'})"
                               f", its log {log}:\n{log.read_text()[-4000:] if log.is_file() else ''}")
        time.sleep(0.5)
    return json.loads(counts.read_text())


@pytest.fixture(scope="session")
def micro_run(ray_cluster, micro_study, tmp_path_factory):
    """The whole micro study, run once per test run (tests/micro_build.py): (study, store, what run_study
    reported). Under xdist each worker holds its own copy of the run's store."""
    from raysys.storage.store import Store

    shared = _shared_temp(tmp_path_factory)
    ran = _built_micro_study(shared)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return micro_study, Store(shared / "micro"), ran
    mine = tmp_path_factory.mktemp("micro")
    shutil.copytree(shared / "micro", mine, dirs_exist_ok=True, symlinks=True)
    return micro_study, Store(mine), ran


@pytest.fixture(scope="session")
def s3_uri():
    """A local S3 server (moto, in its own process) with one bucket: `s3_uri(name)` is a fresh storage URI in it,
    options in the query as a user would pass them."""
    import pyarrow.fs as pafs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto S3 server did not start on port {port}")
            time.sleep(0.2)
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    pafs.FileSystem.from_uri(f"s3://raysys-test?{query}&allow_bucket_creation=true")[0].create_dir("raysys-test")
    yield lambda name: f"s3://raysys-test/{name}?{query}"
    server.terminate()
    server.wait(timeout=10)

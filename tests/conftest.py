"""One Ray cluster per test session (starting Ray costs seconds), and one micro study run shared by the stage
tests: it goes through every stage with real Ray Tune/Train, real HF models and real Parquet files."""

import os
import socket
import subprocess
import sys
import tempfile
import time

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
    'methods.training_free.tasks=["d1_rel","d2_rel"]',
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


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # address="local": a new Ray for the tests even when `ray start` runs a cluster on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2,
             configure_logging=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in (
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY",
                 "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_USAGE_STATS_ENABLED")}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def micro_study():
    return load_study("tiny", MICRO_OVERRIDES)


@pytest.fixture(scope="session")
def micro_run(ray_cluster, micro_study, tmp_path_factory):
    """The whole micro study, run once: (study, store, what run_study reported)."""
    from raysys.storage.store import Store
    from raysys.sweep.driver import run_study

    store = Store(tmp_path_factory.mktemp("micro"))
    ran = run_study(micro_study, store, log=lambda *_: None)
    return micro_study, store, ran


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

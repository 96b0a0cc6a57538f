"""Is the storage one that every node of the cluster sees? On a multi-node cluster the workers write PLMs, tuned
models and rows to the storage and the driver reads them back: a path on the head's own disk (the default
`runs/<preset>`) would leave each node's work on that node, and the driver would report it as never produced.

The check is a probe, not a rule about paths: the driver writes a file with a fresh token, and a task pinned to
each node reads it through the same store code the trials use. An NFS mount passes, a bucket passes where the
node's credentials reach it, a local folder fails on every other node — and a bucket the workers cannot read
(no instance profile) is caught too.
"""

from __future__ import annotations

import secrets

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysys.storage.store import Store

PROBE_TIMEOUT_SECONDS = 120.0  # a node's first task may have to start a worker process (and import torch)


class StorageNotShared(Exception):
    """Some node of the cluster cannot read what the driver writes to the storage."""


def _probe_file(token: str) -> str:
    return f".raysys-shared-probe-{token}"


@ray.remote(num_cpus=0)
def _read_probe(root: str, token: str) -> str | None:
    """On one node: None if it reads the driver's token through the store, else what it saw instead."""
    try:
        found = Store(root).read_bytes(_probe_file(token))
    except Exception as err:  # noqa: BLE001 — the node's reason, reported to the user
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if found is None:
        return "the file the driver wrote is not there"
    return None if found.decode() == token else "another file is there"


def _alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def unshared_nodes(store: Store, timeout: float = PROBE_TIMEOUT_SECONDS) -> dict[str, str]:
    """Node (IP and ID) -> why it does not share `store`, for every live node that does not; empty when all do
    or the cluster has one node."""
    nodes = _alive_nodes()
    if len(nodes) < 2:
        return {}
    token = secrets.token_hex(8)
    existed = store.exists()
    store.write_bytes(_probe_file(token), token.encode())
    try:
        pending = {f"{node['NodeManagerAddress']} ({node['NodeID'][:12]})": _read_probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(store.root, token)
            for node in nodes}
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout)
        answers = {name: ray.get(ref) if ref in ready else f"no answer within {timeout:.0f} s"
                   for name, ref in pending.items()}
    finally:
        store.delete_file(_probe_file(token))
        if not existed and not store.remote:
            store.fs.delete_dir(store.base)  # the probe made the folder: leave no trace of a refused run
    return {name: why for name, why in answers.items() if why is not None}


def check_shared(store: Store, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
    """Refuse, before any work, a storage that some node of a multi-node cluster does not share."""
    missing = unshared_nodes(store, timeout)
    if missing:
        listed = "; ".join(f"node {name}: {why}" for name, why in sorted(missing.items()))
        raise StorageNotShared(
            f"--storage {store.shown}: not shared by every node of this {len(_alive_nodes())}-node cluster ({listed}). "
            "Workers write models and rows there and the driver reads them back: use a bucket (s3://..., gs://...) "
            "the nodes can read, or a filesystem mounted at the same path on every node")

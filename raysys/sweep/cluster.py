"""Which Ray the driver runs on: an explicit address that must answer, the cluster `ray start` runs on this machine,
or a new local Ray; and `--preset auto`, settled by the GPUs found there."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import ray
import torch

AUTO = "auto"  # --preset auto


class ClusterError(Exception):
    """The Ray cluster asked for cannot be reached or joined."""


def _reachable(address: str, timeout: float = 5.0) -> bool:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def discover_cluster(address: str | None) -> tuple[str | None, str]:
    """(address to attach to or None for a new local Ray, how it was chosen). An explicit `--address` (or
    $RAY_ADDRESS) must answer — `ray.init` would otherwise retry for minutes; `auto` must find one; without either,
    the cluster `ray start` last started on this machine (a `ray up` head) is used when it answers."""
    given = address or os.environ.get("RAY_ADDRESS") or None
    flag = "--address" if address else "$RAY_ADDRESS"
    if given == "local":
        return None, "a new local Ray (--address local)"
    from ray._common.utils import get_ray_address_file  # where `ray start` records its address (`ray stop` clears)

    current = Path(get_ray_address_file(None))
    found = current.read_text().strip() if current.is_file() else ""
    if given == "auto":
        if not found or not _reachable(found):
            raise ClusterError(f"{flag} auto: no running Ray cluster on this machine (start one with `ray start "
                               "--head`, or leave --address out to start a local Ray)")
        return found, f"the running cluster at {found} ({flag} auto)"
    if given:
        if not _reachable(given):
            raise ClusterError(f"{flag} {given}: no Ray cluster answers there (is it up? on a laptop, reach a "
                               "remote cluster with `ray dashboard cluster.yaml` and `ray job submit`)")
        return given, f"the cluster at {given} ({flag})"
    if found and _reachable(found):
        return found, f"the running cluster at {found} (started by `ray start` on this machine)"
    return None, "a new local Ray (no running cluster found)"


def init_ray(address: str | None, num_cpus: int | None, offline: bool) -> str:
    """Attach to a cluster or start a local Ray; returns what it did. `offline` (the tiny preset on a new local
    Ray) keeps every process away from the model hub."""
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if ray.is_initialized():
        os.environ.update(env)
        return "the Ray this process already runs"
    target, how = discover_cluster(address)
    if offline and target is None:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    os.environ.update(env)
    if target is None:
        ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env}, configure_logging=False)
        return how
    try:
        ray.init(address=target, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError) as err:
        raise ClusterError(f"could not join {how}: {str(err).splitlines()[0]} (token auth: this machine needs the "
                           "cluster's token in ~/.ray/auth_token and RAY_AUTH_MODE=token)") from err
    return how


def choose_preset(gpus: float, where: str = "the cluster") -> tuple[str, str]:
    """`--preset auto`: the paper's scale where there are GPUs to run it, the tiny study otherwise."""
    if gpus >= 1:
        return "paper", f"{gpus:g} GPU(s) in {where}"
    return "tiny", f"no GPU in {where}"


def local_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0




def resources_text() -> str:
    res = ray.cluster_resources()
    alive = sum(node["Alive"] for node in ray.nodes())
    return f"{alive} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"

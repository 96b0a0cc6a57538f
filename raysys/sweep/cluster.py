"""Which Ray the driver runs on: an explicit address that must answer, the cluster `ray start` runs on this machine,
or a new local Ray; and `--preset auto`, settled once, before any Ray work, by what that Ray can hold — the GPUs
up now plus those its autoscaler may add — and by whether the paper preset's data is there."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

AUTO = "auto"  # --preset auto
# `ray up` leaves the autoscaler's config here on the head (the cluster file, each node type's resources filled in
# from the cloud's instance types); the monitor reads it (`--autoscaling-config`), and so does Tune.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


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


@dataclass(frozen=True)
class Target:
    """The Ray the driver runs on: `address` to attach to, or None for a new local Ray; `how` it was chosen.
    `running`: this process runs a Ray already (the tests, a notebook), used as it is."""

    address: str | None
    how: str
    running: bool = False

    def __post_init__(self):
        if self.running and self.address is not None:
            raise ValueError("a Ray this process already runs has no address to attach to")


def choose_target(address: str | None) -> Target:
    if ray.is_initialized():
        return Target(None, "the Ray this process already runs", running=True)
    return Target(*discover_cluster(address))


def init_ray(target: Target, num_cpus: int | None, offline: bool) -> str:
    """Attach to the target cluster or start a local Ray; returns what it did. `offline` (the tiny preset on a new
    local Ray) keeps every process away from the model hub."""
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if target.running:
        os.environ.update(env)
        return target.how
    if offline and target.address is None:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    os.environ.update(env)
    if target.address is None:
        ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env}, configure_logging=False)
        return target.how
    try:
        ray.init(address=target.address, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError) as err:
        raise ClusterError(f"could not join {target.how}: {str(err).splitlines()[0]} (token auth: this machine "
                           "needs the cluster's token in ~/.ray/auth_token and RAY_AUTH_MODE=token)") from err
    return target.how


# ------------------------------------------------------------------------------------------- --preset auto


@dataclass(frozen=True)
class NodeShape:
    """A node's (or a node type's) CPUs, GPUs and custom resources (name, amount), as Ray counts them."""

    cpus: float
    gpus: float
    custom: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.cpus < 0 or self.gpus < 0 or any(amount < 0 for _, amount in self.custom):
            raise ValueError(f"a node has no negative resources: {self}")

    def ddp_workers(self, cpus_per_worker: float) -> int:
        """DDP workers it holds: Ray Train gives each one whole GPU and `cpus_per_worker` CPUs."""
        return math.floor(min(self.gpus, self.cpus / cpus_per_worker))

    def amount(self, name: str) -> float:
        return {"CPU": self.cpus, "GPU": self.gpus, **dict(self.custom)}.get(name, 0.0)

    def holds(self, needs: dict[str, float]) -> int:
        """How many units asking `needs` each fit on it at once (the small epsilon: 0.1 + 0.2 of a GPU)."""
        return min((math.floor(self.amount(name) / need + 1e-9) for name, need in needs.items() if need > 0),
                   default=0)

    def __str__(self) -> str:
        return ", ".join([f"{self.cpus:g} CPU", f"{self.gpus:g} GPU"] + [f"{n} {a:g}" for n, a in self.custom])


@dataclass(frozen=True)
class NodeType:
    """One of the autoscaler's node types: the shape of its nodes and how many workers of it it may start."""

    name: str
    shape: NodeShape
    max_workers: int

    def __post_init__(self):
        if self.max_workers < 0:
            raise ValueError(f"node type {self.name}: max_workers must be >= 0")


@dataclass(frozen=True)
class Autoscaler:
    """The largest cluster an autoscaler may build: the head, worker nodes of each type up to that type's
    max_workers, and all of them together up to `max_workers` (None: no cap). `source`: where this was read."""

    source: str
    head: NodeShape
    types: tuple[NodeType, ...]
    max_workers: int | None

    def __post_init__(self):
        if self.max_workers is not None and self.max_workers < 0:
            raise ValueError(f"{self.source}: max_workers must be >= 0")

    def most_ddp_workers(self, cpus_per_worker: float) -> int:
        return self.most(lambda shape: shape.ddp_workers(cpus_per_worker))

    def most(self, per_node: Callable[[NodeShape], int]) -> int:
        """The most units (`per_node` of them on a node of a shape) its largest cluster holds at once. Each worker
        node costs one of `max_workers` whatever its type, so the richest types first is the most."""
        left = math.inf if self.max_workers is None else self.max_workers
        most = per_node(self.head)
        for node_type in sorted(self.types, key=lambda t: -per_node(t.shape)):
            count = min(node_type.max_workers, left)
            most += count * per_node(node_type.shape)
            left -= count
        return most


@dataclass(frozen=True)
class ClusterFacts:
    """What `--preset auto` weighs: where the driver will run, the nodes alive there, and the autoscaler that may
    add more (None, and `no_autoscaler` says why, when nothing can)."""

    where: str
    nodes: tuple[NodeShape, ...]
    autoscaler: Autoscaler | None = None
    no_autoscaler: str = ""

    def __post_init__(self):
        if self.autoscaler is None and not self.no_autoscaler:
            raise ValueError("say why the cluster cannot grow (no_autoscaler)")

    def ddp_workers(self, cpus_per_worker: float) -> int:
        return sum(node.ddp_workers(cpus_per_worker) for node in self.nodes)

    def addable_ddp_workers(self, cpus_per_worker: float) -> int:
        """What the autoscaler may add to the nodes alive now (none beyond its largest cluster)."""
        if self.autoscaler is None:
            return 0
        return max(0, self.autoscaler.most_ddp_workers(cpus_per_worker) - self.ddp_workers(cpus_per_worker))


@dataclass(frozen=True)
class AutoChoice:
    preset: str
    why: str


def _gpus(count: int) -> str:
    return f"{count} GPU" + ("" if count == 1 else "s")


def choose_preset(gpus_now: int, gpus_addable: int, gpus_needed: int, data_problems: Callable[[], list[str]],
                  where: str = "the cluster", no_autoscaler: str = "") -> AutoChoice:
    """`--preset auto`: `paper` only where its pre-training's DDP workers fit — `gpus_now` (GPUs alive, each with
    the CPUs of a worker beside it) plus `gpus_addable` (what the autoscaler may add) reach `gpus_needed` — and its
    data is there; else `tiny`, saying which failed. `data_problems()` is asked only when the GPUs are there: it
    reads the paper's corpora the first time."""
    most = gpus_now + gpus_addable
    grows = f" ({no_autoscaler})" if no_autoscaler else ""
    cluster = f"{where} has {_gpus(gpus_now)} for DDP workers and can grow to {most}{grows}"
    if most < gpus_needed:
        return AutoChoice("tiny", f"{cluster}; the paper preset's pre-training needs {gpus_needed} "
                                  "(pretrain.num_workers)")
    problems = data_problems()
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return AutoChoice("tiny", f"{cluster}, enough for the paper preset's {gpus_needed}, but its data is not "
                                  f"there: {problems[0]}{more}")
    return AutoChoice("paper", f"{cluster}, enough for the paper preset's {gpus_needed}; its data is there")


def local_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _shape(resources: dict) -> NodeShape:
    """CPUs, GPUs and the custom resources a trial may ask (not memory, nor Ray's own `node:<ip>` and
    `accelerator_type:<name>` labels)."""
    custom = tuple(sorted((name, float(amount)) for name, amount in resources.items()
                          if name not in ("CPU", "GPU", "memory", "object_store_memory") and ":" not in name
                          and float(amount) > 0))
    return NodeShape(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)), custom=custom)


def read_autoscaler(path: str | Path) -> Autoscaler:
    """The node types of a `ray up` config: per type its `resources` and `max_workers` (the head's own type
    counted without the head), and the cluster's `max_workers`. `ray up` writes every one of them (Ray's
    prepare_config fills those left out); in a config written by hand a missing one is 0, as the autoscaler reads
    it."""
    import yaml

    path = Path(path).expanduser()
    try:
        config = yaml.safe_load(path.read_text())
        types = config.get("available_node_types") or {}
        head = config.get("head_node_type") or (next(iter(types)) if len(types) == 1 else None)
        return Autoscaler(
            source=str(path), head=_shape(types.get(head, {}).get("resources") or {}),
            types=tuple(NodeType(name, _shape(spec.get("resources") or {}), int(spec.get("max_workers", 0)))
                        for name, spec in types.items()),
            max_workers=config.get("max_workers"))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as err:
        raise ClusterError(f"--preset auto: cannot read the autoscaler's config {path}: {err}") from err


def _alive_nodes(address: str) -> tuple[NodeShape, ...]:
    """The cluster's alive nodes from Ray's state API (its dashboard), without joining the cluster as a driver."""
    from ray.util.state import list_nodes

    # the state API asks $RAY_ADDRESS before its argument; the address the driver chose must win
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], limit=10_000)  # the most it gives
    except Exception as err:  # no dashboard, refused, timed out, a token missing: each is a different class
        raise ClusterError(f"--preset auto: could not list the nodes of the cluster at {address} "
                           f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); name the preset "
                           "with --preset") from err
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    return tuple(_shape(node.resources_total) for node in nodes)


def cluster_facts(target: Target, num_cpus: int | None) -> ClusterFacts:
    """The facts `--preset auto` decides on, for the Ray the driver will run on; nothing is started or joined."""
    if target.running:
        alive = tuple(_shape(node["Resources"]) for node in ray.nodes() if node["Alive"])
        return ClusterFacts("the Ray this process runs", alive, no_autoscaler="its autoscaler, if any, not asked")
    if target.address is None:
        here = NodeShape(cpus=float(num_cpus or os.cpu_count() or 1), gpus=float(local_gpus()))
        return ClusterFacts("this machine", (here,), no_autoscaler="a new local Ray does not grow")
    nodes = _alive_nodes(target.address)
    if not Path(BOOTSTRAP_CONFIG).expanduser().is_file():
        return ClusterFacts(f"the cluster at {target.address}", nodes,
                            no_autoscaler=f"no autoscaler config here: {BOOTSTRAP_CONFIG} is on the head of a "
                                          "`ray up` cluster")
    return ClusterFacts(f"the cluster at {target.address}", nodes, autoscaler=read_autoscaler(BOOTSTRAP_CONFIG))


def require_resource(name: str, setting: str) -> None:
    """Refuse a custom resource (`setting` asks for it) that no node alive offers and no node type of the
    autoscaler would: Ray would keep the job waiting for it without a word."""
    if any(node["Resources"].get(name, 0) > 0 for node in ray.nodes() if node["Alive"]):
        return
    config = Path(BOOTSTRAP_CONFIG).expanduser()
    if config.is_file():
        import yaml

        types = (yaml.safe_load(config.read_text()) or {}).get("available_node_types") or {}
        if any((spec.get("resources") or {}).get(name, 0) > 0 for spec in types.values()):
            return
    raise ClusterError(f"{setting} = '{name}': no node of this cluster offers the resource '{name}', and no node "
                       "type of its autoscaler would. Declare it on the node type meant for it (`resources: {"
                       f"{name}: <GPUs>}}` in the cluster file, or `ray start --resources='{{\"{name}\": 8}}'`), "
                       f"or set {setting} = \"\"")


# ------------------------------------------------------------------------------------ what a stage asks


@dataclass(frozen=True)
class Demand:
    """What a stage asks Ray for: `count` units at once (a Train job's workers; 1 for trials, which may queue),
    each needing `needs` on one node; `what` and `settings` (the config fields asking) name it in a refusal."""

    what: str
    needs: tuple[tuple[str, float], ...]
    count: int = 1
    settings: str = ""
    unit: str = "a trial"  # what one unit is, in the refusal


def _needs_text(needs: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in needs.items() if amount > 0)


def _cluster_text(facts: ClusterFacts) -> str:
    """The cluster's shape: its alive nodes, grouped by shape, and what its autoscaler may add."""
    shapes: dict[str, int] = {}
    for node in facts.nodes:
        shapes[str(node)] = shapes.get(str(node), 0) + 1
    alive = "; ".join(f"{count} x [{shape}]" for shape, count in shapes.items()) or "none"
    if facts.autoscaler is None:
        return f"its nodes alive: {alive} ({facts.no_autoscaler})"
    types = "; ".join(f"{t.name} [{t.shape}] up to {t.max_workers}" for t in facts.autoscaler.types) or "none"
    return f"its nodes alive: {alive}; the node types its autoscaler ({facts.autoscaler.source}) may add: {types}"


def fit_problem(demand: Demand, facts: ClusterFacts) -> str | None:
    """Why `demand` would wait forever on this cluster — no node, alive or addable, holds one unit, or not
    `count` of them at once — or None when it fits."""
    needs = dict(demand.needs)
    alive = sum(node.holds(needs) for node in facts.nodes)
    most = max(alive, facts.autoscaler.most(lambda shape: shape.holds(needs)) if facts.autoscaler else 0)
    if most >= demand.count:
        return None
    return (f"{demand.what}: {demand.unit} needs {_needs_text(needs)} on one node, and {facts.where} holds {most} at "
            f"once, so Ray would wait forever; {_cluster_text(facts)}. Ask less ({demand.settings}) or add nodes "
            "that hold it")


def running_facts() -> ClusterFacts:
    """The Ray this process has joined: its alive nodes, and the node types its autoscaler may add when this is
    the head of a `ray up` cluster (an unreadable config counts as none)."""
    alive = tuple(_shape(node["Resources"]) for node in ray.nodes() if node["Alive"])
    config = Path(BOOTSTRAP_CONFIG).expanduser()
    if not config.is_file():
        return ClusterFacts("the cluster", alive, no_autoscaler="no autoscaler config on this machine")
    try:
        return ClusterFacts("the cluster", alive, autoscaler=read_autoscaler(config))
    except ClusterError as err:
        return ClusterFacts("the cluster", alive, no_autoscaler=str(err))


def require_fit(demands: list[Demand], facts: ClusterFacts | None = None) -> None:
    """Refuse, before anything is written or launched, the stages whose trials (or Train workers) no node of the
    cluster, alive or addable, can hold: Tune and Train would keep them pending without a word."""
    facts = facts or running_facts()
    problems = [problem for demand in demands if (problem := fit_problem(demand, facts))]
    if problems:
        raise ClusterError("\n".join(problems))


def resources_text() -> str:
    res = ray.cluster_resources()
    alive = sum(node["Alive"] for node in ray.nodes())
    return f"{alive} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"

"""cluster.yaml and cluster-gcp.yaml: valid for `ray up` (Ray's own defaults merge and schema check), secure by
default, and shaped for the study (CPU head, 1-GPU and multi-GPU spot workers, this project installed)."""

import copy
import ipaddress
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raysys.config import tomllib  # tomli on Python 3.10

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["cluster.yaml", "cluster-gcp.yaml"]
CONTROL_PORTS = (6379, 8265, 10001)  # GCS, dashboard and Jobs API, Ray client


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _gpus(node_type: dict) -> int:
    config = node_type["node_config"]
    if "InstanceType" in config:  # AWS: the families used here
        return {"g6e.2xlarge": 1, "p4d.24xlarge": 8}.get(config["InstanceType"], 0)
    return sum(a["acceleratorCount"] for a in config.get("guestAccelerators", [])) or (
        8 if config["machineType"] == "a2-highgpu-8g" else 0)


def _spot(node_type: dict) -> bool:
    config = node_type["node_config"]
    return config.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or \
        config.get("scheduling", {}).get("provisioningModel") == "SPOT"


@pytest.mark.parametrize("name", CONFIGS)
def test_the_cluster_config_passes_rays_schema(name):
    config = prepare_config(copy.deepcopy(_load(name)))  # what `ray up` does before validating
    validate_config(config)
    broken = copy.deepcopy(_load(name))
    broken["available_node_types"]["head"]["max_worker"] = 1  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", CONFIGS)
def test_token_auth_is_on_and_no_control_port_is_public(name):
    config = _load(name)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in command, command
        assert "0.0.0.0" not in command, command  # the dashboard listens on localhost: reached by SSH tunnel
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])  # for drivers started over SSH
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        public = any(ipaddress.ip_network(r["CidrIp"]).num_addresses > 2**16 for r in rule.get("IpRanges", []))
        if public:
            assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule
            assert not any(rule["FromPort"] <= p <= rule["ToPort"] for p in CONTROL_PORTS)


def test_no_token_is_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert not [f for f in tracked.split() if re.search(r"auth_token|\.token$", f)]
    assert "auth_token" in (REPO / ".gitignore").read_text()


@pytest.mark.parametrize("name", CONFIGS)
def test_node_types_fit_the_study(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert _gpus(head) == 0
    gpus = sorted(_gpus(t) for t in workers.values())
    assert gpus[0] == 1 and gpus[-1] >= 8  # a tuning type and a pre-training type
    assert all(_spot(t) for t in workers.values()) and not _spot(head)
    assert any(t["min_workers"] >= 1 and _gpus(t) >= 1 for t in workers.values())  # `--preset auto` sees a GPU


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_installs_this_project_with_its_pinned_ray(name):
    config = _load(name)
    setup = "\n".join(config["setup_commands"])
    assert config["file_mounts"]["~/raysys"] == "."
    assert "pip install -q -e ~/raysys" in setup
    assert re.search(r"pip install -q \"torch==[\d.]+\"", setup)  # PyPI's Linux torch wheel is the CUDA build
    pinned = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
              if d.startswith("ray[")]
    assert pinned and "==" in pinned[0]  # so `pip install -e` puts one Ray version on every node
    assert all(c.startswith("~/venv/bin/ray") or "~/venv/bin/ray start" in c
               for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"])

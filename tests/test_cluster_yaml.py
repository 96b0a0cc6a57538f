"""cluster.yaml, cluster-gcp.yaml and cluster/local.yaml: valid for `ray up` (Ray's own defaults merge and schema
check), secure by default, every node set up by the one script cluster/setup-node.sh, the cloud files shaped for the
study (CPU head, 1-GPU and multi-GPU spot workers), the local one clear of any other Ray on its machines.
tests/test_ray_up.py runs cluster/local.yaml for real."""

import copy
import ipaddress
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raysys.config import tomllib  # tomli on Python 3.10

REPO = Path(__file__).resolve().parent.parent
CLOUD = ["cluster.yaml", "cluster-gcp.yaml"]
CONFIGS = [*CLOUD, "cluster/local.yaml"]
SETUP = REPO / "cluster" / "setup-node.sh"
CONTROL_PORTS = (6379, 8265, 10001)  # GCS, dashboard and Jobs API, Ray client
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365}  # GCS, dashboard, client, dashboard agent: any `ray start`
RAY_DEFAULT_WORKER_PORTS = range(10002, 20000)


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
    broken["auth"]["ssh_usr"] = "ubuntu"  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError, match="ssh_usr"):
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
    assert "export RAY_AUTH_MODE=token" in SETUP.read_text()  # for drivers and clients started over SSH
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        public = any(ipaddress.ip_network(r["CidrIp"]).num_addresses > 2**16 for r in rule.get("IpRanges", []))
        if public:
            assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule
            assert not any(rule["FromPort"] <= p <= rule["ToPort"] for p in CONTROL_PORTS)


def test_no_token_is_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert not [f for f in tracked.split() if re.search(r"auth_token|\.token$", f)]
    assert "auth_token" in (REPO / ".gitignore").read_text()


@pytest.mark.parametrize("name", CLOUD)
def test_node_types_fit_the_study(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert _gpus(head) == 0
    gpus = sorted(_gpus(t) for t in workers.values())
    assert gpus[0] == 1 and gpus[-1] >= 8  # a tuning type and a pre-training type
    assert all(_spot(t) for t in workers.values()) and not _spot(head)
    assert any(t["min_workers"] >= 1 and _gpus(t) >= 1 for t in workers.values())  # tuning starts at once


@pytest.mark.parametrize("name", CLOUD)
def test_only_the_8_gpu_type_offers_what_pre_training_asks_for(name):
    """The paper preset's pre-training workers each ask for one `pretrain_gpu` (pretrain.worker_resource): the
    8-GPU type offers one per GPU, no other type any, so the DDP job can only land there."""
    from raysys.config import load_study

    resource = load_study("paper").pretrain.worker_resource
    assert resource == "pretrain_gpu"
    types = _load(name)["available_node_types"]
    offered = {k: (t.get("resources") or {}).get(resource, 0) for k, t in types.items()}
    assert offered == {k: _gpus(t) if _gpus(t) >= 8 else 0 for k, t in types.items()}


def test_gcp_node_types_declare_the_cpus_and_gpus_of_their_machines():
    """GCP's provider fills in no resources: what the autoscaler (and `--preset auto`) plans with is declared,
    and it must be the machine's. The paper's 8 pre-training workers fit the largest cluster it may build."""
    from raysys.config import load_study
    from raysys.sweep.cluster import read_autoscaler

    vcpus = {"n2-standard-8": 8, "g2-standard-8": 8, "a2-highgpu-8g": 96}
    for name, spec in _load("cluster-gcp.yaml")["available_node_types"].items():
        resources = spec["resources"]
        assert resources["CPU"] == vcpus[spec["node_config"]["machineType"]], name
        assert resources.get("GPU", 0) == _gpus(spec), name
    paper = load_study("paper").pretrain
    assert read_autoscaler(REPO / "cluster-gcp.yaml").most_ddp_workers(paper.cpus_per_worker) >= paper.num_workers


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_runs_the_one_setup_script(name):
    config = _load(name)
    assert config["setup_commands"] == ["bash ~/raysys/cluster/setup-node.sh"]
    assert config["file_mounts"]["~/raysys"] == "."  # the script arrives with the checkout it installs
    assert all(c.startswith("~/venv/bin/ray") or "~/venv/bin/ray start" in c
               for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"])


def test_the_setup_script_installs_torch_then_this_project_with_its_pinned_ray():
    script = SETUP.read_text()
    torch = re.search(r'^TORCH=([\d.]+)', script, re.MULTILINE)
    install_torch = script.index('pip" install -q "torch==$TORCH"')  # PyPI's Linux torch wheel is the CUDA build
    assert torch and install_torch < script.index('pip" install -q -e "$checkout"')
    pinned = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
              if d.startswith("ray[")]
    assert pinned and "==" in pinned[0]  # so `pip install -e` puts one Ray version on every node
    assert subprocess.run(["bash", "-n", str(SETUP)], check=False, capture_output=True).returncode == 0


def test_the_setup_script_refuses_a_python_older_than_3_10(tmp_path):
    """The node's python3 is 3.9 (a stand-in: `--version` prints it, the version check fails as 3.9's would): the
    script says so and stops before it builds anything."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.9.18" && exit 0\nexit 1\n')
    fake.chmod(0o755)
    env = {"HOME": str(tmp_path / "home"), "PATH": f"{fake.parent}:/usr/bin:/bin"}
    (tmp_path / "home").mkdir()
    done = subprocess.run(["bash", str(SETUP)], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert "needs Python 3.10 or newer" in done.stderr and "'Python 3.9.18'" in done.stderr, done.stderr
    assert list((tmp_path / "home").iterdir()) == []  # no venv, no .bashrc edit


def _start_flags(command: str) -> dict[str, str]:
    words = shlex.split(command.split(";")[-1])
    return dict(w.removeprefix("--").split("=", 1) for w in words if w.startswith("--") and "=" in w)


def test_the_local_cluster_keeps_clear_of_any_other_ray_on_its_machines():
    """Its own GCS, dashboard, agent, metrics, client and worker ports (none a default `ray start` takes, none in
    the kernel's ephemeral range Ray draws unset ports from) and its own temp dir, on the head and every worker;
    no `ray stop` outside its own account (`ray down` runs one as `ssh_user`)."""
    config = _load("cluster/local.yaml")
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    head = _start_flags(next(c for c in config["head_start_ray_commands"] if "ray start" in c))
    worker = _start_flags(next(c for c in config["worker_start_ray_commands"] if "ray start" in c))
    fixed = [int(head[k]) for k in ("port", "dashboard-port", "dashboard-agent-listen-port", "metrics-export-port",
                                    "ray-client-server-port")]
    workers = range(int(head["min-worker-port"]), int(head["max-worker-port"]) + 1)
    assert len(set(fixed)) == len(fixed) and not set(fixed) & RAY_DEFAULT_PORTS
    assert not any(p in RAY_DEFAULT_WORKER_PORTS or p in workers or p >= 32768 for p in fixed)
    assert workers.start > RAY_DEFAULT_WORKER_PORTS.stop and workers.stop <= 32768 and len(workers) >= 1000
    assert worker["address"] == f"$RAY_HEAD_IP:{head['port']}"
    assert all(worker[k] == head[k] for k in ("dashboard-agent-listen-port", "metrics-export-port",
                                              "min-worker-port", "max-worker-port", "temp-dir"))
    assert head["temp-dir"] == "$HOME/ray-tmp"  # not /tmp/ray, where every other Ray on the machine lives
    stops = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray stop" in c]
    assert stops == ["~/venv/bin/ray stop"] * 2  # as ssh_user: it can only stop that account's processes
    assert config["auth"]["ssh_user"] != "root"


def test_the_aws_policy_covers_what_cluster_yaml_asks_of_ray_up_and_the_autoscaler():
    """The nodes' instance profile is the role the policy lets `ray up` pass; the AMI it resolves through SSM, the
    spot workers and the bucket are each granted."""
    config = _load("cluster.yaml")
    policy = json.loads((REPO / "cluster" / "aws-policy.json").read_text())
    granted = {a: s for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str)
                                                           else s["Action"])}
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in config["available_node_types"].values()}
    assert profiles == {"raysys-node"}
    assert granted["iam:PassRole"]["Resource"][0].endswith(":role/raysys-node")
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
                   "ec2:CreateSecurityGroup", "ec2:AuthorizeSecurityGroupIngress", "ec2:CreateKeyPair",
                   "iam:CreateServiceLinkedRole", "s3:PutObject", "s3:GetObject", "s3:ListBucket"):
        assert action in granted, action
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert all(i.startswith("resolve:ssm:/aws/service/deeplearning/") for i in images)
    assert granted["ssm:GetParameters"]["Resource"].endswith(":parameter/aws/service/deeplearning/*")
    trust = json.loads((REPO / "cluster" / "aws-trust.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}

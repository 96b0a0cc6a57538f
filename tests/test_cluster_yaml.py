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
import sys
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raysys.config import tomllib  # tomli on Python 3.10

REPO = Path(__file__).resolve().parent.parent
CLOUD = ["cluster.yaml", "cluster-gcp.yaml"]
CONFIGS = [*CLOUD, "cluster/local.yaml"]
SETUP = REPO / "cluster" / "setup-node.sh"
AWS_NETWORK = REPO / "cluster" / "aws-network.sh"
GCP_NETWORK = REPO / "cluster" / "gcp-network.sh"
USER_RANGE = "203.0.113.7/32"  # where the user's SSH comes from (a documentation address)
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
                   "ec2:DescribeSecurityGroups", "ec2:CreateKeyPair", "iam:CreateServiceLinkedRole", "s3:PutObject",
                   "s3:GetObject", "s3:ListBucket"):
        assert action in granted, action
    # the group is the user's (cluster/aws-network.sh): Ray needs no right to make one, nor the head to open it
    assert not {"ec2:CreateSecurityGroup", "ec2:AuthorizeSecurityGroupIngress"} & granted.keys()
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert all(i.startswith("resolve:ssm:/aws/service/deeplearning/") for i in images)
    assert granted["ssm:GetParameters"]["Resource"].endswith(":parameter/aws/service/deeplearning/*")
    trust = json.loads((REPO / "cluster" / "aws-trust.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


def test_every_aws_node_is_in_the_users_security_group_so_ray_makes_and_opens_none(monkeypatch):
    """Ray's _configure_security_group creates a group, and gives it its rules, for each node type that names no
    SecurityGroupIds: every type names the one placeholder the README and cluster/aws-network.sh replace, and Ray's
    own step, run on the file, creates nothing (one type without it, and Ray would)."""
    from ray.autoscaler._private.aws import config as aws

    config = prepare_config(_load("cluster.yaml"))
    assert "security_group" not in config["provider"]
    types = config["available_node_types"]
    assert {k: t["node_config"].get("SecurityGroupIds") for k, t in types.items()} == \
        {k: ["sg-REPLACE_ME"] for k in types}
    assert not any({"NetworkInterfaces", "LaunchTemplate"} & t["node_config"].keys() for t in types.values())
    asked = []

    def upsert(conf, node_types):  # stands in for the AWS calls: creating the group and authorizing its rules
        asked.extend(node_types)
        return {t: SimpleNamespace(id="sg-made-by-ray") for t in node_types}

    monkeypatch.setattr(aws, "_upsert_security_groups", upsert)
    assert aws._configure_security_group(copy.deepcopy(config)) == config and asked == []
    del config["available_node_types"]["gpu_8x"]["node_config"]["SecurityGroupIds"]
    aws._configure_security_group(config)
    assert asked == ["gpu_8x"]


def test_a_group_ray_makes_admits_ssh_from_anywhere_whatever_the_config_adds():
    """What cluster.yaml and the README say Ray does: a rule the config asks for comes beside SSH from 0.0.0.0/0,
    never instead of it (Ray's _create_default_inbound_rules)."""
    from ray.autoscaler._private.aws import config as aws

    narrow = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": USER_RANGE}]}
    rules = aws._create_default_inbound_rules({"sg-made-by-ray"}, [narrow])
    assert {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]} in rules
    assert narrow in rules


def test_every_gcp_node_is_on_the_clusters_network_and_only_the_head_has_a_public_address():
    """Ray's _configure_subnet gives a public address on the region's first subnet to every node type without
    networkInterfaces; here each names the network of cluster/gcp-network.sh, and only the head an accessConfig.
    `use_internal_ips` stays off: `ray up` reaches the head on its public address, and the head's autoscaler reaches
    workers on their internal ones whatever it says."""
    config = prepare_config(_load("cluster-gcp.yaml"))
    region, head = config["provider"]["region"], config["head_node_type"]
    assert not config["provider"].get("use_internal_ips")
    for name, spec in config["available_node_types"].items():
        nics = spec["node_config"]["networkInterfaces"]
        assert [(n["network"], n["subnetwork"]) for n in nics] == \
            [("global/networks/raysys", f"regions/{region}/subnetworks/raysys")], name
        tags = sorted(spec["node_config"]["tags"]["items"])
        if name == head:
            assert nics[0]["accessConfigs"] == [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]
            assert tags == ["raysys", "raysys-head"]
        else:
            assert "accessConfigs" not in nics[0], name
            assert tags == ["raysys"], name


# aws and gcloud as the network scripts see them: each call appended to $STUB_LOG (its words, as JSON); whether
# anything exists yet is $STUB_EXISTS; AWS answers with made-up ids, and with AWS's error for a rule already there.
STUB = """#!{python}
import json, os, sys
from pathlib import Path
tool, words, exists = Path(sys.argv[0]).name, sys.argv[1:], os.environ["STUB_EXISTS"] == "1"
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps([tool, *words]) + "\\n")
if tool == "gcloud":
    sys.exit(0 if exists or "describe" not in words else 1)
if "describe-vpcs" in words:
    print("vpc-0stub")
elif "describe-security-groups" in words:
    print("sg-0stub" if exists else "None")
elif "create-security-group" in words:
    print("sg-0stub")
elif "authorize-security-group-ingress" in words and exists:
    sys.exit("An error occurred (InvalidPermission.Duplicate) when calling the AuthorizeSecurityGroupIngress "
             "operation: the specified rule already exists")
"""


def _run_network_script(tmp_path: Path, script: Path, *args: str, exists: bool = False):
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for tool in ("aws", "gcloud"):
        (stubs / tool).write_text(STUB.format(python=sys.executable))
        (stubs / tool).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.write_text("")
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log),
           "STUB_EXISTS": "1" if exists else "0"}
    done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    return done, [json.loads(line) for line in log.read_text().splitlines()]


def _words(call: list[str]) -> tuple[list[str], dict]:
    """A command line's positional words and its flags: gcloud's `--key=value` (a bare `--key` is True) or aws's
    `--key value`."""
    positional, flags, rest = [], {}, call[1:]
    while rest:
        word = rest.pop(0)
        if not word.startswith("--"):
            positional.append(word)
        elif "=" in word:
            key, value = word[2:].split("=", 1)
            flags[key] = value
        else:
            flags[word[2:]] = rest.pop(0) if call[0] == "aws" else True
    return positional, flags


def _ports(rules: str) -> list[tuple[str, int, int]]:
    """gcloud's --rules (tcp:22, tcp,udp, udp:8000-9000) as (protocol, first port, last port)."""
    out = []
    for rule in rules.split(","):
        protocol, _, ports = rule.partition(":")
        first, _, last = ports.partition("-")
        out.append((protocol, int(first or 0), int(last or first or 65535)))
    return out


def test_the_aws_network_script_admits_ssh_from_the_users_range_and_the_rest_from_the_group_only(tmp_path):
    done, calls = _run_network_script(tmp_path, AWS_NETWORK, USER_RANGE)
    assert done.returncode == 0, done.stderr
    sg = done.stdout.strip()
    assert sg == "sg-0stub" and "s/sg-REPLACE_ME/sg-0stub/g" in done.stderr  # the placeholder cluster.yaml has
    parsed = [_words(c) for c in calls]
    assert all(c[0] == "aws" and f["region"] == _load("cluster.yaml")["provider"]["region"] for c, (_, f) in
               zip(calls, parsed))
    made = [f for p, f in parsed if p == ["ec2", "create-security-group"]]
    assert len(made) == 1 and made[0]["vpc-id"] == "vpc-0stub"
    opened = [f for p, f in parsed if p == ["ec2", "authorize-security-group-ingress"]]
    assert all(f["group-id"] == sg for f in opened)
    assert sorted((f["protocol"], f["port"], f.get("cidr"), f.get("source-group")) for f in opened) == [
        ("tcp", "0-65535", None, sg), ("tcp", "22", USER_RANGE, None), ("udp", "0-65535", None, sg)]
    assert not any(k in f for f in opened for k in ("ip-permissions", "cidr-ipv6")) and "0.0.0.0" not in str(calls)

    again, calls = _run_network_script(tmp_path, AWS_NETWORK, USER_RANGE, exists=True)
    assert again.returncode == 0, again.stderr  # the group and its rules exist: nothing new, no error
    assert again.stdout.strip() == sg and not [c for c in calls if "create-security-group" in c]


def test_the_gcp_network_script_admits_ssh_to_the_head_from_the_users_range_and_the_rest_between_nodes(tmp_path):
    config = _load("cluster-gcp.yaml")
    done, calls = _run_network_script(tmp_path, GCP_NETWORK, "my-project", USER_RANGE)
    assert done.returncode == 0, done.stderr
    parsed = [_words(c) for c in calls]
    assert all(c[0] == "gcloud" and f["project"] == "my-project" for c, (_, f) in zip(calls, parsed))
    made = {(" ".join(p[1:-2]), p[-1]): f for p, f in parsed if p[-2] == "create"}
    assert list(made) == [("networks", "raysys"), ("networks subnets", "raysys"), ("routers", "raysys"),
                          ("routers nats", "raysys"), ("firewall-rules", "raysys-ssh"),
                          ("firewall-rules", "raysys-internal")]
    assert made["networks", "raysys"]["subnet-mode"] == "custom"
    subnet = made["networks subnets", "raysys"]
    assert subnet["region"] == config["provider"]["region"] and subnet["network"] == "raysys"
    assert subnet["enable-private-ip-google-access"] is True  # workers reach the bucket without a public address
    assert ipaddress.ip_network(subnet["range"]).is_private
    assert made["routers nats", "raysys"]["router"] == "raysys"  # and PyPI through the NAT
    assert made["routers nats", "raysys"]["nat-all-subnet-ip-ranges"] is True

    rules = {name: f for (kind, name), f in made.items() if kind == "firewall-rules"}
    assert all((f["network"], f["direction"], f["action"]) == ("raysys", "INGRESS", "ALLOW") for f in rules.values())
    outside = {name: f for name, f in rules.items() if "source-ranges" in f}
    assert list(outside) == ["raysys-ssh"]
    ssh = outside["raysys-ssh"]
    assert (ssh["source-ranges"], ssh["rules"], ssh["target-tags"]) == (USER_RANGE, "tcp:22", "raysys-head")
    metrics = int(_start_flags(config["head_start_ray_commands"][-1])["metrics-export-port"])
    assert not any(first <= p <= last for _, first, last in _ports(ssh["rules"]) for p in (metrics, *CONTROL_PORTS))
    inside = rules["raysys-internal"]
    assert (inside["source-tags"], inside["target-tags"], inside["rules"]) == ("raysys", "raysys", "tcp,udp")
    assert set(rules) == {"raysys-ssh", "raysys-internal"} and "0.0.0.0" not in str(calls)
    tags = {k: t["node_config"]["tags"]["items"] for k, t in config["available_node_types"].items()}
    assert [k for k, t in tags.items() if ssh["target-tags"] in t] == [config["head_node_type"]]
    assert all(inside["source-tags"] in t for t in tags.values())

    again, calls = _run_network_script(tmp_path, GCP_NETWORK, "my-project", "198.51.100.0/24", exists=True)
    assert again.returncode == 0, again.stderr  # all there: nothing made, the SSH rule set to the new range
    parsed = [_words(c) for c in calls]
    assert not [p for p, _ in parsed if "create" in p]
    updated = {p[-1]: f for p, f in parsed if p[-2] == "update"}
    assert updated["raysys-ssh"]["source-ranges"] == "198.51.100.0/24" and set(updated) == set(rules)


@pytest.mark.parametrize("script, before", [(AWS_NETWORK, []), (GCP_NETWORK, ["my-project"])],
                         ids=["aws", "gcp"])
def test_the_network_scripts_refuse_ssh_from_anywhere_unless_forced(tmp_path, script, before):
    for bad in ("0.0.0.0/0", "10.0.0.0/0", "203.0.113.7", "203.0.113.256/32", "203.0.113.7/33", "me"):
        done, calls = _run_network_script(tmp_path, script, *before, bad)
        assert (done.returncode, calls) == (2, []), (bad, done.stderr)  # stopped before any cloud call
        assert bad in done.stderr
    done, _ = _run_network_script(tmp_path, script, *before, "0.0.0.0/0")
    assert "whole internet" in done.stderr
    done, calls = _run_network_script(tmp_path, script, "--force", *before, "0.0.0.0/0")
    assert done.returncode == 0 and calls, done.stderr
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0

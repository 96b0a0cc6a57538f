"""`ray up` on this machine, the user's workflow end to end (README, "On a cluster"): cluster/local.yaml brings up
a head on 127.0.0.1 over SSH, which runs cluster/setup-node.sh exactly as a cloud node does; a reduced study with
data paths relative to its study file is submitted with `ray job submit --working-dir .` through `ray dashboard`'s
tunnel with the cluster's token; `raysys status` reads its storage; a second submission retrains nothing;
`ray down` stops this cluster and nothing else.

The node is a throwaway account on this machine (an sshd of the test's own on 127.0.0.1, a key made for the test).
An account, not root: `ray down` runs `ray stop` on the head, which stops every Ray process its account may signal
— as root, every Ray on the machine; as the cluster's own account, only the cluster's. A root-owned stand-in
`raylet` shows it. Needs root (to add the account) and openssh-server + rsync (installed with apt when missing)."""

import contextlib
import dataclasses
import getpass
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from raysys.storage import results
from raysys.storage.store import Store
from tests.sweep.test_driver import _real_data_preset

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")  # the ray CLI of this environment (the "laptop")
GCS_PORT, DASHBOARD_PORT = 26379, 28265  # cluster/local.yaml
CLUSTER_PORTS = (GCS_PORT, DASHBOARD_PORT, 28266, 28267, 30001)
OVERRIDES = ["pretrain.initial_steps=10", "pretrain.continual_steps=10", "pretrain.batch_size=16",
             "pretrain.log_every_steps=5", "pretrain.num_workers=1", "pretrain.cpus_per_worker=1",
             "tuning.max_steps=12", "tuning.eval_every_steps=4", 'tuning.types=["finetune"]', "seeds=[20]",
             "pilot.control_length=0", 'methods.tasks=["chem"]', 'methods.training_free.tasks=["chem"]']
TOOLS = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "rsync": "rsync"}


@dataclasses.dataclass(frozen=True)
class Node:
    """The cluster's account on this machine, reached by SSH at 127.0.0.1."""

    account: str
    uid: int
    home: Path
    ssh_port: int
    key: Path  # the laptop's private key, authorized for the account


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")  # sshd lives in sbin


def _install(packages: list[str]) -> None:
    """apt-get the packages, or skip the test saying why not."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"cannot install {packages} with apt: {err}")
        if done.returncode:
            pytest.skip(f"cannot install {packages} with apt: {done.stderr.strip()[-500:]}")


def _ensure_tools(ssh_port_busy_before: bool) -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if not _tool(tool)})
    if missing:
        _install(missing)
        if not ssh_port_busy_before and _listening(22):  # the package started the system's sshd: not ours to keep
            subprocess.run(["service", "ssh", "stop"], check=False, capture_output=True, timeout=60)


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=kwargs.pop("check", False), capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _pip_config_like_this_machine() -> str:
    """This machine's effective pip configuration (files and PIP_* variables) as a pip.conf: the node then reads
    packages from where this machine's own install did (its index, mirrors, constraints)."""
    listed = _run([sys.executable, "-m", "pip", "config", "list"], 60).stdout
    sections: dict[str, dict[str, str]] = {}
    env = []  # PIP_* variables: pip lets them override every file
    for line in listed.splitlines():
        match = re.fullmatch(r"([\w:-]+)\.([\w-]+)='(.*)'", line.strip())
        if match and match[1] == ":env:":
            env.append((match[2], match[3]))
        elif match:
            sections.setdefault(match[1], {})[match[2]] = match[3]
    sections.setdefault("global", {}).update(env)
    return "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for s, keys in sections.items())


def _share_pip_cache(home: Path, uid: int) -> None:
    """Hard-link this machine's pip cache into the node account's (no copy, no second download of a wheel pip has
    fetched before); directories become the account's so pip may add to them. Skipped across filesystems."""
    done = _run([sys.executable, "-m", "pip", "cache", "dir"], 60)
    source = Path(done.stdout.strip())
    target = home / ".cache" / "pip"
    if done.returncode or not source.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if _run(["cp", "-al", str(source), str(target)], 300).returncode:
        shutil.rmtree(target, ignore_errors=True)
        return
    for folder in (target, *(p for p in target.rglob("*") if p.is_dir())):
        os.chown(folder, uid, uid)


def _account_processes(uid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


def _end_account_processes(uid: int) -> None:
    """Every process of the throwaway account (all the test's): SSH's shared connection lingers 10 s after its last
    command (ControlPersist), then goes; whatever is left after that is killed."""
    deadline = time.monotonic() + 15
    while _account_processes(uid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for proc in _account_processes(uid):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def ssh_node():
    """A throwaway account reached by key over an sshd of the test's own on 127.0.0.1 (port 22 when free, else a
    free port reached through `nc`); the account, its home (venv included), the sshd and the key go afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: adds a throwaway account for the cluster's node")
    port22_busy = _listening(22)
    _ensure_tools(port22_busy)
    port = _free_port() if port22_busy else 22
    if port != 22 and not shutil.which("nc"):
        _install(["netcat-openbsd"])
    base = Path(tempfile.mkdtemp(prefix="rs-up-", dir="/tmp"))  # short: Ray's socket paths live below it
    base.chmod(0o755)
    account, home = f"rsup{secrets.token_hex(4)}", base / "node"
    uid = sshd = None
    try:
        subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash",
                        "--password", "*", account], check=True, capture_output=True, timeout=60)
        uid = home.stat().st_uid
        key = base / "laptop" / ".ssh" / "raysys_cluster"
        key.parent.mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60)
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        (home / ".config" / "pip").mkdir(parents=True)
        (home / ".config" / "pip" / "pip.conf").write_text(_pip_config_like_this_machine())
        subprocess.run(["chown", "-R", f"{account}:", str(home / ".ssh"), str(home / ".config")], check=True)
        _share_pip_cache(home, uid)
        sshd = _start_sshd(base / "sshd", account, port)
        yield Node(account, uid, home, port, key)
    finally:
        if sshd is not None:
            sshd.terminate()
            sshd.wait(timeout=30)
        if uid is not None:
            _end_account_processes(uid)
            subprocess.run(["userdel", account], check=False, capture_output=True, timeout=60)
        subprocess.run(["rm", "-rf", str(base)], check=False, timeout=600)  # the venv: ~2 GB of small files


def _start_sshd(folder: Path, account: str, port: int) -> subprocess.Popen:
    folder.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    (folder / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'host_key'}", f"PidFile {folder / 'pid'}",
        f"AllowUsers {account}", "PermitRootLogin no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "AllowTcpForwarding yes", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
    with open(folder / "log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([_tool("sshd"), "-D", "-e", "-f", str(folder / "sshd_config")],
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"sshd did not start: {(folder / 'log').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def _checkout(target: Path) -> Path:
    """A copy of this checkout (tracked and new files, as `git status` sees them): the user's project folder."""
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], 60, cwd=REPO, check=True).stdout
    for name in filter(None, files.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _point_cluster_file_at(path: Path, node: Node) -> None:
    """The user's one edit to cluster/local.yaml: which account and key (ssh expands `~` from the passwd entry,
    not $HOME, so the key is given in full)."""
    config = yaml.safe_load(path.read_text())
    config["auth"].update(ssh_user=node.account, ssh_private_key=str(node.key))
    if node.ssh_port != 22:
        config["auth"]["ssh_proxy_command"] = f"nc 127.0.0.1 {node.ssh_port}"
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _laptop_env(laptop: Path) -> dict:
    """The user's shell: its own home (the token in ~/.ray/auth_token) and token mode; the launcher's files (the
    local provider's cluster state, bootstrapped and cached configs) in a temp dir of its own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    tmp = laptop / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(laptop), TMPDIR=str(tmp), RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="token",
               RAY_USAGE_STATS_ENABLED="0")
    return env


def _ssh_control_dir(cluster_name: str) -> Path:
    """Where Ray's SSH runner keeps its shared connection for a cluster (a fixed /tmp path, whatever TMPDIR says)."""
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:10]
    return Path("/tmp") / f"ray_ssh_{digest(getpass.getuser())}" / digest(cluster_name)


def _ok(done: subprocess.CompletedProcess, what: str) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{out[-6000:]}"
    return out


def _submit(env: dict, checkout: Path, address: str, job_id: str, storage: Path, *more: str) -> str:
    """`ray job submit` of the reduced study; waits for the job and returns its log, unless `--no-wait` is given."""
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    command = [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", ".",
               *[m for m in more if m == "--no-wait"], "--", "python", "sweeps/full_paper.py",
               "--preset", "study/mine.toml", "--storage", str(storage), "--only", "pretrain", "tuning", *sets,
               *[m for m in more if m != "--no-wait"]]
    out = _ok(_run(command, 600, cwd=checkout, env=env), f"ray job submit {job_id}")
    if "--no-wait" not in more:
        assert f"Job '{job_id}' succeeded" in out, out[-3000:]
        assert re.search(rf"running on the cluster at [\d.]+:{GCS_PORT} ", out), out[-3000:]  # this cluster's GCS
    return out


def _job(env: dict, address: str, verb: str, job_id: str) -> str:
    return _ok(_run([RAY, "job", verb, "--address", address, job_id], 120, env=env), f"ray job {verb} {job_id}")


def _stop_once_tuning_runs(env: dict, address: str, job_id: str) -> None:
    deadline = time.monotonic() + 300
    while "[tuning]" not in _job(env, address, "logs", job_id):
        status = _job(env, address, "status", job_id)
        assert time.monotonic() < deadline and not re.search("succeeded|failed|was stopped", status), status
        time.sleep(2)
    _job(env, address, "stop", job_id)


def _dashboard_status_without_token() -> int:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{DASHBOARD_PORT}/api/jobs/", timeout=10)
    except urllib.error.HTTPError as err:
        return err.code
    return 200


def _open_tunnel(env: dict, checkout: Path, cluster: list[str], port: int) -> subprocess.Popen:
    """`ray dashboard`: the SSH tunnel a user keeps open (its own process group: it leaves an ssh child)."""
    log = checkout.parent / "ray-dashboard.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([RAY, "dashboard", "--port", str(port), "--remote-port", str(DASHBOARD_PORT),
                                 *cluster], cwd=checkout, env=env, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _listening(port):
        assert proc.poll() is None and time.monotonic() < deadline, f"no tunnel: {log.read_text()[-3000:]}"
        time.sleep(0.5)
    return proc


def _stand_in_raylet(folder: Path) -> subprocess.Popen:
    """A root process named `raylet` (what `ray stop` looks for): another user's Ray, as far as `ray stop` can tell."""
    folder.mkdir()
    shutil.copy(shutil.which("sleep"), folder / "raylet")
    return subprocess.Popen([str(folder / "raylet"), "900"])


def _snapshot(store: Store) -> dict:
    tables = {t: results.read_table(store, t).to_pylist() for t in ("pretrain_runs", "tuning_runs")}
    weights = {str(p): p.stat().st_mtime_ns for p in store.local.joinpath("artifacts").rglob("*.safetensors")}
    return {"tables": tables, "weights": weights}


@pytest.mark.slow
def test_ray_up_runs_a_study_that_a_second_submission_does_not_retrain(ssh_node, tmp_path):
    node = ssh_node
    laptop = node.key.parent.parent
    env = _laptop_env(laptop)
    checkout = _checkout(node.home.parent / "checkout")
    _real_data_preset(checkout / "study")  # mine.toml, corpora/, tasks/: paths relative to the study file
    _point_cluster_file_at(checkout / "cluster" / "local.yaml", node)
    busy = [p for p in CLUSTER_PORTS if _listening(p)]
    assert not busy, f"ports of cluster/local.yaml already in use on this machine: {busy}"
    _ok(_run([RAY, "get-auth-token", "--generate"], 60, env=env), "ray get-auth-token")
    (laptop / ".ray" / "auth_token").chmod(0o600)
    other_ray = _stand_in_raylet(tmp_path / "other-ray")
    name = f"raysys-{node.account}"
    cluster = ["-n", name, "cluster/local.yaml"]
    storage = node.home / "runs" / "study1"  # the node's disk (on several machines: a bucket or a shared mount)
    tunnel = None
    seconds = {}
    try:
        start = time.monotonic()
        _ok(_run([RAY, "up", "-y", "--no-config-cache", *cluster], 900, cwd=checkout, env=env), "ray up")
        seconds["up"] = time.monotonic() - start
        assert _dashboard_status_without_token() in (401, 403)  # token authentication is on
        node_ip = (_run([sys.executable, "-c", "import ray.util; print(ray.util.get_node_ip_address())"], 60).stdout
                   .split() or ["127.0.0.1"])[-1]
        if not node_ip.startswith("127."):
            assert not _listening(DASHBOARD_PORT, node_ip)  # the dashboard listens on 127.0.0.1 only

        local_port = _free_port()
        tunnel = _open_tunnel(env, checkout, cluster, local_port)
        address = f"http://127.0.0.1:{local_port}"
        start = time.monotonic()
        first = _submit(env, checkout, address, "raysys-study-1", storage)
        seconds["first job"] = time.monotonic() - start
        assert "[pretrain] 3 cells: 0 finished, 3 to run" in first and "[tuning] 6 cells: 0 finished, 6 to run" in first
        store = Store(storage)
        links = results.ok_rows(store, "pretrain_runs")
        assert sorted((r["link"], r["domain"]) for r in links) == [(0, "gen"), (1, "bio"), (2, "rev")]
        runs = results.ok_rows(store, "tuning_runs")
        assert sorted((r["plm_index"], r["task"]) for r in runs) == [(i, t) for i in range(3) for t in ("chem", "help")]
        assert {p.stat().st_uid for p in storage.rglob("*.parquet")} == {node.uid}  # written on the node
        status = _ok(_run([sys.executable, "-m", "raysys.cli", "status", str(storage)], 120, cwd=REPO), "status")
        assert re.search(r"^pretrain\s+3\s+3\s+0\s+0\s+complete$", status, re.MULTILINE), status
        assert re.search(r"^tuning\s+6\s+6\s+0\s+0\s+complete$", status, re.MULTILINE), status
        assert "no sweep is running on this storage" in status

        before = _snapshot(store)
        start = time.monotonic()
        second = _submit(env, checkout, address, "raysys-study-2", storage)
        seconds["second job"] = time.monotonic() - start
        assert "[pretrain] 3 cells: 3 finished, 0 to run" in second, second[-3000:]
        assert "[tuning] 6 cells: 6 finished, 0 to run" in second, second[-3000:]
        assert _snapshot(store) == before  # not a row rewritten, not a weight file touched
        assert "Job 'raysys-study-1' succeeded" in _job(env, address, "status", "raysys-study-1")

        # a larger study (a second seed), stopped while it tunes: the job ends, the finished cells stay as they were
        _submit(env, checkout, address, "raysys-study-3", storage, "--no-wait", "--set", "seeds=[20,21]")
        _stop_once_tuning_runs(env, address, "raysys-study-3")
        assert "Job 'raysys-study-3' was stopped" in _job(env, address, "status", "raysys-study-3")
        seed_20 = [r for r in _snapshot(store)["tables"]["tuning_runs"] if r["seed"] == 20]
        assert seed_20 == before["tables"]["tuning_runs"]
    finally:
        if tunnel is not None:
            os.killpg(tunnel.pid, signal.SIGTERM)
            tunnel.wait(timeout=30)
        start = time.monotonic()
        down = _run([RAY, "down", "-y", *cluster], 300, cwd=checkout, env=env)
        seconds["down"] = time.monotonic() - start
        print("ray up test, seconds per step:", {k: round(v) for k, v in seconds.items()})
        shutil.rmtree(_ssh_control_dir(name), ignore_errors=True)
        with contextlib.suppress(OSError):  # its parent too, unless another cluster's connection lives there
            _ssh_control_dir(name).parent.rmdir()
        alive = other_ray.poll() is None
        other_ray.kill()
        other_ray.wait()
    _ok(down, "ray down")
    assert alive, "ray down stopped a Ray process of another account"
    deadline = time.monotonic() + 20
    while any(_listening(p) for p in (GCS_PORT, DASHBOARD_PORT)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_listening(p) for p in (GCS_PORT, DASHBOARD_PORT))  # this cluster is down
    left = [" ".join(p.cmdline()[:2]) for p in _account_processes(node.uid) if not p.name().startswith("sshd")]
    assert not left, left

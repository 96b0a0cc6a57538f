"""The package runs on the Python the nodes have: Ubuntu 22.04's python3 is 3.10 (glibc 2.35, x86_64).

Three checks: every Python file's minimum version (vermin, from the code itself) is exactly what `requires-python`
says; the presets load with the fallback TOML reader 3.10 uses; and every distribution a node installs — this
package with its dependencies, and the pinned torch — resolves to a wheel that CPython 3.10 on manylinux x86_64
can install (pip, from the index's metadata, installing nothing)."""

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from raysys.config import tomllib

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
NODE_PYTHON = (3, 10)
# What `pip install` on the nodes accepts: glibc 2.35 runs every manylinux_2_x wheel up to 2_35 (and the legacy
# names of 2_17, 2_12 and 2_5).
NODE_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
# pip evaluates environment markers for the Python it runs on, whatever --python-version says: the markers of the
# resolved set are evaluated again here for the node's.
NODE_MARKERS = {**default_environment(), "python_version": "3.10", "python_full_version": "3.10.12",
                "implementation_name": "cpython", "platform_python_implementation": "CPython",
                "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}
INDEX = "https://pypi.org/simple"  # where the nodes install from
PIP_FLOOR = Version("25.3")  # the first pip whose dry run reads only metadata (the test extra asks for it)


def _declared_minimum() -> tuple[int, int]:
    spec = PYPROJECT["project"]["requires-python"]
    found = re.fullmatch(r">=\s*3\.(\d+)", spec)
    assert found, f"requires-python = {spec!r}: expected '>=3.N'"
    return 3, int(found.group(1))


def _python_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.py"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if (REPO / f).is_file()]


def _vermin(files: list[str]) -> tuple[tuple[int, int], list[str]]:
    """(the minimum Python 3 of all `files`, each use that needs more than the declared minimum). Annotations are
    evaluated (the config builder reads them with typing.get_type_hints), and `X | Y` unions are detected."""
    out = subprocess.run([sys.executable, "-c", "from vermin.main import main; main()", "--no-tips", "-vvv",
                          "--eval-annotations", "--feature", "union-types", "--no-make-paths-absolute",
                          "--format", "parsable", *files],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[-1].startswith(":::"), out.stdout[-2000:] + out.stderr[-2000:]
    total = lines[-1].split(":")[4]  # ':::!2:3.10:' is the minimum over every file
    assert re.fullmatch(r"3\.\d+", total), "vermin found no minimum (a file that does not parse?):\n" + out.stdout[-3000:]
    minimum = tuple(int(x) for x in total.split("."))
    declared = _declared_minimum()
    beyond = []
    for line in lines[:-1]:
        parts = line.split(":")
        needs = parts[4] if len(parts) >= 6 and parts[1] else ""
        if re.fullmatch(r"3\.\d+", needs) and tuple(int(x) for x in needs.split(".")) > declared:
            beyond.append(line)
    return minimum, beyond


def test_every_python_file_needs_exactly_the_python_requires_python_names():
    files = _python_files()
    assert {f.split("/")[0] for f in files} >= {"raysys", "tests", "bench", "sweeps"}, files
    minimum, beyond = _vermin(files)
    assert not beyond, "uses newer than requires-python:\n" + "\n".join(beyond)
    assert minimum == _declared_minimum() == NODE_PYTHON  # not lower either: 3.10's `X | Y` unions are used
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py{}{}".format(*NODE_PYTHON)


def test_vermin_sees_what_310_lacks(tmp_path):
    """The check above can fail: 3.11's modules and members are caught, each by its line (source that parses on
    3.10, so that this runs there too)."""
    (tmp_path / "new.py").write_text("import datetime\nimport tomllib\nfrom typing import Self\n\n"
                                     "NOW = datetime.UTC\n")
    minimum, beyond = _vermin([str(tmp_path / "new.py")])
    assert minimum == (3, 11)
    assert [line.split(":")[1] for line in beyond] == ["2", "3", "5"], beyond


def test_the_presets_load_with_the_toml_reader_of_python_310():
    """On 3.10 there is no tomllib: raysys.config falls back to tomli (a dependency there). Here the standard
    module is hidden from a fresh interpreter, so the fallback branch itself runs, on the real tomli."""
    script = (
        "import sys\n"
        "sys.modules['tomllib'] = None  # as on 3.10: `import tomllib` fails\n"
        "from raysys import config\n"
        "assert config.tomllib.__name__ == 'tomli', config.tomllib\n"
        "studies = {name: config.load_study(name) for name in config.available_presets()}\n"
        "print({name: s.pretrain.num_workers for name, s in studies.items()})\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "{'paper': 8, 'tiny': 1}"


def _torch_pin() -> str:
    """The torch every install of this project starts with (README's commands, .ci/run, the nodes)."""
    found = re.search(r"pip install -q torch==([\d.]+)", (REPO / ".ci" / "run").read_text())
    assert found, ".ci/run no longer pins torch"
    return found.group(1)


def _index_answers() -> None:
    try:
        urllib.request.urlopen(f"{INDEX}/pip/", timeout=30).close()
    except OSError as err:
        pytest.fail(f"the package index {INDEX} does not answer ({err}): this check resolves the nodes' wheels "
                    "there and cannot run without it")


def _pip_resolve(requirements: list[str], report: Path) -> dict:
    """pip's resolution of `requirements` for the node's Python and platform, binary wheels only: what it would
    install, read from the index's metadata (range requests), nothing downloaded whole or installed."""
    platforms = [arg for p in NODE_PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--index-url", INDEX, "--dry-run",
               "--ignore-installed", "--use-feature=fast-deps", "--only-binary=:all:", "--implementation", "cp",
               "--python-version", "{}.{}".format(*NODE_PYTHON), *platforms, "--target", str(report.parent / "never"),
               "--report", str(report), "--quiet", *requirements]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=400, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip did not resolve the nodes' requirements from {INDEX} in 400 s")
    assert out.returncode == 0, "no installable set of wheels for CPython 3.10 on manylinux x86_64:\n" + \
        out.stderr[-4000:]
    return json.loads(report.read_text())


def _missed_requirements(report: dict) -> list[str]:
    """The requirements of the resolved set, with markers evaluated for the node, that the set does not satisfy
    (those pip skipped because their marker is false on the Python it runs on: `tomli; python_version < '3.11'`).
    Extras are followed from the requests that name them."""
    dists = {canonicalize_name(d["metadata"]["name"]): d for d in report["install"]}
    todo = [(name, frozenset(d.get("requested_extras") or ())) for name, d in dists.items() if d["requested"]]
    seen, missed = set(), []
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for line in dists[name]["metadata"].get("requires_dist", []):
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({**NODE_MARKERS, "extra": e}) for e in extras | {""}):
                continue
            dep = dists.get(canonicalize_name(req.name))
            if dep is None or not req.specifier.contains(dep["metadata"]["version"], prereleases=True):
                missed.append(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}"
                              f"{req.specifier}")
            else:
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return sorted(set(missed))


def _node_tags() -> set:
    return set(cpython_tags(NODE_PYTHON, platforms=NODE_PLATFORMS)) | set(
        compatible_tags(NODE_PYTHON, "cp310", NODE_PLATFORMS))


def test_every_wheel_a_node_installs_exists_for_its_python_and_platform(tmp_path):
    from importlib.metadata import version

    assert Version(version("pip")) >= PIP_FLOOR, f"pip {version('pip')}: the test extra asks for pip>={PIP_FLOOR}"
    _index_answers()
    torch = _torch_pin()
    requirements = [str(REPO), f"torch=={torch}"]
    for attempt in range(3):
        report = _pip_resolve(requirements, tmp_path / f"report{attempt}.json")
        missed = _missed_requirements(report)
        if not missed:
            break
        requirements += missed  # asked for by name, so pip resolves them (and what they need) too
    assert not missed, f"still unresolved for Python 3.10: {missed}"
    tags, resolved, not_wheels = _node_tags(), {}, []
    for dist in report["install"]:
        name, url = dist["metadata"]["name"], dist["download_info"]["url"]
        resolved[canonicalize_name(name)] = dist["metadata"]["version"]
        if dist["download_info"].get("dir_info") is not None:
            assert Path(url.removeprefix("file://")) == REPO, url  # this checkout, built from source as on a node
            continue
        filename = url.rsplit("/", 1)[-1].split("#")[0]
        if not filename.endswith(".whl") or not (set(parse_wheel_filename(filename)[3]) & tags):
            not_wheels.append(filename)
    assert not not_wheels, f"not installable on CPython 3.10 / manylinux x86_64: {not_wheels}"
    ray_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    assert resolved["ray"] == ray_pin.split("==")[1] and resolved["torch"] == torch
    assert "tomli" in resolved  # only 3.10 needs it: the markers were evaluated for the node
    print(f"{len(resolved)} distributions for CPython 3.10 / manylinux x86_64:",
          " ".join(f"{k}=={v}" for k, v in sorted(resolved.items())))

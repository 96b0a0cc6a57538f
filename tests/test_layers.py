"""The package's layers: each imports only those below it (or its own), nothing imports in a cycle, and the
`raysys` command reads a storage without loading Ray or torch."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raysys"
# Lowest first. A module may import its own layer's modules and any lower layer's.
LAYERS = ["config", "identity", "core", "storage", "stages", "report", "sweep", "cli"]


def _module(path: Path) -> str:
    return ".".join(("raysys", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def _imports(path: Path) -> dict[str, bool]:
    """raysys module -> whether it is imported at module level (else only inside a function)."""
    found: dict[str, bool] = {}
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raysys"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if (PACKAGE.parent / n.replace(".", "/")).with_suffix(".py").exists()
                     or (PACKAGE.parent / n.replace(".", "/")).is_dir() else node.module for n in names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("raysys")]
        for name in names:
            found[name] = found.get(name, False) or id(node) in top
    return found


def _graph() -> dict[str, dict[str, bool]]:
    return {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_layer_imports_a_higher_one():
    wrong = [(module, target) for module, targets in _graph().items() for target in targets
             if target != "raysys" and _layer(target) > _layer(module)]
    assert wrong == []


def test_the_module_level_imports_have_no_cycle():
    imports = _graph()
    graph = {m: [t for t, top in targets.items() if top and t in imports] for m, targets in imports.items()}
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in graph[module]:
            assert state.get(target) != "open", " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = "closed"

    for module in graph:
        if module not in state:
            visit(module, [])


READ_A_STORAGE = r'''
import json, sys
from raysys import cli
from raysys.config import load_study
from raysys.storage.store import Store
from raysys.storage.study import save_study

root = sys.argv[1]
save_study(load_study("tiny"), Store(root))
codes = [cli.main(["status", root]), cli.main(["results", root, "tuning_runs"]), cli.main(["report", root]),
         cli.main(["results", root]), cli.main(["failures", root])]
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "torch", "transformers", "peft"})
print(json.dumps({"codes": codes, "loaded": loaded}))
'''


def test_the_raysys_command_reads_a_storage_without_ray_or_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", READ_A_STORAGE, str(tmp_path / "store")], capture_output=True,
                         text=True, timeout=120, check=True)
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer == {"codes": [0, 0, 0, 0, 0], "loaded": []}
    assert (tmp_path / "store" / "report" / "report.md").is_file()
    assert "pretrain" in out.stdout and "no sweep is running" in out.stdout

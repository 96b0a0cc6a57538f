"""docs/explore.ipynb, executed against a store as a user would run it: every cell runs, both figures render, and
its numbers are the report's own."""

import json
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from raysys.report import figures
from raysys.report.scope import StudyRows

NOTEBOOK = Path(__file__).parents[2] / "docs" / "explore.ipynb"

# appended to the notebook by the test: what its cells computed, for the comparison below
DUMP = """import json
json.dump({"applied": applied.reset_index().to_dict("records"), "curves": curves.reset_index().to_dict("records"),
           "gaps": hop_gaps.reset_index().to_dict("records")}, open(OUT, "w"), default=lambda x: x.item())"""


@pytest.fixture(scope="module")
def executed(micro_run, tmp_path_factory):
    import nbformat
    from nbclient import NotebookClient

    from raysys.storage.study import save_study

    study, store, _ = micro_run
    save_study(study, store)  # the study the notebook loads: other tests run variants of it on this storage
    out = tmp_path_factory.mktemp("notebook") / "numbers.json"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(f"OUT = {str(out)!r}\n{DUMP}"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYSYS_STORAGE", str(store.root))  # the kernel inherits it
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on any error
    return notebook, json.loads(out.read_text())


def test_every_cell_runs_and_both_figures_render(executed):
    notebook, _ = executed
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures_shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures_shown) == 2
    assert any("study 'tiny'" in o.get("text", "") for o in outputs)


def test_the_figures_numbers_are_the_reports(executed, micro_run):
    _, numbers = executed
    study, store, _ = micro_run
    scope = StudyRows(study, store)
    applied = figures._mean_by(scope.ok_rows("compatibility"), lambda r: (
        r["task"], r["tuning_type"], r["source_plm_index"], r["target_plm_index"]), "test_accuracy")
    assert applied and {(r["task"], r["tuning_type"], r["source_plm_index"], r["target_plm_index"]):
                        r["test_accuracy"] for r in numbers["applied"]} == pytest.approx(applied)
    curves = figures._mean_by(scope.ok_rows("interpolation"), lambda r: (r["tuning_type"], r["pair_kind"], r["alpha"]),
                              "test_accuracy")
    assert curves and {(r["tuning_type"], r["pair_kind"], r["alpha"]): r["test_accuracy"]
                       for r in numbers["curves"]} == pytest.approx(curves)


def test_the_hop_gaps_pair_each_recycled_delta_with_its_retuned_model(executed, micro_run):
    _, numbers = executed
    study, store, _ = micro_run
    scope = StudyRows(study, store)
    retuned = {(r["task"], r["tuning_type"], r["seed"], r["plm_index"]): r["test_accuracy"]
               for r in scope.ok_rows("tuning_runs") if r["chain"] == "main"}
    gaps = defaultdict(list)
    for r in scope.ok_rows("compatibility"):
        own = retuned[(r["task"], r["tuning_type"], r["seed"], r["target_plm_index"])]
        gaps[(r["tuning_type"], r["target_plm_index"] - r["source_plm_index"])].append(r["test_accuracy"] - own)
    found = {(r["tuning_type"], r["hop"]): (r["count"], r["mean"]) for r in numbers["gaps"]}
    assert found.keys() == gaps.keys() and len({hop for _, hop in found}) >= 2  # several hop counts
    for key, values in gaps.items():
        assert found[key] == (len(values), pytest.approx(statistics.mean(values)))

"""Recycling methods: the plan of cells (the grid multiplies only the distilling methods), method cells on the
micro study's real checkpoints, the teacher cache, initialization with Δ = 0, training-free maps, bad input."""

import dataclasses
import json
import os

import pytest

from raysys.config import METHODS, RECYCLING_METHODS, ConfigError, load_study
from raysys.core import compute
from raysys.core.recycle import WeightMismatchError
from raysys.stages import method_starts, methods
from raysys.stages.base import Context, MissingInputError, View
from raysys.stages.chain import plan_chain
from raysys.stages.recipe import encoded_task
from raysys.stages.registry import stage
from raysys.storage import artifacts, manifest, results
from raysys.sweep import driver as sweep
from tests.conftest import MICRO_OVERRIDES

DISTILLING = [name for name, method in RECYCLING_METHODS.items() if method.distils]


def _plan(*overrides):
    study = load_study("tiny", list(overrides))
    return study, methods.plan_methods(study, plan_chain(study))


def test_the_grid_multiplies_only_distilling_methods():
    study, cells = _plan()
    m = study.methods
    combos = len(study.upgrades) * len(study.method_tasks) * len(study.method_types) * len(study.seeds) * (
        len(m.shots) + 1)
    grid = len(m.temperatures) * len(m.kd_weights) * len(m.betas)
    by_method = {name: [c for c in cells if c.method == name] for name in METHODS}
    starts = len(m.transfer_starts) * len(study.seeds) * (len(m.shots) + 1)  # per type where the method applies
    assert {k: len(v) for k, v in by_method.items()} == {"vanilla": combos, "init": combos,
                                                        "distill": combos * grid, "combined": combos * grid,
                                                        "transfer_init": len(study.method_types) * starts,
                                                        "text_distill": combos // (len(m.shots) + 1) * len(m.shots)}
    assert len({c.cell_hash for c in cells}) == len(cells)
    assert all(c.temperature is None for c in by_method["vanilla"] + by_method["init"])
    vanilla = {c.cell_hash for c in by_method["vanilla"]}
    assert all(c.vanilla_hash in vanilla for c in cells)
    assert all(c.needs_reference == (c.method != "vanilla") for c in cells)


def test_a_method_is_a_start_and_an_objective_the_stage_implements():
    assert list(RECYCLING_METHODS) == list(METHODS) and METHODS[0] == "vanilla"
    for method in RECYCLING_METHODS.values():
        assert method.start in method_starts.STARTS and method.objective in method_starts.OBJECTIVES
    assert DISTILLING == ["distill", "combined"]
    assert [m for m, r in RECYCLING_METHODS.items() if r.recycles] == ["init", "distill", "combined", "transfer_init",
                                                                       "text_distill"]


def test_label_free_distillation_is_planned_for_k_shot_and_named_by_its_text():
    """text_distill: K-shot cells only (its fine-tune is the K-shot one); its hash holds what it was taught on —
    M_j's corpus and the phase's settings — so another corpus or budget is another cell, the rest is untouched."""
    _, cells = _plan()
    texts = [c for c in cells if c.method == "text_distill"]
    assert texts and {c.regime for c in texts} == {"kshot"} and all(c.needs_reference for c in texts)
    _, longer = _plan("methods.text_distill.steps=200")
    _, other_text = _plan("world.domain_sentences=3000")
    assert {c.cell_hash for c in longer if c.method == "text_distill"}.isdisjoint(c.cell_hash for c in texts)
    assert {c.cell_hash for c in longer if c.method != "text_distill"} == {
        c.cell_hash for c in cells if c.method != "text_distill"}
    assert {c.cell_hash for c in other_text if c.method == "text_distill"}.isdisjoint(c.cell_hash for c in texts)
    vanilla = next(c for c in cells if c.method == "vanilla" and c.cell_hash == texts[0].vanilla_hash)
    text, length = methods.text_distill_config(load_study("tiny")), load_study("tiny").tuning.max_length
    assert methods.STAGE.train_tokens(load_study("tiny"), texts[0]) == (
        methods.STAGE.train_tokens(load_study("tiny"), vanilla) + text["steps"] * text["batch_size"] * length)
    with pytest.raises(ConfigError, match="methods.text_distill.eval_every_steps: must be in 1..steps"):
        load_study("tiny", ["methods.text_distill.steps=5"])


def test_without_labels_the_distillation_loss_reads_no_label():
    import torch

    from raysys.core.objectives import distillation_loss

    student, teacher = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[0.5, 0.5, 3.0]])
    one, _ = distillation_loss(student, torch.tensor([0]), teacher, 5.0, 1.0, 0.0)
    other, _ = distillation_loss(student, torch.tensor([2]), teacher, 5.0, 1.0, 0.0)
    kl = torch.nn.functional.kl_div(torch.log_softmax(student / 5, -1), torch.log_softmax(teacher / 5, -1),
                                    log_target=True, reduction="batchmean")
    assert one == other == 25 * kl


def test_a_transferred_start_is_planned_where_its_transfer_cell_is_and_waits_for_its_row():
    """One transfer_init cell per transfer method that applies to the type and upgrade (SVD projection needs
    backbone weights; multi-version merging an earlier version), naming the transfer cell it starts from."""
    study, cells = _plan('methods.transfer_starts=["svd","multi_version","ties"]')
    transfer = {c.cell_hash: c for c in stage("transfer").plan(study, plan_chain(study))}
    starts = [c for c in cells if c.method == "transfer_init"]
    assert {(c.tuning_type, c.transfer) for c in starts} == {
        ("finetune", "svd"), ("lora", "svd"), *((t, m) for t in study.tuning.types for m in ("ties", "multi_version"))}
    _, later = _plan('methods.transfer_starts=["svd","multi_version","ties"]', "tune_plms=[1,2,3]")
    assert {c.transfer for c in later if c.method == "transfer_init"} == {"svd", "ties"}  # M0 untuned: one version
    for c in starts:
        source = transfer[c.transfer_hash]
        assert (source.method, source.source_tuned_hash, source.target_plm_hash) == (
            c.transfer, c.old_tuned_hash, c.target_plm_hash)
        assert methods.STAGE.inputs(c)[-1] == methods.Rows("transfer", c.transfer_hash)
    assert len({c.cell_hash for c in starts}) == len(starts)
    _, off = _plan("transfer.enabled=false")
    assert not [c for c in off if c.method == "transfer_init"]  # no transfer stage: nothing to start from
    with pytest.raises(ConfigError, match="methods.transfer_starts: 'ties' is not in transfer.names"):
        load_study("tiny", ['transfer.names=["copy","scaled"]'])
    with pytest.raises(ConfigError, match="methods.transfer_starts: unknown transfer method 'copy'"):
        load_study("tiny", ['methods.transfer_starts=["copy"]'])


def test_without_the_reference_nothing_waits_for_it():
    _, cells = _plan('methods.names=["init","distill"]')
    assert {c.method for c in cells} == {"init", "distill"} and not any(c.needs_reference for c in cells)


def test_adding_a_grid_value_adds_only_new_cells():
    _, before = _plan()
    _, after = _plan("methods.temperatures=[5.0,10.0,20.0]")
    old, new = {c.cell_hash for c in before}, {c.cell_hash for c in after}
    assert old < new
    assert {c.temperature for c in after if c.cell_hash in new - old} == {20.0}


def test_kshot_settings_change_only_kshot_cells():
    _, before = _plan()
    _, after = _plan("methods.kshot.lr=0.0005")
    changed = {c.cell_hash for c in before} - {c.cell_hash for c in after}
    assert changed and all(c.regime == "kshot" for c in before if c.cell_hash in changed)


@pytest.mark.parametrize("override, field", [
    ("methods.temperatures=[0.0]", "methods.temperatures"), ("methods.temperatures=[-1.0]", "methods.temperatures"),
    ("methods.kd_weights=[1.5]", "methods.kd_weights"), ("methods.kd_weights=[-0.1]", "methods.kd_weights"),
    ("methods.betas=[-1.0]", "methods.betas"), ("methods.shots=[0]", "methods.shots"),
    ('methods.names=["vanilla","magic"]', "methods.names"), ('methods.types=["prefix"]', "methods.types"),
    ('methods.regimes=["half"]', "methods.regimes"), ("methods.sources=[3]", "methods.sources"),
    ('methods.tasks=["nope"]', "methods.tasks"), ("methods.target_fraction=0.0", "methods.target_fraction"),
    ("methods.kshot.lr=0.0", "methods.kshot.lr"), ("methods.training_free.rank=0", "methods.training_free.rank"),
    ('methods.training_free.tasks=["nope"]', "methods.training_free.tasks"),
])
def test_bad_method_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_study("tiny", [override])


def test_a_method_type_that_was_never_tuned_is_refused():
    with pytest.raises(ConfigError, match="methods.types"):
        load_study("tiny", ['tuning.types=["finetune"]', 'methods.types=["lora"]'])
    with pytest.raises(ConfigError, match="methods.sources"):
        load_study("tiny", ["tune_plms=[0,2]", "methods.sources=[1]"])


# ------------------------------------------------------------------------------------ on the micro study


def _context(study, store):
    return Context(study, store, plan_chain(study))


def test_every_method_cell_ran_measured_against_its_reference(micro_run):
    study, store, ran = micro_run
    chain = plan_chain(study)
    planned = methods.plan_methods(study, chain)
    rows = results.ok_rows(store, "methods_runs")
    # 5: the paper's four and transfer_init (from TIES alone); text_distill in the K-shot regime only
    assert ran["methods"]["ran"] == len(rows) == len(planned) == 2 * 3 * 2 * 5 + 2 * 3
    curves = results.read_table(store, "methods_curves").to_pylist()
    assert {r["step"] for r in curves} == {0, 4, 8, 12}  # the start point is on every curve
    for row in rows:
        assert row["teacher"] in (("cache-hit", "cache-miss") if row["method"] in DISTILLING else (None,))
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["dev_auc"] <= 1.0
        if row["regime"] == "kshot":
            assert row["num_train"] <= 4 * 4 and row["full_dev_best_accuracy"] is not None
        else:
            assert row["full_dev_best_accuracy"] == row["best_dev_accuracy"]
    vanilla = {r["cell_hash"]: r for r in rows if r["method"] == "vanilla"}
    for row in rows:
        assert row["target_dev_accuracy"] == pytest.approx(0.95 * vanilla[row["vanilla_hash"]]["best_dev_accuracy"])
        if row["steps_to_target"] is not None:
            curve = sorted((c for c in curves if c["cell_hash"] == row["cell_hash"]), key=lambda c: c["step"])
            first = next(c for c in curve if c["dev_accuracy"] >= row["target_dev_accuracy"])
            assert first["step"] == row["steps_to_target"]


def test_init_start_scores_the_compatibility_of_the_old_weights(micro_run):
    """Step 0 of an init run is Δ_i applied to M_j without training: the compatibility cell's dev accuracy."""
    _, store, _ = micro_run
    compat = {(r["source_tuned_hash"], r["target_plm_index"]): r for r in results.ok_rows(store, "compatibility")}
    checked = 0
    for row in results.ok_rows(store, "methods_runs"):
        if row["method"] == "init" and row["regime"] == "full":
            ref = compat[(row["old_tuned_hash"], row["target_plm_index"])]
            assert row["start_dev_accuracy"] == ref["dev_accuracy"]
            checked += 1
    assert checked == 2 * 3


def test_a_transferred_start_scores_what_the_transfer_stage_chose(micro_run):
    """Step 0 of a transfer_init run is the transfer stage's dev-chosen weights: its row's dev accuracy (full
    data), on the full dev set in the K-shot regime; and it trains from there."""
    _, store, _ = micro_run
    chosen = {r["cell_hash"]: r for r in results.ok_rows(store, "transfer") if r["selected"]}
    planned = {c.cell_hash: c for c in methods.plan_methods(micro_run[0], plan_chain(micro_run[0]))}
    curves = results.read_table(store, "methods_curves").to_pylist()
    checked = set()
    for row in results.ok_rows(store, "methods_runs"):
        if row["method"] != "transfer_init":
            continue
        source = chosen[planned[row["cell_hash"]].transfer_hash]
        first = next(c for c in curves if c["cell_hash"] == row["cell_hash"] and c["step"] == 0)
        assert first["full_dev_accuracy"] == pytest.approx(source["dev_accuracy"], abs=1e-12), row["tuning_type"]
        assert row["transfer"] == "ties" and row["test_accuracy"] is not None
        checked.add((row["tuning_type"], row["regime"]))
    assert len(checked) == 3 * 2


def test_label_free_distillation_starts_the_k_shot_fine_tune_from_what_it_taught(micro_run):
    """The text phase ran (the teacher's outputs on the corpus's first 64 documents are cached once per old
    model), and the K-shot run starts from its result, not from vanilla's fresh start."""
    _, store, _ = micro_run
    rows = results.ok_rows(store, "methods_runs")
    curves = {(c["cell_hash"], c["step"]): c for c in results.read_table(store, "methods_curves").to_pylist()}
    texts = [r for r in rows if r["method"] == "text_distill"]
    assert len(texts) == 2 * 3 and {r["regime"] for r in texts} == {"kshot"}
    for r in texts:
        vanilla = curves[(r["vanilla_hash"], 0)]
        assert curves[(r["cell_hash"], 0)]["full_dev_loss"] != vanilla["full_dev_loss"]
        assert r["test_accuracy"] is not None and r["target_dev_accuracy"] is not None
    from safetensors.torch import load_file

    taught_on = {}  # old model -> sizes of the sets its outputs were cached on
    for key in store.list_dirs("artifacts/teacher"):
        folder = store.local / "artifacts" / "teacher" / key
        teacher = json.loads((folder / "raysys.json").read_text())["teacher"]
        taught_on.setdefault(teacher, set()).add(len(load_file(str(folder / "outputs.safetensors"))["logits"]))
    assert all(64 in taught_on[r["old_tuned_hash"]] for r in texts)  # the 64 documents (K-shot train: 16)


@pytest.mark.parametrize("tuning_type", ["finetune", "lora"])
def test_initialization_with_a_zero_delta_reproduces_vanilla_exactly(micro_run, tuning_type):
    """An 'old' model that is M_i with the head (and module) vanilla would draw: its Δ is 0, so the init start is
    vanilla's start on M_j, and the whole run is the same."""
    study, store, _ = micro_run
    ctx = _context(study, store)
    vanilla = next(c for c in methods.plan_methods(study, ctx.chain)
                   if c.method == "vanilla" and c.tuning_type == tuning_type and c.regime == "kshot")
    source = ctx.chain.plm_hashes[vanilla.source_plm_index]
    zero_hash = f"zero-delta-{tuning_type}"
    labels = encoded_task(ctx, vanilla.task).task.labels
    spec = study.tuning.pet_spec(tuning_type)
    compute.seed_all(vanilla.seed)
    untouched = artifacts.adapted_classifier(store, source, len(labels), tuning_type, spec, vanilla.seed)
    artifacts.save_tuned(store, zero_hash, untouched, labels, {
        "tuning_type": tuning_type, "plm_hash": source, "task": vanilla.task, "seed": vanilla.seed,
        "labels": list(labels), "pet": spec})
    runs = {}
    for method in ("vanilla", "init"):
        cell = dataclasses.replace(vanilla, method=method, old_tuned_hash=zero_hash,
                                   cell_hash=f"zero-{method}-{tuning_type}")
        methods.run_method_cell(ctx, cell)
        runs[method] = sorted(results.read_cell(store, "methods_curves", cell.cell_hash), key=lambda r: r["step"])
        for table in ("methods_runs", "methods_curves"):
            os.remove(store.local / "results" / table / f"{cell.cell_hash}.parquet")
    store.remove_dir(f"artifacts/tuned/{zero_hash}")
    assert [r["dev_loss"] for r in runs["init"]] == [r["dev_loss"] for r in runs["vanilla"]]
    assert [r["train_loss"] for r in runs["init"]] == [r["train_loss"] for r in runs["vanilla"]]


def test_a_method_waits_for_its_reference_and_its_old_weights(micro_run, tmp_path):
    """The ready rule the driver launches by: in an empty store nothing is ready; with the PLM only the
    reference runs are; with the reference rows and the outdated model, every method but transfer_init, which
    also waits for its transfer row."""
    import shutil

    from raysys.storage.store import Store

    study, shared, _ = micro_run
    cells = methods.plan_methods(study, plan_chain(study))
    methods_stage = stage("methods")
    ready = lambda store: {c.method for c in cells if methods_stage.ready(c, View(store))}
    store = Store(tmp_path / "s")
    assert ready(store) == set()
    for plm in {c.target_plm_hash for c in cells}:
        shutil.copytree(shared.artifact("plm", plm), store.local / "artifacts" / "plm" / plm)
    assert ready(store) == {"vanilla"}
    for cell in cells:
        if cell.method == "vanilla":
            results.write_rows(store, "methods_runs", cell.cell_hash, results.read_cell(shared, "methods_runs",
                                                                                        cell.cell_hash))
    assert ready(store) == {"vanilla"}  # the outdated models are still missing
    for old in {c.old_tuned_hash for c in cells}:
        shutil.copytree(shared.artifact("tuned", old), store.local / "artifacts" / "tuned" / old)
    assert ready(store) == set(METHODS) - {"transfer_init"}
    for transfer_hash in {c.transfer_hash for c in cells if c.transfer_hash}:
        results.write_rows(store, "transfer", transfer_hash, results.read_cell(shared, "transfer", transfer_hash))
    assert ready(store) == set(METHODS)


def test_transferred_starts_without_their_transfer_rows_are_refused_before_any_trial(micro_run, tmp_path):
    import shutil

    from raysys.storage.store import Store

    study, shared, _ = micro_run
    store = Store(tmp_path / "copy")
    shutil.copytree(shared.local, store.local, ignore=shutil.ignore_patterns("ray", "report", "transfer"))
    for row in results.ok_rows(store, "methods_runs"):  # the transferred starts to run again
        if row["method"] == "transfer_init":
            (store.local / "results" / "methods_runs" / f"{row['cell_hash']}.parquet").unlink()
    before = results.read_table(store, "methods_runs").num_rows
    with pytest.raises(MissingInputError, match="transfer_init cells start from the transfer stage's rows.*run the "
                                                "'transfer' stage too, or set methods.transfer_starts=\\[\\]"):
        sweep.run_study(study, store, only=("methods",), log=lambda *_: None)
    assert results.read_table(store, "methods_runs").num_rows == before  # refused before any trial


def test_a_teacher_with_another_label_set_is_refused_before_any_trial(micro_run):
    study, store, _ = micro_run
    cell = next(c for c in methods.plan_methods(study, plan_chain(study)) if c.method == "distill")
    folder = store.artifact("tuned", cell.old_tuned_hash)
    original = (folder / "raysys.json").read_text()

    def recommit(meta: str) -> None:  # as if made with that label set: its manifest agrees with it
        (folder / "raysys.json").write_text(meta)
        (folder / manifest.MANIFEST).write_bytes(manifest.encode(manifest.describe(folder)))

    try:
        recommit(original.replace('"labels": [', '"labels": ["extra", '))
        with pytest.raises(WeightMismatchError, match="labels"):
            sweep.run_study(study, store, only=("methods",), log=lambda *_: None)
    finally:
        recommit(original)
    assert store.quarantined() == 0


def test_a_method_without_its_old_weights_is_refused_before_any_trial(micro_run, capsys):
    study, store, _ = micro_run
    other = dataclasses.replace(study, seeds=(99,))
    with pytest.raises(MissingInputError, match="tuning"):
        sweep.run_study(other, store, only=("methods",), log=lambda *_: None)
    code = sweep.main(["--storage", str(store.root), "--only", "methods", "--set", "seeds=[99]"]
                      + [f"--set={o}" for o in MICRO_OVERRIDES if not o.startswith("seeds")])
    assert code == 2 and "outdated tuned model" in capsys.readouterr().err

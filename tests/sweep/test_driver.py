"""The sweep end to end on a real Ray cluster: every stage as a Tune experiment, rows keyed by cell hash, reruns
that recompute nothing, failed cells recorded and retried."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raysys.config import TaskConfig, load_study
from raysys.core import world
from raysys.report.status import missing_cells
from raysys.stages.chain import control_indices, plan_chain, plan_pairs
from raysys.stages.data_check import check_data
from raysys.stages.registry import NAMES, stage
from raysys.storage import results
from raysys.storage.lease import Lease, LeaseHeld
from raysys.storage.store import Store
from raysys.storage.study import PROGRESS_FILE, STUDY_FILE
from raysys.sweep import driver as sweep
from tests.conftest import MICRO_OVERRIDES


def test_every_stage_writes_its_rows(micro_run):
    study, store, ran = micro_run
    chain = plan_chain(study)
    n_plms, n_tasks, n_seeds, n_types, n_alphas = len(study.corpora), len(study.tasks), len(study.seeds), 3, 3
    grid = n_tasks * n_seeds * n_types
    assert study.tuning.types == ("finetune", "lora", "adapter")
    assert len(chain.links) == n_plms + study.control_length
    controls = len(control_indices(study))
    tuning = results.ok_rows(store, "tuning_runs")
    assert ran["tuning"]["ran"] == len(tuning) == (n_plms + controls) * grid
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["best_step"] in (4, 8, 12) for r in tuning)
    pet = [r for r in tuning if r["tuning_type"] != "finetune"]
    assert all(r["num_trainable_parameters"] < r["num_parameters"] / 4 for r in pet)
    curves = results.read_table(store, "tuning_curves").to_pylist()
    assert len(curves) == len(tuning) * 3  # evaluations at steps 4, 8, 12
    later_pairs = n_plms * (n_plms - 1) // 2
    assert len(results.ok_rows(store, "compatibility")) == later_pairs * grid
    baselines = results.ok_rows(store, "baselines")
    assert len(baselines) == 2 * n_plms * n_tasks * n_seeds
    pairs = plan_pairs(study, chain)
    kinds = {p.pair_kind for p in pairs}
    assert kinds == {"continual", "control"}
    interp = results.ok_rows(store, "interpolation")
    assert len(interp) == len(pairs) * n_alphas
    assert len({r["cell_hash"] for r in interp}) == len(interp)
    assert len(results.ok_rows(store, "interpolation_paths")) == 2 * len(pairs)
    heads = results.ok_rows(store, "head_similarity")
    assert len(heads) == len(pairs) * study.model.num_layers * study.model.num_heads
    assert len(results.ok_rows(store, "distances")) == sum(3 if p.tuning_type == "finetune" else 4 for p in pairs)
    assert list(ran) == list(NAMES) and ran["search"] == {"cells": 0, "finished_before": 0, "ran": 0, "blocked": 0, "given_up": 0,
                                                          "seconds": 0.0}
    assert ran["interpolation"]["ran"] == len(pairs) * (n_alphas + 1)  # the points and each path's summary


def test_rerun_recomputes_nothing(micro_run):
    study, store, _ = micro_run
    artifacts = sorted(store.local.joinpath("artifacts").rglob("model.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in artifacts]
    counts = {t: results.read_table(store, t).num_rows for t in results.SCHEMAS}
    launches = []  # the driver starts Ray there when it did not before: a run with nothing to do never needs it
    ran = sweep.run_study(study, store, log=lambda *_: None, before_launch=lambda: launches.append(1))
    assert all(counts["ran"] == 0 and counts["blocked"] == 0 for counts in ran.values()), ran
    assert launches == []
    assert [p.stat().st_mtime_ns for p in artifacts] == mtimes
    assert {t: results.read_table(store, t).num_rows for t in results.SCHEMAS} == counts


def test_a_rerun_with_nothing_to_do_starts_no_ray_and_still_refuses_what_no_node_holds(micro_run, tmp_path):
    """The driver as the user runs it, on a finished storage: no Ray is started (its start is most of such a run),
    the tables and report are as before, and a demand this machine cannot hold is still refused."""
    _, shared, _ = micro_run
    store = Store(tmp_path / "copy")
    shutil.copytree(shared.root, store.root)
    counts = {t: results.read_table(store, t).num_rows for t in results.SCHEMAS}
    script = Path(__file__).resolve().parents[2] / "sweeps" / "full_paper.py"
    command = [sys.executable, str(script), "--preset", "tiny", "--storage", str(store.root),
               *[a for o in MICRO_OVERRIDES for a in ("--set", o)]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the tests' Ray: a new one would start
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "every planned cell is done: nothing to run, so Ray is not started" in rerun.stdout
    assert "running on" not in rerun.stdout and "report: " in rerun.stdout
    assert {t: results.read_table(store, t).num_rows for t in results.SCHEMAS} == counts
    too_big = subprocess.run([*command, "--set", "tuning.cpus_per_trial=64"], capture_output=True, text=True,
                             timeout=300, check=False, env=env)
    assert too_big.returncode == 2 and too_big.stderr.startswith("error: ") and "tuning.cpus_per_trial" in too_big.stderr


def _write_task(root, name, rows_by_split):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_spoiled_plm_waits_set_aside_and_only_its_cells_run_once_it_is_whole(micro_run, tmp_path):
    """A PLM whose weights get a flipped bit after the data check (its sizes still agree) is caught by its checksum
    before any trial and set aside: every tuning cell on it waits (its PLM is missing) and the sweep goes on (the
    cells on the sound PLM succeed); once the PLM is put back whole, a rerun runs exactly the cells that waited."""
    study, store, _ = micro_run
    _write_task(tmp_path, "d1_copy", world.task_splits(world.build_world(study.world), "d1"))
    extra = TaskConfig(name="d1_copy", domain="d1", source="jsonl", path=str(tmp_path))
    study2 = check_data(dataclasses.replace(study, tasks=study.tasks + (extra,), tune_plms=(2, 3),
                                            methods=dataclasses.replace(study.methods, sources=(2,))), ("tuning",))
    plm = plan_chain(study).plm_hashes[3]
    home = store.artifact("plm", plm)
    sound = (home / "model.safetensors").read_bytes()
    (home / "model.safetensors").write_bytes(sound[:100] + bytes([sound[100] ^ 1]) + sound[101:])
    launches = []
    try:
        ran = sweep.run_study(study2, store, only=("tuning",), log=lambda *_: None,
                              before_launch=lambda: launches.append(1))
        assert launches and store.quarantined() == 1 and not store.has_artifact("plm", plm)
    finally:  # put the shared study's PLM back where it was, whole
        aside = [p for p in (store.local / "quarantine").glob(f"artifacts__plm__{plm}-*") if p.is_dir()]
        target = aside[0] if aside else home
        (target / "model.safetensors").write_bytes(sound)
        if aside:
            os.replace(target, home)
            shutil.rmtree(store.local / "quarantine")
    per_plm = len(study.seeds) * len(study.tuning.types)
    assert ran["tuning"]["ran"] == per_plm and ran["tuning"]["blocked"] == per_plm
    rows = [r for r in results.read_table(store, "tuning_runs").to_pylist() if r["task"] == "d1_copy"]
    assert len(rows) == per_plm and all(r["plm_index"] == 2 and r["status"] == "ok" for r in rows)
    assert missing_cells(study2, store)["tuning"] == per_plm  # the cells that waited

    ran = sweep.run_study(study2, store, only=("tuning",), log=lambda *_: None)
    assert ran["tuning"]["ran"] == per_plm
    assert missing_cells(study2, store)["tuning"] == 0
    assert all(r["status"] == "ok" for r in results.read_table(store, "tuning_runs").to_pylist())


def test_cli_rejects_bad_input_before_starting_anything(tmp_path, capsys):
    storage = tmp_path / "never"
    assert sweep.main(["--storage", str(storage), "--set", "tuning.lr=-1"]) == 2
    assert "tuning.lr" in capsys.readouterr().err
    assert sweep.main(["--storage", str(storage), "--preset", "nope"]) == 2
    assert sweep.main(["--storage", "nosuch://bucket/x"]) == 2
    assert "--storage 'nosuch://bucket/x'" in capsys.readouterr().err
    assert not storage.exists()


def test_every_preset_builds_and_plans():
    from tests.test_identity import paper_with_fixed_data

    for study in (load_study("tiny"), paper_with_fixed_data()):
        chain = plan_chain(study)
        assert len(set(chain.plm_hashes)) == len(study.corpora)
        assert len({link.plm_hash for link in chain.links}) == len(chain.links)
        cells = stage("tuning").plan(study, chain)
        main = [c for c in cells if c.chain == "main"]
        assert len(main) == len(study.plms_to_tune) * len(study.tasks) * len(study.seeds) * len(study.tuning.types)


def test_micro_overrides_change_identity_but_resources_do_not():
    base = plan_chain(load_study("tiny", MICRO_OVERRIDES))
    assert plan_chain(load_study("tiny", MICRO_OVERRIDES + ["pretrain.num_workers=1"])) == base
    assert plan_chain(load_study("tiny", MICRO_OVERRIDES + ["pretrain.lr=0.002"])) != base
    assert Path(Store("/tmp/x").root).is_absolute()


def test_fresh_moves_the_old_storage_aside_holding_its_lease(tmp_path):
    store = Store(tmp_path / "s")
    (store.local / "results").mkdir(parents=True)
    (store.local / "results" / "x").write_text("keep me")
    (store.local / "study.json").write_text("{}")
    messages = []
    lease = sweep.take_storage(store, fresh=True, log=messages.append)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("s.old-")]
    assert (aside / "results" / "x").read_text() == "keep me" and not (aside / ".raysys-lease").exists()
    assert messages == [f"raysys: --fresh: moved the old storage to {aside}"]
    assert sorted(p.name for p in store.local.iterdir()) == [".raysys-lease"]  # the new, empty storage, held
    lease.release()
    assert list(store.local.iterdir()) == []
    assert sweep.fresh_start(Store(tmp_path / "none"), lease) is None


def test_fresh_refuses_a_folder_that_is_no_raysys_storage_and_moves_nothing(tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("years of work")
    with pytest.raises(ValueError, match="holds no study.json, so it is no raysys storage"):
        sweep.take_storage(Store(tmp_path / "thesis"), fresh=True)
    assert sorted(p.name for p in (tmp_path / "thesis").iterdir()) == ["chapter1.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


def test_fresh_refuses_a_storage_another_driver_holds(tmp_path):
    store = Store(tmp_path / "s")
    (store.local / "results").mkdir(parents=True)
    (store.local / "study.json").write_text("{}")
    other = Lease(store).acquire()  # another driver: alive, renewing
    before = sorted(p.name for p in store.local.iterdir())
    with pytest.raises(LeaseHeld, match=rf"in use by another driver: .*\(pid {os.getpid()}\)"):
        sweep.take_storage(store, fresh=True)
    assert sorted(p.name for p in store.local.iterdir()) == before and not list(tmp_path.glob("s.old-*"))
    other.release()


def test_progress_file_records_the_last_stage(micro_run):
    _, store, _ = micro_run
    state = json.loads((store.local / PROGRESS_FILE).read_text())
    assert state["final"] and state["done"] == state["total"] > 0 and state["failed"] == 0


S3_OVERRIDES = MICRO_OVERRIDES + ["pilot.control_length=0", 'tuning.types=["finetune"]',
                                  'methods.regimes=["full"]', 'methods.tasks=["d1_rel"]',
                                  "tuning.checkpoint_every_seconds=0", "methods.transfer_starts=[]"]


def test_a_sweep_on_s3_keeps_everything_in_the_bucket_and_reruns_as_a_no_op(ray_cluster, s3_uri, capsys):
    """Pre-training (Ray Train), tuning and the methods (Ray Tune) with `--storage s3://…`: every artifact, row,
    checkpoint, Ray file and the report go to the bucket; workers read PLMs, tuned models and teachers back
    through the store; a second run finds everything done."""
    import pyarrow.fs as pafs

    from raysys import cli

    uri = s3_uri("sweep")
    argv = ["--storage", uri, "--only", "pretrain", "tuning", "methods"] + [
        a for o in S3_OVERRIDES for a in ("--set", o)]
    assert sweep.main(argv) == 0
    store = Store(uri)
    assert store.remote
    runs = results.read_table(store, "tuning_runs").to_pylist()
    assert len(runs) == 4 * 3 and {r["status"] for r in runs} == {"ok"}
    assert {r["resumed_from_step"] for r in runs} == {None}
    methods_runs = results.read_table(store, "methods_runs").to_pylist()
    assert len(methods_runs) == 4 and {r["status"] for r in methods_runs} == {"ok"}
    assert len(store.list_dirs("artifacts/plm")) == 4 and len(store.list_dirs("artifacts/tuned")) == 12
    assert store.list_dirs("artifacts/teacher")  # the distilling methods' teacher outputs, shared via the bucket
    assert store.list_dirs("checkpoints") == []  # every evaluation checkpointed (every 0 s), all removed when done

    fs, base = pafs.FileSystem.from_uri(uri)
    names = [i.path[len(base) + 1:] for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))]
    assert any(re.match(r"ray/tune/tuning-[^/]+/[^/]+/events\.out\.tfevents\.", n) for n in names)
    assert any(n.startswith("ray/train/pretrain-") for n in names)
    assert not [n for n in names if "checkpoint_" in n]  # checkpoints live once, in the store, and went when done
    assert "report/report.md" in names and any(re.match(r"report/figures/.+\.png$", n) for n in names)
    assert "study.json" in names and "progress.json" in names
    out = capsys.readouterr().out
    assert f"report: {store.uri('report')}/report.md" in out

    started = sorted(r["started_at"] for r in runs)
    assert sweep.main(argv) == 0
    capsys.readouterr()
    assert sorted(r["started_at"] for r in results.read_table(store, "tuning_runs").to_pylist()) == started
    assert len(results.read_table(store, "methods_runs")) == 4
    assert cli.main(["status", uri]) == 0
    status = capsys.readouterr().out
    assert re.search(r"^tuning\s+12\s+12\s+0\s+0\s+complete$", status, re.MULTILINE)
    assert cli.main(["results", uri, "methods_runs", "--columns", "method,status", "--limit", "1"]) == 0
    assert "(4 rows)" in capsys.readouterr().out


def _real_data_preset(root: Path) -> Path:
    """Your own study as a preset file over local data: a chain of three corpora given as text, jsonl and Parquet
    shards, and two tasks in the official layout (`<dir>/<task>/{train,dev,test}.jsonl|.parquet`)."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    vocab = {d: [f"{d}w{i}" for i in range(40)] + ["the", "of", "and", "is"] for d in ("gen", "bio", "rev")}
    sentence = lambda d: " ".join(rng.choice(vocab[d]) for _ in range(12))
    for shard in range(2):
        path = root / "corpora" / "gen" / f"part-{shard}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(sentence("gen") + "\n" for _ in range(400)))
        path = root / "corpora" / "bio" / f"part-{shard}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"body": sentence("bio")}) + "\n" for _ in range(400)))
        path = root / "corpora" / "rev" / f"part-{shard}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": [sentence("rev") for _ in range(400)]}), path)
    label = lambda text: "even" if sum(int(w[4:]) for w in text.split() if w[4:].isdigit()) % 2 == 0 else "odd"
    for task, domain, ext in (("chem", "bio", "jsonl"), ("help", "rev", "parquet")):
        (root / "tasks" / task).mkdir(parents=True)
        for split, n in (("train", 48), ("dev", 24), ("test", 24)):
            rows = [{"text": t, "label": label(t)} for t in (sentence(domain) for _ in range(n))]
            path = root / "tasks" / task / f"{split}.{ext}"
            if ext == "jsonl":
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            else:
                pq.write_table(pa.Table.from_pylist(rows), path)
    tiny = (Path(__file__).resolve().parents[2] / "raysys" / "presets" / "tiny.toml").read_text()
    tiny = re.sub(r"\[\[(corpora|tasks)\]\]\n(?:[^\[\n].*\n)*", "", tiny)
    tiny = tiny.replace('name = "tiny"', 'name = "mine"')
    # paths relative to the study file, as a user writes them
    corpora = "".join(f'[[corpora]]\nname = "{n}"\nsource = "{src}"\npath = "corpora/{n}/*.{ext}"\n' + extra
                      for n, src, ext, extra in (("gen", "text", "txt", ""), ("bio", "jsonl", "jsonl",
                                                 'text_field = "body"\n'), ("rev", "parquet", "parquet", "")))
    tasks = "".join(f'[[tasks]]\nname = "{t}"\ndomain = "{d}"\nsource = "{src}"\npath = "tasks"\n'
                    for t, d, src in (("chem", "bio", "jsonl"), ("help", "rev", "parquet")))
    preset = root / "mine.toml"
    preset.write_text(tiny + "\n" + corpora + tasks)
    return preset


def test_a_user_preset_runs_the_chain_on_local_corpora_and_tasks(ray_cluster, tmp_path, monkeypatch):
    """A study file with paths relative to itself, run from another working directory through Ray; then the data
    folder moved (every artifact reused) and one task file edited (exactly that task's cells run again)."""
    preset = _real_data_preset(tmp_path / "data")
    overrides = ["pretrain.initial_steps=10", "pretrain.continual_steps=10", "pretrain.batch_size=16",
                 "pretrain.log_every_steps=5", "pretrain.num_workers=1", "pretrain.cpus_per_worker=1",
                 "tuning.max_steps=12", "tuning.eval_every_steps=4", 'tuning.types=["finetune"]', "seeds=[20]",
                 "pilot.control_length=0", 'methods.tasks=["chem"]', 'methods.training_free.tasks=["chem"]']
    store = Store(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    argv = ["--preset", str(preset), "--storage", store.root, "--only", "pretrain", "tuning"]
    assert sweep.main(argv + [a for o in overrides for a in ("--set", o)]) == 0
    links = results.read_table(store, "pretrain_runs").to_pylist()
    assert sorted((r["link"], r["domain"], r["status"]) for r in links) == [
        (0, "gen", "ok"), (1, "bio", "ok"), (2, "rev", "ok")]
    runs = results.read_table(store, "tuning_runs").to_pylist()
    assert sorted((r["plm_index"], r["task"], r["task_domain"]) for r in runs) == [
        (i, t, d) for i in range(3) for t, d in (("chem", "bio"), ("help", "rev"))]
    assert {(r["status"], r["num_labels"], r["num_train"]) for r in runs} == {("ok", 2, 48)}
    saved = json.loads(store.read_bytes(STUDY_FILE))
    assert saved["name"] == "mine" and saved["tasks"][0]["path"] == str(tmp_path / "data" / "tasks")
    assert all(c["fingerprint"].startswith("files:") for c in saved["corpora"])

    moved = tmp_path / "moved-data"
    (tmp_path / "data").rename(moved)
    run = lambda: sweep.run_study(load_study(str(moved / "mine.toml"), overrides), store, only=("pretrain", "tuning"),
                                  log=lambda *_: None)
    ran = run()
    assert (ran["pretrain"]["ran"], ran["tuning"]["ran"]) == (0, 0)
    assert (ran["pretrain"]["finished_before"], ran["tuning"]["finished_before"]) == (3, 6)

    dev = moved / "tasks" / "chem" / "dev.jsonl"
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    rows[0]["label"] = "odd" if rows[0]["label"] == "even" else "even"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ran = run()
    assert (ran["pretrain"]["ran"], ran["tuning"]["ran"], ran["tuning"]["finished_before"]) == (0, 3, 3)
    runs = results.read_table(store, "tuning_runs").to_pylist()
    assert sorted((r["task"], r["plm_index"]) for r in runs) == sorted(
        [("chem", i) for i in range(3)] * 2 + [("help", i) for i in range(3)])


TWO_NODES = r'''
import json, subprocess, sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024**2})
cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
cluster.wait_for_nodes()
nodes = [n.node_id for n in cluster.list_all_nodes()]
try:
    driver = subprocess.run([sys.executable, sys.argv[1], "--address", cluster.address, *sys.argv[2:]],
                            capture_output=True, text=True, timeout=540)
finally:
    cluster.shutdown()
print(json.dumps({"nodes": nodes, "rc": driver.returncode, "stdout": driver.stdout, "stderr": driver.stderr[-3000:]}))
'''


def test_a_reduced_sweep_spreads_over_two_nodes_sharing_local_storage(tmp_path):
    """A head and a second node (ray.cluster_utils.Cluster, one CPU each, in their own processes) and one storage
    folder both see. Pre-training's two DDP workers need a CPU each, so they run one per node (each accumulating
    micro-batches of 4 of its 8 sequences); every other stage's cells are placed by Ray across both, and each row
    records the node that ran it."""
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODES)
    storage = tmp_path / "store"
    overrides = [*MICRO_OVERRIDES, "pilot.control_length=0", "tune_plms=[0,1]", 'tuning.types=["finetune"]',
                 "pretrain.micro_batch_size=4",
                 'methods.tasks=["d1_rel"]', "methods.regimes=[\"full\"]", "methods.training_free.enabled=false"]
    args = [str(Path(__file__).resolve().parents[2] / "sweeps" / "full_paper.py"), "--preset", "tiny",
            "--storage", str(storage), *[a for o in overrides for a in ("--set", o)]]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, report["stdout"][-3000:] + report["stderr"]
    assert "running on the cluster at" in report["stdout"], report["stdout"][:2000]
    nodes = set(report["nodes"])
    assert len(nodes) == 2
    store = Store(storage)
    pretrain = results.ok_rows(store, "pretrain_runs")
    assert len(pretrain) == 4 and all(r["num_workers"] == 2 for r in pretrain)  # M0..M3, DDP across the nodes
    ran_on = {}
    for table in ("tuning_runs", "compatibility", "baselines", "interpolation", "head_similarity", "methods_runs"):
        rows = results.read_table(store, table).to_pylist()
        assert rows and all(r["status"] == "ok" for r in rows), table
        ran_on[table] = {r["node_id"] for r in rows}
        assert ran_on[table] <= nodes, table
    assert len(results.ok_rows(store, "tuning_runs")) == 2 * 3  # M0, M1 x 3 tasks x 1 seed
    everywhere = set().union(*ran_on.values())
    assert everywhere == nodes, ran_on  # both nodes ran cells
    assert len(ran_on["tuning_runs"]) == 2, ran_on  # two concurrent trials of one CPU each: one per node


def test_dry_run_names_every_data_problem_before_ray_starts(tmp_path, capsys, monkeypatch):
    """A missing corpus file, a malformed jsonl line and an unknown dev label: exit 2 naming each, no Ray, no
    storage."""
    preset = _real_data_preset(tmp_path / "data")
    for part in (tmp_path / "data" / "corpora" / "bio").glob("*.jsonl"):
        part.unlink()
    with (tmp_path / "data" / "tasks" / "chem" / "train.jsonl").open("a") as f:
        f.write('{"text": "half a record"\n')
    help_dev = tmp_path / "data" / "tasks" / "help" / "dev.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": "even"}, {"text": "b", "label": "maybe"}]), help_dev)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "init_ray", lambda *a, **k: pytest.fail("Ray was started before the data check"))
    storage = tmp_path / "never"
    argv = ["--preset", str(preset), "--storage", str(storage), "--dry-run", "--set", 'methods.tasks=["chem"]',
            "--set", 'methods.training_free.tasks=["chem"]']
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"corpus bio: no files match '.*/data/corpora/bio/\*\.jsonl'", err), err
    assert re.search(r"tasks/chem/train\.jsonl:49: invalid JSON", err), err
    assert "task help/dev: labels ['maybe'] not in the training labels ['even', 'odd']" in err
    assert not storage.exists()


def test_a_start_with_a_changed_study_says_what_changed(tmp_path):
    """The README's `--set tuning.lr=...` into an existing storage: a new version of its study, announced."""
    store, lines = Store(tmp_path), []
    for overrides in ([], ["tuning.lr=5e-4"], ["tuning.lr=5e-4"]):
        sweep.run_study(load_study("tiny", overrides), store, only=(), log=lines.append)
    assert len(lines) == 1 and "changed from version 1" in lines[0] and "to new version 2" in lines[0]
    assert "tuning.lr: 0.001 -> 0.0005" in lines[0] and "--version 1" in lines[0]


def test_taking_a_storage_removes_what_writers_killed_mid_write_left_and_nothing_else(tmp_path):
    store = Store(tmp_path / "s")
    left = ["results/tuning_runs/.tmp-abc.parquet-1234abcd", "artifacts/plm/.tmp-h-1234abcd/model.safetensors",
            "checkpoints/cell/.tmp-step-000000008-1234abcd/state.json", ".tmp-study.json-1234abcd",
            "studies/.tmp-1-abc.json-1234abcd"]
    kept = ["results/tuning_runs/abc.parquet", "artifacts/plm/h/model.safetensors", "ray/tune/.tmp-ray-own",
            "study.json"]
    for rel in left + kept:
        (store.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (store.local / rel).write_text("x")
    messages = []
    sweep.take_storage(store, fresh=False, log=messages.append).release()
    assert messages == ["raysys: removed 5 temporary files and folders an interrupted run left"]
    assert sorted(str(p.relative_to(store.local)) for p in store.local.rglob("*") if p.is_file()) == sorted(kept)

"""Stage `pretrain` on a real Ray Train job (the micro study's, two DDP workers) and the chains it walks."""

import pytest
import torch
from safetensors.torch import load_file

from raysys.config import load_study
from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.storage import results


def test_chain_runs_on_ray_train_with_two_workers(micro_run):
    study, store, ran = micro_run
    assert study.pretrain.num_workers == 2
    chain = plan_chain(study)
    assert ran["pretrain"]["ran"] == len(study.corpora) + study.control_length == 7
    runs = {r["cell_hash"]: r for r in results.read_table(store, "pretrain_runs").to_pylist()}
    assert set(runs) == {link.plm_hash for link in chain.links}
    for link in chain.links:
        row = runs[link.plm_hash]
        assert row["status"] == "ok" and (row["chain"], row["link"]) == (link.chain, link.index)
        assert row["num_workers"] == 2 and row["parent_hash"] == link.parent
        assert (store.artifact("plm", link.plm_hash) / "model.safetensors").is_file()
        assert (store.artifact("plm", link.plm_hash) / "tokenizer.json").is_file()
    assert runs[chain.hashes("control")[0]]["init"] == f"scratch:seed={study.pilot.control_seed}"
    curves = results.read_table(store, "pretrain_curves").to_pylist()
    m1 = sorted((r for r in curves if r["link"] == 1 and r["chain"] == "main"), key=lambda r: r["step"])
    assert [r["step"] for r in m1] == [5, 10] and all(r["loss"] > 0 for r in m1)
    # each link continues from its parent: weights differ, architecture identical
    w0 = load_file(str(store.artifact("plm", chain.plm_hashes[0]) / "model.safetensors"))
    w1 = load_file(str(store.artifact("plm", chain.plm_hashes[1]) / "model.safetensors"))
    c0 = load_file(str(store.artifact("plm", chain.hashes("control")[0]) / "model.safetensors"))
    assert w0.keys() == w1.keys() == c0.keys()
    key = "roberta.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(w0[key], w1[key])
    assert not torch.equal(w0[key], c0[key])  # the control chain has another origin


def test_one_job_walks_every_link_parents_first():
    study = load_study("tiny")
    links = stage("pretrain").plan(study, plan_chain(study))
    (group,) = stage("pretrain").groups(links)
    assert group == links and [(link.chain, link.index) for link in group] == [
        ("main", 0), ("main", 1), ("main", 2), ("main", 3), ("control", 0), ("control", 1)]
    position = {link.plm_hash: i for i, link in enumerate(group)}
    assert all(position[link.parent] < position[link.plm_hash] for link in group if link.parent)
    assert stage("pretrain").groups([]) == []


def test_control_chain_shares_nothing_but_the_recipe():
    study = load_study("tiny", ["pilot.control_length=3"])
    chain = plan_chain(study)
    main, control = chain.hashes("main"), chain.hashes("control")
    assert len(main) == 4 and len(control) == study.control_length == 3
    assert not set(main) & set(control)
    assert [chain.link(h).parent for h in control] == [None, control[0], control[1]]
    off = load_study("tiny", ["pilot.control_length=0"])
    assert plan_chain(off).hashes("control") == () and plan_chain(off).plm_hashes == main


def test_each_link_trains_from_its_own_packed_corpus(micro_run):
    """Every trained link's corpus was packed once into the store; the packed sequences are the in-memory ones."""
    from raysys.core import data, masked_lm_loop, packing
    from raysys.stages.pretrain import packed_key
    from raysys.storage import artifacts

    study, store, _ = micro_run
    chain = plan_chain(study)
    keys = {packed_key(study, chain.tokenizer_hash, i) for i in range(len(study.corpora))}
    assert set(store.list_dirs("artifacts/corpus")) == keys  # one per corpus, shared by both chains
    tokenizer = artifacts.load_tokenizer(store, chain.tokenizer_hash)
    packed = packing.PackedCorpus(store.artifact("corpus", packed_key(study, chain.tokenizer_hash, 1)))
    expected = masked_lm_loop.pack_corpus(data.load_corpus(study.corpora[1], study.world), tokenizer,
                                          study.pretrain.sequence_length)
    assert len(packed) == len(expected) and packed[0] == expected[0] and packed[len(packed) - 1] == expected[-1]


def test_a_failing_link_leaves_its_error_in_a_row_and_in_status(ray_cluster, tmp_path, capsys):
    """Pre-training that diverges: the link's row carries the worker's own error (not Ray's wrapping), the links
    after it say why they did not run, and `raysys status` and `raysys failures` show both."""
    from raysys.report.status import status_text
    from raysys.storage.store import Store
    from raysys.sweep.driver import run_study

    study = load_study("tiny", ["world.general_sentences=500", "world.domain_sentences=500", "pilot.control_length=0",
                                "pretrain.initial_steps=4", "pretrain.continual_steps=4", "pretrain.batch_size=8",
                                "pretrain.num_workers=1", "pretrain.cpus_per_worker=1", "pretrain.lr=1e30",
                                "pretrain.log_every_steps=2"])
    store = Store(tmp_path / "diverged")
    ran = run_study(study, store, only=("pretrain",), log=lambda *_: None)
    assert ran["pretrain"]["ran"] == len(study.corpora)
    rows = sorted(results.read_table(store, "pretrain_runs").to_pylist(), key=lambda r: r["link"])
    assert [r["status"] for r in rows] == ["failed"] * len(study.corpora)
    assert rows[0]["error"].startswith("FloatingPointError: masked-LM loss became non-finite\n")
    assert all(r["error"] == f"not run: the job stopped at {rows[0]['cell_hash']}, which failed" for r in rows[1:])
    text = status_text(store)
    assert "1 x FloatingPointError: masked-LM loss became non-finite" in text
    assert f"{len(study.corpora) - 1} x not run: the job stopped at" in text
    assert text.endswith(f"{len(study.corpora)} cells failed (their errors above); a rerun retries them")
    from raysys import cli

    assert cli.main(["status", str(store.root)]) == 1  # failed cells: a watching script learns it from the exit
    capsys.readouterr()
    assert cli.main(["failures", str(store.root)]) == 1
    listed = capsys.readouterr().out
    assert f"pretrain / pretrain_runs {rows[0]['cell_hash']}: try 1, " in listed
    assert "    FloatingPointError: masked-LM loss became non-finite" in listed
    assert listed.rstrip().endswith(f"{len(study.corpora)} failed cells; a rerun of the sweep retries them")


def test_a_worker_resource_no_node_offers_is_refused_before_the_job_waits_for_it(ray_cluster, tmp_path):
    """`pretrain.worker_resource` pins the DDP workers to the node type that offers it; where nothing offers it
    (this session's one-node Ray, no autoscaler) the stage is refused at once instead of pending forever."""
    from raysys.stages.base import Resources
    from raysys.storage.store import Store
    from raysys.sweep.cluster import ClusterError
    from raysys.sweep.driver import run_study
    from raysys.sweep.launchers import worker_resources

    assert worker_resources(Resources(4.0, 1.0, 8, "pretrain_gpu")) == {"CPU": 4.0, "pretrain_gpu": 1}
    assert worker_resources(Resources(2.0, 0.0, 2)) == {"CPU": 2.0}
    study = load_study("tiny", ["world.general_sentences=500", "world.domain_sentences=500", "pilot.control_length=0",
                                "pretrain.worker_resource=pretrain_gpu"])
    assert study.pretrain.worker_resource == "pretrain_gpu"
    store = Store(tmp_path / "pinned")
    with pytest.raises(ClusterError, match=r"pretrain.worker_resource = 'pretrain_gpu': no node of this cluster "
                                           r"offers the resource 'pretrain_gpu'"):
        run_study(study, store, only=("pretrain",), log=lambda *_: None)
    assert results.read_table(store, "pretrain_runs").num_rows == 0


def test_a_link_trained_by_a_later_job_equals_the_one_trained_after_its_parent(micro_run, tmp_path):
    """A job that stopped between two links (a preemption between M2 and M3): the next job trains M3 in fresh
    processes, its dropout streams continued from those kept with M2, so it is M3 of one uninterrupted job, byte
    for byte — and the links it finds done are not trained again."""
    import shutil

    from raysys.storage.store import Store
    from raysys.sweep.driver import run_study

    study, whole, _ = micro_run
    last = plan_chain(study).plm_hashes[-1]
    store = Store(tmp_path / "stopped")
    for kind in ("tokenizer", "corpus", "plm"):
        shutil.copytree(whole.local / "artifacts" / kind, store.local / "artifacts" / kind)
    shutil.rmtree(store.local / "artifacts" / "plm" / last)
    (store.local / "results").mkdir()
    shutil.copytree(whole.local / "results" / "pretrain_runs", store.local / "results" / "pretrain_runs",
                    ignore=shutil.ignore_patterns(f"{last}*"))
    ran = run_study(study, store, only=("pretrain",), log=lambda *_: None)
    assert ran["pretrain"]["ran"] == 1  # M3 alone
    weights = [(s.artifact("plm", last) / "model.safetensors").read_bytes() for s in (whole, store)]
    assert weights[0] == weights[1]

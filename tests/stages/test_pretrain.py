"""Stage `pretrain` on a real Ray Train job (the micro study's, two DDP workers) and the chains it walks."""

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

"""Masked-LM pre-training: the plain loop, and the chain as a Ray Train job with two DDP workers (gloo)."""

import torch
from safetensors.torch import load_file

from raysys import models, pretrain, results, world
from raysys.config import PretrainConfig, WorldConfig, load_study
from raysys.stages import plan_chain
from raysys.store import Store


def _tiny_setup():
    w = world.build_world(WorldConfig(general_sentences=2000, domain_sentences=2000))
    tokenizer = models.train_tokenizer(world.general_corpus(w), 512)
    sequences = pretrain.pack_corpus(world.domain_corpus(w, "d1"), tokenizer, 16)
    return w, tokenizer, sequences


def test_masked_lm_loop_lowers_the_loss_and_logs_every_interval():
    _, tokenizer, sequences = _tiny_setup()
    study = load_study("tiny")
    model = models.new_masked_lm(study.model, tokenizer, seed=0)
    before = pretrain.masked_lm_loss(model, sequences[:256], tokenizer, 0.15)
    cfg = PretrainConfig(batch_size=32, log_every_steps=10)
    curve = pretrain.train_masked_lm(model, sequences, tokenizer, cfg, pretrain.LinkPlan(60, 2e-3))
    after = pretrain.masked_lm_loss(model, sequences[:256], tokenizer, 0.15)
    assert [row["step"] for row in curve] == [10, 20, 30, 40, 50, 60]
    assert after < before - 1.0, (before, after)
    assert curve[-1]["tokens"] > 60 * 32 * 4


def test_a_link_resumed_from_its_checkpoint_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    from raysys.checkpoint import Checkpointer

    _, tokenizer, sequences = _tiny_setup()
    study = load_study("tiny")
    cfg, plan = PretrainConfig(batch_size=16, log_every_steps=5), pretrain.LinkPlan(20, 2e-3)
    torch.manual_seed(0)
    reference = models.new_masked_lm(study.model, tokenizer, seed=0)
    reference_curve = pretrain.train_masked_lm(reference, sequences, tokenizer, cfg, plan)

    class Killed(Exception):
        pass

    def kill_after_step_10(metrics, path):
        if metrics["step"] == 10:
            raise Killed

    torch.manual_seed(0)
    first = Checkpointer(Store(tmp_path), 0, "link", on_save=kill_after_step_10)
    try:
        pretrain.train_masked_lm(models.new_masked_lm(study.model, tokenizer, seed=0), sequences, tokenizer, cfg, plan,
                                 checkpointer=first)
    except Killed:
        pass
    assert first.saves == 2  # steps 5 and 10; the last step is never checkpointed (the PLM itself is saved)
    torch.manual_seed(123)
    resumed = models.new_masked_lm(study.model, tokenizer, seed=5)
    curve = pretrain.train_masked_lm(resumed, sequences, tokenizer, cfg, plan,
                                     checkpointer=Checkpointer(Store(tmp_path), 3600, "link"))
    assert [r["step"] for r in curve] == [5, 10, 15, 20]
    assert [r["loss"] for r in curve] == [r["loss"] for r in reference_curve]
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_sample_batch_shards_disjointly_across_workers():
    sequences = [[i] for i in range(100)]
    a = pretrain.sample_batch(sequences, 3, 8, rank=0, world_size=2, seed=1)
    b = pretrain.sample_batch(sequences, 3, 8, rank=1, world_size=2, seed=1)
    assert not {x[0] for x in a} & {x[0] for x in b}
    assert a == pretrain.sample_batch(sequences, 3, 8, rank=0, world_size=2, seed=1)


def test_chain_runs_on_ray_train_with_two_workers(micro_run):
    study, store, ran = micro_run
    assert study.pretrain.num_workers == 2
    chain = plan_chain(study)
    assert ran["pretrain"]["ran"] == len(study.corpora) + study.control_length == 7
    runs = {r["cell_hash"]: r for r in results.read_table(store, "pretrain_runs").to_pylist()}
    assert set(runs) == {link.hash for link in chain.links}
    for link in chain.links:
        row = runs[link.hash]
        assert row["status"] == "ok" and (row["chain"], row["link"]) == (link.chain, link.index)
        assert row["num_workers"] == 2 and row["parent_hash"] == link.parent
        assert (store.artifact("plm", link.hash) / "model.safetensors").is_file()
        assert (store.artifact("plm", link.hash) / "tokenizer.json").is_file()
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


def test_control_chain_shares_nothing_but_the_recipe():
    study = load_study("tiny", ["pilot.control_length=3"])
    chain = plan_chain(study)
    main, control = chain.hashes("main"), chain.hashes("control")
    assert len(main) == 4 and len(control) == study.control_length == 3
    assert not set(main) & set(control)
    assert [chain.link(h).parent for h in control] == [None, control[0], control[1]]
    off = load_study("tiny", ["pilot.control_length=0"])
    assert plan_chain(off).hashes("control") == () and plan_chain(off).plm_hashes == main

"""Planning the chain, the pairs and every stage's cells, and the pre-flight checks, without Ray."""

import dataclasses

import pytest
from transformers import RobertaConfig

from raysys.config import ConfigError, load_study
from raysys.core.recycle import WeightMismatchError
from raysys.stages import chain as chain_module
from raysys.stages.registry import STAGES, stage
from tests.test_identity import paper_with_fixed_data


def _plan(*overrides):
    study = load_study("tiny", list(overrides))
    return study, chain_module.plan_chain(study)


def _cells(name, study, chain, kind=None):
    cells = stage(name).plan(study, chain)
    return [c for c in cells if kind is None or type(c).__name__ == kind]


def test_cell_counts_of_the_tiny_plan():
    study, chain = _plan()
    grid = len(study.tasks) * len(study.tuning.types) * len(study.seeds)
    assert len(_cells("tuning", study, chain)) == (4 + 1) * grid  # M0..M3 and the control C1
    kinds = {(p.pair_kind, p.plm_index_a, p.plm_index_b) for p in chain_module.plan_pairs(study, chain)}
    assert kinds == {("continual", 0, 1), ("continual", 1, 2), ("continual", 2, 3), ("control", 0, 1),
                     ("same_plm", 0, 0), ("same_plm", 1, 1), ("same_plm", 2, 2)}  # the M_i of every hop


def test_same_plm_pairs_couple_every_seed_with_a_reference_and_can_be_left_out():
    assert chain_module.seed_couples((20, 30)) == [(20, 30)]  # a path and its reverse are one path
    assert chain_module.seed_couples((20, 30, 40)) == [(20, 30), (30, 40), (40, 20)]
    assert chain_module.seed_couples((20,)) == []
    study, chain = _plan("seeds=[20,30,40]")
    tuned = {c.cell_hash: c for c in _cells("tuning", study, chain)}
    same = [p for p in chain_module.plan_pairs(study, chain) if p.pair_kind == "same_plm"]
    assert len(same) == 3 * len(study.tasks) * len(study.tuning.types) * 3  # M0, M1, M2 x 3 couples
    for pair in same:
        a, b = tuned[pair.tuned_hash_a], tuned[pair.tuned_hash_b]
        assert a.plm_hash == b.plm_hash and (a.seed, b.seed) == (pair.seed, pair.seed_b) and a.seed != b.seed
        assert (a.task, a.tuning_type) == (b.task, b.tuning_type) == (pair.task, pair.tuning_type)
    study, chain = _plan("pilot.reference_pairs=false")
    assert not any(p.pair_kind == "same_plm" for p in chain_module.plan_pairs(study, chain))


def test_cell_counts_of_the_multi_hop_plan():
    study, chain = _plan("pilot.hops=[1,2]", "pilot.control_length=3")
    grid = len(study.tasks) * len(study.tuning.types) * len(study.seeds)
    assert len(_cells("tuning", study, chain)) == (4 + 2) * grid  # M0..M3 and the control C1, C2
    assert len(_cells("compatibility", study, chain, "CompatibilityCell")) == 6 * grid  # every i < j of M0..M3
    assert len(_cells("compatibility", study, chain, "BaselineCell")) == 4 * len(study.tasks) * len(study.seeds)
    pairs = chain_module.plan_pairs(study, chain)
    continual = {(p.plm_index_a, p.plm_index_b) for p in pairs if p.pair_kind == "continual"}
    control = {(p.plm_index_a, p.plm_index_b) for p in pairs if p.pair_kind == "control"}
    same = {(p.plm_index_a, p.plm_index_b) for p in pairs if p.pair_kind == "same_plm"}
    assert continual == {(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)}
    assert control == {(0, 1), (1, 2), (0, 2)}
    assert same == {(0, 0), (1, 1), (2, 2)}
    assert len(_cells("interpolation", study, chain, "PathPoint")) == len(pairs) * len(study.pilot.alphas)
    assert len(_cells("interpolation", study, chain, "PathSummary")) == len(pairs)
    assert len(_cells("similarity", study, chain)) == len(pairs)
    assert len({p.pair_hash for p in pairs}) == len(pairs)


def test_control_pairs_compare_against_the_control_chain():
    study, chain = _plan()
    tuned = {c.cell_hash: c for c in _cells("tuning", study, chain)}
    for pair in chain_module.plan_pairs(study, chain):
        a, b = tuned[pair.tuned_hash_a], tuned[pair.tuned_hash_b]
        assert a.chain == "main" and b.chain == pair.chain_b
        assert (a.task, a.tuning_type, a.seed, b.seed) == (b.task, b.tuning_type, pair.seed, pair.seed_b)
        assert b.chain == ("control" if pair.pair_kind == "control" else "main")


def _save_config(path, **shape):
    config = RobertaConfig(vocab_size=shape.get("vocab_size", 100), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)
    config.save_pretrained(str(path))
    return path


def test_checkpoints_of_different_vocabularies_are_refused_before_any_trial(tmp_path):
    a = _save_config(tmp_path / "a")
    b = _save_config(tmp_path / "b", vocab_size=120)
    chain_module.check_same_architecture({"a": a, "a again": _save_config(tmp_path / "c")})
    with pytest.raises(WeightMismatchError, match=r"a and b differ in vocab_size \(100 vs 120\)"):
        chain_module.check_same_architecture({"a": a, "b": b})


def test_preflight_names_the_control_checkpoint(tmp_path):
    main = _save_config(tmp_path / "main")
    other = _save_config(tmp_path / "other", vocab_size=50265)
    study = paper_with_fixed_data(f"model.name_or_path=\"{main}\"", "pilot.control_length=2",
                                  f"pilot.control_name_or_path=\"{other}\"")
    from raysys.storage.store import Store

    with pytest.raises(WeightMismatchError, match="pilot.control_name_or_path"):
        chain_module.preflight(study, Store(tmp_path / "store"), chain_module.plan_chain(study))


def test_preflight_refuses_a_checkpoint_of_an_unknown_architecture_or_another_than_configured(tmp_path):
    from transformers import BertConfig, GPT2Config

    from raysys.storage.store import Store

    def preflight(path, *overrides):
        study = paper_with_fixed_data(f"model.name_or_path=\"{path}\"", "pilot.control_length=0", *overrides)
        chain_module.preflight(study, Store(tmp_path / "store"), chain_module.plan_chain(study))

    GPT2Config(n_layer=2).save_pretrained(str(tmp_path / "gpt2"))
    BertConfig(num_hidden_layers=2).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ConfigError, match=r"model.name_or_path \(.*gpt2\): architecture 'gpt2' is not supported"):
        preflight(tmp_path / "gpt2")
    preflight(tmp_path / "bert")  # the checkpoint decides: model.architecture left at its default
    preflight(tmp_path / "bert", "model.architecture=bert")
    with pytest.raises(ConfigError, match=r"model.architecture: 'modernbert', but model.name_or_path .* 'bert'"):
        preflight(tmp_path / "bert", "model.architecture=modernbert")


def test_cells_round_trip_through_a_trial_config():
    """What the Ray edge sends a trial (plain values) rebuilds the same typed cells, for every kind of every stage."""
    study, chain = _plan("methods.search.algorithm=optuna")
    kinds = set()
    for each in STAGES:
        for cell in each.plan(study, chain):
            payload = each.encode(cell)
            assert each.decode(payload) == cell and dataclasses.asdict(cell) == {
                k: v for k, v in payload.items() if k != "kind"}
            kinds.add(type(cell).__name__)
    assert kinds >= {"Link", "TuningCell", "CompatibilityCell", "BaselineCell", "PathPoint", "PathSummary",
                     "SimilarityCell", "MethodCell", "SearchCell", "TrainingFreeCell"}


def test_every_result_table_is_written_by_exactly_one_stage_and_its_cells_say_which():
    from raysys.stages.base import Rows
    from raysys.storage.results import SCHEMAS

    owners = [table for each in STAGES for table in each.tables]
    assert sorted(owners) == sorted(SCHEMAS) and len(owners) == len(set(owners))
    study, chain = _plan("methods.search.algorithm=optuna")
    for each in STAGES:
        for cell in each.plan(study, chain):
            assert {out.table for out in each.outputs(cell) if isinstance(out, Rows)} <= set(each.tables), each.name


def test_replicate_chains_add_their_cells_and_leave_the_main_chains_alone():
    study, chain = _plan()
    replicated, replicated_chain = _plan("pretrain.replicate_seeds=[2,3]")
    assert replicated_chain.plm_hashes == chain.plm_hashes  # replicate_seeds enters no PLM's identity
    replicas = replicated_chain.replicas()
    assert [r.seed for r in replicas] == [0, 2, 3]
    assert len({h for r in replicas for h in r.plm_hashes}) == 3 * len(study.corpora)  # M0 from scratch: its own
    assert [link.seed for link in replicas[2].links if link.chain == "main"] == [3] * len(study.corpora)
    assert replicas[2].hashes("control") == chain.hashes("control")  # one control chain for all
    for one in STAGES:
        main = {c.cell_hash for c in one.plan(study, chain)}
        every = [c.cell_hash for c in chain_module.planned_cells(one, replicated, replicated_chain)]
        assert len(every) == len(set(every)) and main <= set(every)
        # the cells of a replicate are those its seed would plan as the main chain (shared ones: once)
        alone, alone_chain = _plan("pretrain.seed=3")
        assert {c.cell_hash for c in one.plan(alone, alone_chain)} <= set(every)
    tuned = [c for c in chain_module.planned_cells(stage("tuning"), replicated, replicated_chain)]
    grid = len(study.tasks) * len(study.tuning.types) * len(study.seeds)
    assert len(tuned) == (3 * 4 + 1) * grid  # three main chains' M0..M3, one control C1


def test_replicate_chains_share_a_checkpoint_kept_as_it_is():
    study = paper_with_fixed_data("pretrain.replicate_seeds=[3]")
    assert study.pretrain.initial_steps == 0 and study.model.name_or_path
    chain = chain_module.plan_chain(study)
    main, replicate = chain.replicas()
    assert replicate.plm_hashes[0] == main.plm_hashes[0]  # the same checkpoint, so its tuned models are too
    assert set(replicate.plm_hashes[1:]).isdisjoint(main.plm_hashes)
    assert len(chain.all_links) == len(chain.links) + len(study.corpora) - 1
    pretrain_cells = chain_module.planned_cells(stage("pretrain"), study, chain)
    assert len(pretrain_cells) == len({c.cell_hash for c in pretrain_cells}) == len(chain.all_links)
    # trained further from the checkpoint, M0 depends on the seed: each chain its own
    study = paper_with_fixed_data("pretrain.replicate_seeds=[3]", "pretrain.initial_steps=10")
    main, replicate = chain_module.plan_chain(study).replicas()
    assert replicate.plm_hashes[0] != main.plm_hashes[0]


def test_replicate_seeds_are_checked():
    for value, match in (("[0]", "holds pretrain.seed"), ("[2,2]", "distinct"), ("[1]", "pilot.control_seed"),
                         ("[-1]", "a seed must be")):
        with pytest.raises(ConfigError, match=match):
            load_study("tiny", [f"pretrain.replicate_seeds={value}"])

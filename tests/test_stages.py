"""Planning (cells, pairs, identities) and the pre-flight checks, without Ray."""

import pytest
from transformers import RobertaConfig

from raysys import stages
from raysys.config import load_study
from raysys.recycle import WeightMismatchError


def _plan(*overrides):
    study = load_study("tiny", list(overrides))
    return study, stages.plan_chain(study)


def test_cell_counts_of_the_tiny_plan():
    study, chain = _plan()
    grid = len(study.tasks) * len(study.tuning.types) * len(study.seeds)
    assert len(stages.plan_tuning(study, chain)) == (4 + 1) * grid  # M0..M3 and the control C1
    kinds = {(p["pair_kind"], p["plm_index_a"], p["plm_index_b"]) for p in stages.plan_pairs(study, chain)}
    assert kinds == {("continual", 0, 1), ("continual", 1, 2), ("continual", 2, 3), ("control", 0, 1)}


def test_cell_counts_of_the_multi_hop_plan():
    study, chain = _plan("pilot.hops=[1,2]", "pilot.control_length=3")
    grid = len(study.tasks) * len(study.tuning.types) * len(study.seeds)
    assert len(stages.plan_tuning(study, chain)) == (4 + 2) * grid  # M0..M3 and the control C1, C2
    assert len(stages.plan_compatibility(study, chain)) == 6 * grid  # every i < j of M0..M3
    pairs = stages.plan_pairs(study, chain)
    continual = {(p["plm_index_a"], p["plm_index_b"]) for p in pairs if p["pair_kind"] == "continual"}
    control = {(p["plm_index_a"], p["plm_index_b"]) for p in pairs if p["pair_kind"] == "control"}
    assert continual == {(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)}
    assert control == {(0, 1), (1, 2), (0, 2)}
    assert len(stages.plan_interpolation(study, chain)) == len(pairs) * 26
    assert len({p["pair_hash"] for p in pairs}) == len(pairs)


def test_control_pairs_compare_against_the_control_chain():
    study, chain = _plan()
    tuned = {c["cell_hash"]: c for c in stages.plan_tuning(study, chain)}
    for pair in stages.plan_pairs(study, chain):
        a, b = tuned[pair["tuned_hash_a"]], tuned[pair["tuned_hash_b"]]
        assert a["chain"] == "main" and b["chain"] == pair["chain_b"]
        assert (a["task"], a["tuning_type"], a["seed"]) == (b["task"], b["tuning_type"], b["seed"])
        assert b["chain"] == ("control" if pair["pair_kind"] == "control" else "main")


def test_a_tuning_types_identity_ignores_other_types_settings():
    study, chain = _plan()
    changed, chain2 = _plan("tuning.lora.rank=4")
    by_type = lambda s, c: {(x["task"], x["tuning_type"], x["seed"], x["chain"], x["plm_index"]): x["cell_hash"]
                            for x in stages.plan_tuning(s, c)}
    before, after = by_type(study, chain), by_type(changed, chain2)
    for key, h in before.items():
        assert (after[key] == h) == (key[1] != "lora"), key


def _save_config(path, **shape):
    config = RobertaConfig(vocab_size=shape.get("vocab_size", 100), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)
    config.save_pretrained(str(path))
    return path


def test_checkpoints_of_different_vocabularies_are_refused_before_any_trial(tmp_path):
    a = _save_config(tmp_path / "a")
    b = _save_config(tmp_path / "b", vocab_size=120)
    stages.check_same_architecture({"a": a, "a again": _save_config(tmp_path / "c")})
    with pytest.raises(WeightMismatchError, match=r"a and b differ in vocab_size \(100 vs 120\)"):
        stages.check_same_architecture({"a": a, "b": b})


def test_preflight_names_the_control_checkpoint(tmp_path):
    main = _save_config(tmp_path / "main")
    other = _save_config(tmp_path / "other", vocab_size=50265)
    study = load_study("paper", [f"model.name_or_path=\"{main}\"", "pilot.control_length=2",
                                 f"pilot.control_name_or_path=\"{other}\""])
    from raysys.store import Store

    with pytest.raises(WeightMismatchError, match="pilot.control_name_or_path"):
        stages.preflight(study, Store(tmp_path / "store"), stages.plan_chain(study))

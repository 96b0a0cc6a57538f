"""The one training loop and its objectives: the distillation loss against a hand computation, cross-entropy as
its a = 0, β = 0 case, cached vs live teachers, selection on two dev sets, and the convergence metrics."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import RobertaConfig, RobertaForSequenceClassification

from raysys.config import TuningConfig
from raysys.core import classifier_loop, objectives
from raysys.storage.store import Store

LOGITS_S = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
LOGITS_T = torch.tensor([[2.0, 1.0, 0.0], [0.0, -1.0, 1.0]])
LABELS = torch.tensor([0, 2])
HIDDEN_S = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]])  # (batch 2, layers 2, hidden 2)
HIDDEN_T = torch.tensor([[[0.0, 2.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 3.0]]])


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_distillation_loss_equals_a_hand_computation():
    t, a, beta = 2.0, 0.7, 5.0
    ce = sum(-math.log(_softmax(row, 1.0)[y]) for row, y in zip(LOGITS_S.tolist(), LABELS.tolist())) / 2
    kl = sum(sum(p * math.log(p / q) for p, q in zip(_softmax(rt, t), _softmax(rs, t)))
             for rs, rt in zip(LOGITS_S.tolist(), LOGITS_T.tolist())) / 2  # batch mean of per-example sums
    squares = [(s - h) ** 2 for s, h in zip(HIDDEN_S.flatten().tolist(), HIDDEN_T.flatten().tolist())]
    mse = sum(squares) / len(squares)  # (1 + 0 + 1 + 0 + 4 + 0 + 0 + 4) / 8 = 1.25
    expected = (1 - a) * ce + a * t * t * kl + beta * 0.5 * mse
    loss, parts = objectives.distillation_loss(LOGITS_S, LABELS, LOGITS_T, t, a, beta, HIDDEN_S, HIDDEN_T)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["ce"] == pytest.approx(ce, rel=1e-6) and parts["kl"] == pytest.approx(kl, rel=1e-6)
    assert parts["mse"] == pytest.approx(1.25)


def test_a_zero_and_beta_zero_is_plain_cross_entropy_without_touching_the_teacher():
    loss, parts = objectives.distillation_loss(LOGITS_S, LABELS, None, 10.0, 0.0, 0.0, None, None)
    assert torch.equal(loss, F.cross_entropy(LOGITS_S, LABELS))
    assert set(parts) == {"ce"}


def test_kl_of_a_student_equal_to_its_teacher_is_zero():
    loss, parts = objectives.distillation_loss(LOGITS_T, LABELS, LOGITS_T, 5.0, 1.0, 0.0)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-7) and loss.item() == pytest.approx(0.0, abs=1e-6)


def _model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, num_labels=2,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return RobertaForSequenceClassification(config)


def _split(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [[0] + torch.randint(5, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist() + [2]
           for _ in range(n)]
    labels = torch.tensor([int(x[1] % 2) for x in ids])  # learnable from the first token
    return ids, labels


ENCODED = {"train": _split(32, 0), "dev": _split(8, 1), "full_dev": _split(24, 2), "test": _split(24, 3)}
CFG = TuningConfig(max_steps=12, eval_every_steps=4, batch_size=8, lr=1e-2)


def test_first_token_states_are_the_embedding_output_and_all_but_the_last_layer():
    model = _model().eval()
    ids, _ = ENCODED["train"]
    out = model(input_ids=torch.tensor([ids[0]]), output_hidden_states=True)
    states = objectives.first_token_states(out.hidden_states)
    assert states.shape == (1, 2, 16)  # embeddings + layer 1 (of 2)
    assert torch.equal(states[0, 0], out.hidden_states[0][0, 0]) and torch.equal(states[0, 1], out.hidden_states[1][0, 0])


def test_cached_teacher_matches_a_live_teacher_without_dropout():
    teacher = _model(seed=5)
    ids, labels = ENCODED["train"]
    cached = objectives.teacher_outputs(teacher, ids, 7, 1, with_hidden=True)
    assert cached.logits.shape == (32, 2) and cached.hidden.shape == (32, 2, 16)
    batch = [3, 10, 17]
    from raysys.core import data
    input_ids, mask = data.pad_batch([ids[i] for i in batch], 1)
    student = _model(seed=6)
    kwargs = {"temperature": 4.0, "a": 0.5, "beta": 2.0}
    from_cache = objectives.DistillationObjective(**kwargs, cached=cached)(student, input_ids, mask, labels[batch],
                                                                     torch.tensor(batch))
    live = objectives.DistillationObjective(**kwargs, live_teacher=teacher)(student, input_ids, mask, labels[batch])
    assert from_cache[0].item() == pytest.approx(live[0].item(), rel=1e-5)


def test_distillation_objective_needs_exactly_one_teacher_and_hidden_states_for_beta():
    cached = objectives.TeacherOutputs(torch.zeros(2, 2), None)
    with pytest.raises(ValueError, match="exactly one"):
        objectives.DistillationObjective(1.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="hidden states"):
        objectives.DistillationObjective(1.0, 0.5, 1.0, cached=cached)


def test_loop_selects_on_each_dev_set_and_evaluates_at_the_start():
    result = classifier_loop.train_classifier(_model(), ENCODED, CFG, seed=0, pad_id=1, eval_at_start=True)
    assert [row["step"] for row in result.curve] == [0, 4, 8, 12]
    assert set(result.selections) == {"dev", "full_dev"}
    for name, selection in result.selections.items():
        best = max(result.curve, key=lambda r: r[f"{name}_accuracy"])  # max keeps the first of ties
        assert selection.best_step == best["step"]
        assert selection.best_dev_accuracy == best[f"{name}_accuracy"]
        assert 0.0 <= selection.test_accuracy <= 1.0
    assert result.curve[0]["train_loss"] is None


def test_the_loop_is_deterministic_in_the_seed():
    a = classifier_loop.train_classifier(_model(), ENCODED, CFG, seed=3, pad_id=1)
    b = classifier_loop.train_classifier(_model(), ENCODED, CFG, seed=3, pad_id=1)
    assert [r["dev_loss"] for r in a.curve] == [r["dev_loss"] for r in b.curve]


def test_convergence_metrics():
    curve = [{"step": 0, "dev_accuracy": 0.2, "seconds": 0.0}, {"step": 10, "dev_accuracy": 0.6, "seconds": 1.0},
             {"step": 30, "dev_accuracy": 0.8, "seconds": 3.0}]
    assert classifier_loop.steps_to_target(curve, 0.6) == (10, 1.0)
    assert classifier_loop.steps_to_target(curve, 0.81) is None
    # (10 * 0.4 + 20 * 0.7) / 30
    assert classifier_loop.area_under_curve(curve) == pytest.approx(18 / 30)
    assert classifier_loop.area_under_curve(curve[:1]) == 0.2


class _Interrupted(Exception):
    pass


def _dropout_model(seed=0):
    return _model(seed, dropout=0.1)  # dropout draws from the global RNG, which a resume must restore


@pytest.mark.parametrize("speed", [{}, {"length_bucketing": True, "precision": "bf16"}], ids=["plain", "bucketed-bf16"])
@pytest.mark.parametrize("stop_at", [4, 8])  # mid-epoch (6 batches of 6 per epoch) and in the second epoch
def test_a_run_resumed_from_its_checkpoint_ends_exactly_where_an_uninterrupted_one_does(tmp_path, stop_at, speed):
    from raysys.storage.checkpoint import Checkpointer

    cfg = TuningConfig(max_steps=12, eval_every_steps=4, batch_size=6, lr=1e-2, **speed)
    torch.manual_seed(1)
    reference = classifier_loop.train_classifier(_dropout_model(), ENCODED, cfg, seed=3, pad_id=1, eval_at_start=True)

    def interrupt(metrics, path):
        if metrics["step"] == stop_at:
            raise _Interrupted

    reported = []
    first = Checkpointer(Store(tmp_path), 0, "cell", on_save=interrupt, on_report=reported.append)
    torch.manual_seed(1)
    with pytest.raises(_Interrupted):
        classifier_loop.train_classifier(_dropout_model(), ENCODED, cfg, seed=3, pad_id=1, eval_at_start=True,
                              checkpointer=first)
    assert [r["step"] for r in reported] == [0]  # the start is reported, not checkpointed
    assert (tmp_path / "checkpoints" / "cell" / f"step-{stop_at:09d}" / "state.safetensors").is_file()

    torch.manual_seed(99)  # a restarted process: other global RNG state, which the checkpoint must restore
    second = Checkpointer(Store(tmp_path), 3600, "cell", on_report=reported.append)
    model = _dropout_model(seed=7)  # other initial weights: every trainable weight must come from the checkpoint
    resumed = classifier_loop.train_classifier(model, ENCODED, cfg, seed=3, pad_id=1, eval_at_start=True, checkpointer=second)
    assert [r["step"] for r in resumed.curve] == [0, 4, 8, 12]
    for a, b in zip(resumed.curve, reference.curve):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert resumed.primary.test_accuracy == reference.primary.test_accuracy
    assert resumed.primary.best_step == reference.primary.best_step
    assert second.saves == 0 and [r["step"] for r in reported][1:] == list(range(stop_at + 4, 13, 4))


def test_bf16_autocast_and_length_bucketing_still_fit_the_training_set():
    cfg = TuningConfig(max_steps=80, eval_every_steps=20, batch_size=8, lr=3e-3, precision="bf16", length_bucketing=True)
    model = _model()
    result = classifier_loop.train_classifier(model, ENCODED, cfg, seed=0, pad_id=1)
    losses = [r["train_loss"] for r in result.curve]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())

"""PET modules on a tiny RoBERTa: identity at start, only trainable weights stored, exact round trips, frozen
backbone, and clear errors for weights that do not fit."""

import pytest
import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from raysys import pet
from raysys.recycle import WeightMismatchError

PET_TYPES = ("lora", "adapter")


def _model(hidden=32, seed=0):
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, num_labels=3)
    return RobertaForSequenceClassification(config).eval()


def _inputs():
    return torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(1))


def _train(model, steps=5):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = _inputs(), torch.tensor([0, 1, 2, 0])
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("tuning_type", PET_TYPES)
def test_a_fresh_module_is_the_identity(tuning_type):
    x = _inputs()
    with torch.no_grad():
        reference = _model()(input_ids=x).logits
        adapted = pet.apply_pet(_model(), tuning_type, seed=3)(input_ids=x).logits
    assert torch.equal(adapted, reference)


@pytest.mark.parametrize("tuning_type, marker", [("lora", "lora_"), ("adapter", ".adapter.")])
def test_only_module_norms_and_head_are_trainable(tuning_type, marker):
    model = pet.apply_pet(_model(), tuning_type)
    state = pet.trainable_state_dict(model)
    for name in state:
        assert marker in name or name.startswith("classifier.") or (tuning_type == "adapter" and "LayerNorm" in name)
    assert any(marker in n for n in state) and any(n.startswith("classifier.") for n in state)
    if tuning_type == "lora":
        assert not any("LayerNorm" in n for n in state)
        assert sum("lora_A" in n for n in state) == 2 * 2  # query and value of 2 layers
    else:
        assert sum(n.endswith("adapter.down.weight") for n in state) == 2 * 2  # attention and FFN of 2 layers
    trainable = sum(v.numel() for v in state.values())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.3 * sum(p.numel() for p in model.parameters())  # hidden 32 here: PET is relatively big


@pytest.mark.parametrize("tuning_type", PET_TYPES)
def test_round_trip_and_frozen_backbone(tuning_type, tmp_path):
    from safetensors.torch import load_file, save_file

    model = pet.apply_pet(_model(), tuning_type, seed=1)
    backbone_before = {k: v.clone() for k, v in pet.backbone_state_dict(model).items()}
    _train(model)
    after = pet.backbone_state_dict(model)
    trained_norms = [k for k in after if "LayerNorm" in k or k.startswith("classifier.")]
    for k, v in backbone_before.items():
        if k not in trained_norms:
            assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], backbone_before[k]) for k in trained_norms if k.startswith("classifier."))
    save_file(pet.trainable_state_dict(model), str(tmp_path / "trainable.safetensors"))

    rebuilt = pet.apply_pet(_model(), tuning_type, seed=99)  # same PLM weights, another module init
    pet.load_trainable_state(rebuilt, load_file(str(tmp_path / "trainable.safetensors")))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.parametrize("tuning_type", PET_TYPES)
def test_backbone_names_match_a_plain_classifier(tuning_type):
    adapted = pet.apply_pet(_model(), tuning_type)
    plain = _model()
    backbone = pet.backbone_state_dict(adapted)
    assert set(backbone) == set(plain.state_dict())
    assert all(torch.equal(backbone[k], v) for k, v in plain.state_dict().items())
    plain.load_state_dict(backbone, strict=True)


@pytest.mark.parametrize("tuning_type", PET_TYPES)
def test_weights_for_another_backbone_shape_are_refused(tuning_type):
    small = pet.trainable_state_dict(pet.apply_pet(_model(hidden=32), tuning_type))
    wide = pet.apply_pet(_model(hidden=48), tuning_type)
    with pytest.raises(WeightMismatchError, match=r"has shape \([\d, ]+\), the model expects"):
        pet.load_trainable_state(wide, small)
    with pytest.raises(WeightMismatchError, match="missing"):
        pet.load_trainable_state(pet.apply_pet(_model(), "adapter"), pet.trainable_state_dict(
            pet.apply_pet(_model(), "lora")))


def test_unknown_tuning_type_and_targets_are_refused():
    with pytest.raises(ValueError, match="prefix.*known: \\['finetune', 'lora', 'adapter'\\]"):
        pet.apply_pet(_model(), "prefix")
    with pytest.raises(ValueError, match="tuning.lora.targets"):
        pet.apply_pet(_model(), "lora", lora_targets=("no_such_module",))

"""PET modules on a tiny RoBERTa: identity at start, only trainable weights stored, exact round trips through
files, a frozen backbone, the registry of tuning types, and clear errors for weights that do not fit."""

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import RobertaConfig, RobertaForSequenceClassification

from raysys import config
from raysys.config import TuningConfig, to_dict
from raysys.core import pet
from raysys.core.recycle import WeightMismatchError

PET_TYPES = ("lora", "adapter")
LAYERS = 2


def _model(hidden=32, seed=0):
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, num_labels=3)
    return RobertaForSequenceClassification(config).eval()


def _spec(tuning_type, **changes):
    """A PET type's config section as `apply_pet` takes it, with `changes`."""
    return to_dict(dataclasses.replace(getattr(TuningConfig(), tuning_type), **changes))


def _inputs():
    return torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=_inputs()).logits


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


@pytest.fixture(autouse=True)
def _one_thread():
    """Matrices this small gain nothing from a second intra-op thread, and on a busy 2-core machine the threads'
    contention turns a 10 ms training step into seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def plm_dir(tmp_path):
    path = tmp_path / "plm"
    _model().save_pretrained(str(path))
    return path


@pytest.mark.parametrize("tuning_type", PET_TYPES)
def test_a_fresh_module_is_the_identity(tuning_type):
    assert torch.equal(_logits(pet.apply_pet(_model(), tuning_type, seed=3)), _logits(_model()))


@pytest.mark.parametrize("tuning_type", PET_TYPES)
def test_module_init_is_seeded_and_leaves_the_global_rng_alone(tuning_type):
    def module(seed):
        return {k: v for k, v in pet.trainable_state_dict(pet.apply_pet(_model(), tuning_type, seed=seed)).items()
                if "lora_A" in k or "adapter.down" in k}

    assert all(torch.equal(a, b) for a, b in zip(module(3).values(), module(3).values()))
    assert not all(torch.equal(a, b) for a, b in zip(module(3).values(), module(4).values()))
    model = _model()
    torch.manual_seed(7)
    pet.apply_pet(model, tuning_type, seed=3)
    after_apply = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(after_apply, torch.rand(1))


def test_only_adapters_layer_norms_and_head_are_trainable():
    model = pet.apply_pet(_model(), "adapter")
    state = pet.trainable_state_dict(model)
    assert set(state) == {k for k in model.state_dict()
                          if ".adapter." in k or "LayerNorm" in k or k.startswith("classifier.")}
    assert sum(k.endswith(".output.dense.adapter.down.weight") for k in state) == 2 * LAYERS  # attention and FFN
    assert sum("LayerNorm" in k for k in state) == 2 * (1 + 2 * LAYERS)  # embeddings + 2 per layer, weight and bias
    assert "roberta.encoder.layer.0.attention.output.dense.adapter.up.weight" in state
    assert state["roberta.encoder.layer.0.output.dense.adapter.down.weight"].shape == (24, 32)
    trainable = sum(v.numel() for v in state.values())
    assert trainable < 0.3 * sum(p.numel() for p in model.parameters())  # hidden 32 here: PET is relatively big


def test_only_lora_and_head_are_trainable():
    model = pet.apply_pet(_model(), "lora", spec=_spec("lora", rank=4))
    state = pet.trainable_state_dict(model)
    assert set(state) == {k for k in model.state_dict() if "lora_" in k or k.startswith("classifier.")}
    assert sum("lora_A" in k for k in state) == sum("lora_B" in k for k in state) == 2 * LAYERS  # query, value
    assert state["roberta.encoder.layer.1.attention.self.value.lora_A.default.weight"].shape == (4, 32)
    trainable = sum(v.numel() for v in state.values())
    assert trainable < 0.1 * sum(p.numel() for p in model.parameters())


def test_finetune_trains_everything_unchanged():
    model = pet.apply_pet(_model(), "finetune")
    assert all(p.requires_grad for p in model.parameters())
    assert set(pet.trainable_state_dict(model)) == set(_model().state_dict())


@pytest.mark.parametrize("tuning_type", PET_TYPES)
def test_training_moves_only_the_trainable_weights(tuning_type):
    model = pet.apply_pet(_model(), tuning_type, seed=1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = pet.trainable_state_dict(model)
    _train(model)
    now = dict(model.named_parameters())
    assert frozen and all(torch.equal(now[n], v) for n, v in frozen.items())
    module = [n for n in trainable if "lora_B" in n or "adapter.up" in n]
    assert module and all(not torch.equal(now[n], trainable[n]) for n in module)


@pytest.mark.parametrize("tuning_type", (*PET_TYPES, "finetune"))
def test_saved_trainable_weights_rebuild_the_model_on_its_plm(tuning_type, plm_dir, tmp_path):
    small = {"lora": {"rank": 4}, "adapter": {"bottleneck": 8}}
    spec = _spec(tuning_type, **small[tuning_type]) if tuning_type in small else None
    load = lambda: RobertaForSequenceClassification.from_pretrained(str(plm_dir), use_safetensors=True)
    model = _train(pet.apply_pet(load(), tuning_type, spec=spec, seed=1))
    pet.save_trainable(model, tmp_path / "pet")

    assert [p.name for p in (tmp_path / "pet").iterdir()] == [pet.WEIGHTS_FILE]
    saved = load_file(str(tmp_path / "pet" / pet.WEIGHTS_FILE))
    assert set(saved) == set(pet.trainable_state_dict(model))
    rebuilt = pet.apply_pet(load(), tuning_type, spec=spec, seed=1)
    pet.load_trainable_state(rebuilt, saved)
    assert torch.equal(_logits(rebuilt), _logits(model))
    assert not torch.equal(_logits(rebuilt), _logits(_model()))


def test_every_configured_tuning_type_is_registered_and_only_its_module_is_its_own():
    assert list(pet.TUNING_TYPES) == list(config.TUNING_TYPES) == ["finetune", *config.PET_TYPES]
    names = {t: set(pet.trainable_state_dict(pet.apply_pet(_model(), t))) for t in config.PET_TYPES}
    for tuning_type, trainable in names.items():
        kind = pet.TUNING_TYPES[tuning_type]
        module = {n for n in trainable if kind.is_module(n)}
        assert module and all(pet.is_module_weight(n) for n in module)
        assert not any(kind.is_module(n) for t, other in names.items() if t != tuning_type for n in other)
        assert not any(pet.is_module_weight(n) for n in trainable - module)  # LayerNorms and the head
    # the config (which identities read, without torch) and the registry agree on which types train norms
    assert {t for t, k in pet.TUNING_TYPES.items() if k.trains_norms} == {"adapter"} == {
        t for t in config.TUNING_TYPES if TuningConfig().trains_norms(t)}


def test_trained_norms_are_the_backbones_layer_norms_an_adapter_trains():
    adapter = pet.apply_pet(_model(), "adapter")
    norms = pet.trained_norms(adapter)
    assert norms == {k for k in pet.trainable_state_dict(adapter) if "LayerNorm" in k}
    assert len(norms) == 2 * (1 + 2 * LAYERS) and "roberta.embeddings.LayerNorm.weight" in norms
    assert pet.trained_norms(pet.apply_pet(_model(), "lora")) == set()


@pytest.mark.parametrize("tuning_type, key, shapes", [
    ("lora", "roberta.encoder.layer.0.attention.self.query.lora_A.default.weight", r"\(8, 32\).*\(8, 48\)"),
    ("adapter", "roberta.embeddings.LayerNorm.weight", r"\(32,\).*\(48,\)"),
])
def test_weights_for_another_backbone_shape_are_refused(tuning_type, key, shapes):
    small = pet.trainable_state_dict(pet.apply_pet(_model(hidden=32), tuning_type))
    wide = pet.apply_pet(_model(hidden=48), tuning_type)
    with pytest.raises(WeightMismatchError, match=f"'{key}' has shape {shapes}"):
        pet.load_trainable_state(wide, small)


def test_weights_of_another_module_are_refused():
    lora = pet.trainable_state_dict(pet.apply_pet(_model(), "lora"))
    with pytest.raises(WeightMismatchError, match=r"missing \['roberta.*adapter.*unexpected \['roberta.*lora_A"):
        pet.load_trainable_state(pet.apply_pet(_model(), "adapter"), lora)


def test_unknown_tuning_type_bad_targets_and_double_application_are_refused():
    with pytest.raises(ValueError, match=r"'prefix'.*known: \['finetune', 'lora', 'adapter'\]"):
        pet.apply_pet(_model(), "prefix")
    with pytest.raises(ValueError, match="tuning.lora.targets"):
        pet.apply_pet(_model(), "lora", spec=_spec("lora", targets=("no_such_module",)))
    with pytest.raises(ValueError, match="already prepared for 'adapter'"):
        pet.apply_pet(pet.apply_pet(_model(), "adapter"), "lora")


def _lora_layer(w, a, b, prefix="enc.q"):
    return {f"{prefix}.base_layer.weight": torch.tensor(w), f"{prefix}.base_layer.bias": torch.tensor([0.5, -0.5]),
            f"{prefix}.lora_A.default.weight": torch.tensor(a), f"{prefix}.lora_B.default.weight": torch.tensor(b)}


def test_merge_lora_folds_the_scaled_update_into_the_weight():
    state = {**_lora_layer([[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0]], [[1.0], [0.0]]), "head.w": torch.ones(3)}
    merged = pet.merge_lora(state, scaling=2.0)
    assert torch.equal(merged["enc.q.base_layer.weight"], torch.tensor([[3.0, 4.0], [0.0, 1.0]]))  # W + 2·B·A
    assert torch.equal(merged["enc.q.lora_B.default.weight"], torch.zeros(2, 1))
    for kept in ("enc.q.lora_A.default.weight", "enc.q.base_layer.bias", "head.w"):
        assert torch.equal(merged[kept], state[kept])
    assert pet.lora_scaling({"rank": 8, "alpha": 16.0}) == 2.0
    bad = dict(state, **{"enc.q.lora_B.default.weight": torch.zeros(3, 1)})
    with pytest.raises(WeightMismatchError, match="LoRA layer 'enc.q'"):
        pet.merge_lora(bad, 2.0)


def test_merged_interpolation_is_linear_in_alpha_and_factor_wise_is_not():
    """The effective weight at α = 0.5: the mean of the ends' effective weights when the path interpolates merged
    weights; W(α) + B(α)·A(α) — quadratic in α — when it interpolates the factors."""
    from raysys.core import recycle

    a = _lora_layer([[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0]], [[1.0], [0.0]])  # effective [[1, 0], [0, 0]]
    b = _lora_layer([[0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0]], [[0.0], [1.0]])  # effective [[0, 0], [0, 1]]
    effective = lambda state: pet.merge_lora(state, 1.0)["enc.q.base_layer.weight"]
    merged = recycle.interpolate(pet.merge_lora(a, 1.0), pet.merge_lora(b, 1.0), 0.5)
    assert torch.equal(effective(merged), torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    assert torch.equal(effective(merged), (effective(a) + effective(b)) / 2)
    factors = recycle.interpolate(a, b, 0.5)
    assert torch.equal(effective(factors), torch.tensor([[0.25, 0.25], [0.25, 0.25]]))  # B(½)·A(½)


def test_a_merged_lora_model_computes_what_peft_computes():
    """Loaded into the LoRA model, the merged state gives its logits; its weights are bitwise peft's own merge."""
    spec = _spec("lora", rank=4, alpha=8.0)
    model = _train(pet.apply_pet(_model(), "lora", spec=spec, seed=1))
    merged = pet.merge_lora(model.state_dict(), pet.lora_scaling(spec))
    by_peft = copy.deepcopy(model)
    layers = [m for m in by_peft.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]
    assert len(layers) == 2 * LAYERS
    for layer in layers:
        layer.merge()
    peft_state = by_peft.state_dict()
    assert all(torch.equal(merged[k], peft_state[k]) for k in merged if k.endswith("base_layer.weight"))
    before = _logits(model)
    model.load_state_dict(merged)
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-6)
    assert torch.equal(_logits(model), _logits(by_peft))

"""raysys/core/architectures.py: every architecture of the table, as a tiny random model (hidden 32, 2 layers, 2 heads)
over a tiny trained BPE tokenizer, through what raysys does with it — the masked-only MLM loss against the model's
own, a classifier built from the saved PLM, fresh PET modules, weight arithmetic, distillation hidden states and
attention maps. Real HF models throughout; a wrong table entry fails here, not in a sweep."""

import random

import pytest
import torch
from safetensors.torch import load_file

from raysys.config import ARCHITECTURES, ConfigError, ModelConfig
from raysys.core import analysis, architectures, data, masked_lm_loop, models, objectives, pet, recycle

LAYERS, HEADS, HIDDEN = 2, 2, 32
WORDS = ("the", "cat", "dog", "bird", "sat", "ran", "flew", "over", "under", "a", "red", "blue", "green", "big",
         "small", "house", "tree", "river", "hill", "saw", "and", "with", "near", "far", "old", "new")


@pytest.fixture(autouse=True)
def _one_thread():
    """Matrices this small gain nothing from a second thread, and on a busy 2-core machine contention costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(400)]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return models.train_tokenizer(texts, vocab_size=200)


def _config(architecture: str) -> ModelConfig:
    return ModelConfig(architecture=architecture, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                       intermediate_size=64, max_positions=32, dropout=0.1)


def _batch(texts, tokenizer, n=6):
    """Packed sequences of different lengths (so that padding is exercised), padded."""
    sequences = masked_lm_loop.pack_corpus(texts, tokenizer, 24)[:n]
    sequences[-1] = sequences[-1][:9]
    return data.pad_batch(sequences, tokenizer.pad_token_id)


def _masked(texts, tokenizer):
    ids, mask = _batch(texts, tokenizer)
    special = sum(ids == s for s in tokenizer.all_special_ids).bool()
    corrupted, labels = data.mask_tokens(ids, special, tokenizer.mask_token_id, models.regular_token_ids(tokenizer),
                                         0.3, torch.Generator().manual_seed(0))
    return corrupted, mask, labels


@pytest.fixture(scope="module")
def plm_dirs(tmp_path_factory, tokenizer):
    """architecture -> a saved tiny PLM (as the pre-training stage saves one)."""
    out = {}
    for architecture in ARCHITECTURES:
        path = tmp_path_factory.mktemp(architecture)
        models.new_masked_lm(_config(architecture), tokenizer, seed=0).save_pretrained(str(path))
        out[architecture] = path
    return out


def _classifier(plm_dirs, architecture, seed=0):
    return models.classifier_from_plm(plm_dirs[architecture], num_labels=3, seed=seed).eval()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask).logits


def test_the_table_covers_the_configured_architectures_and_refuses_others():
    assert set(architectures.ARCHITECTURES) == set(ARCHITECTURES)
    with pytest.raises(ConfigError, match=r"model.architecture: unknown 'gpt2'; known: \['roberta', 'bert'"):
        ModelConfig(architecture="gpt2")
    with pytest.raises(ConfigError, match=r"model_type of x: architecture 'gpt2' is not supported; known: \["):
        architectures.get("gpt2", "model_type of x")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_masked_only_objective_is_the_models_own_mlm_loss(architecture, texts, tokenizer):
    model = models.new_masked_lm(_config(architecture), tokenizer, seed=0).eval()
    assert model.config.model_type == architecture and model.config.vocab_size == len(tokenizer)
    corrupted, mask, labels = _masked(texts, tokenizer)
    assert int((labels != -100).sum()) > 10
    with torch.no_grad():
        ours = masked_lm_loop.MaskedLMObjective(model)(corrupted, mask, labels)
        full = model(input_ids=corrupted, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours, full.loss, rtol=1e-5, atol=1e-6)
    hidden = model.base_model(input_ids=corrupted, attention_mask=mask).last_hidden_state
    selected = labels != -100
    torch.testing.assert_close(architectures.of(model).mlm_logits(model, hidden[selected]), full.logits[selected],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_classifier_from_the_plm_loads_every_weight_but_the_tables_head(architecture, plm_dirs):
    plm = models.load_masked_lm(plm_dirs[architecture]).state_dict()  # tied weights included
    head = architectures.ARCHITECTURES[architecture].head_prefixes
    classifier = _classifier(plm_dirs, architecture).state_dict()
    fresh = {k for k in classifier if k not in plm}
    assert fresh == {k for k in classifier if k.startswith(head)}
    assert all(any(k.startswith(prefix) for k in classifier) for prefix in head)  # no stale prefix in the table
    assert all(torch.equal(v, plm[k]) for k, v in classifier.items() if k not in fresh)
    assert len(classifier) - len(fresh) >= 4 * LAYERS  # the backbone (ModernBERT has no biases: 5 a layer)


def test_a_classifiers_head_is_seeded(plm_dirs):
    a, b, c = (_classifier(plm_dirs, "bert", seed).state_dict() for seed in (1, 1, 2))
    assert torch.equal(a["classifier.weight"], b["classifier.weight"])
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


@pytest.mark.parametrize("tuning_type", ["lora", "adapter"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_fresh_pet_module_is_the_identity_and_only_it_and_the_head_train(architecture, tuning_type, plm_dirs,
                                                                           texts, tokenizer):
    ids, mask = _batch(texts, tokenizer)
    plain = _logits(_classifier(plm_dirs, architecture), ids, mask)
    model = pet.apply_pet(_classifier(plm_dirs, architecture), tuning_type, seed=3)
    torch.testing.assert_close(_logits(model, ids, mask), plain, rtol=0, atol=1e-6)
    head = architectures.of(model).head_prefixes
    kind = pet.TUNING_TYPES[tuning_type]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    module = {n for n in trainable if kind.is_module(n)}
    norms = pet.layer_norm_parameters(model) if tuning_type == "adapter" else set()
    assert trainable == module | {n for n, _ in model.named_parameters() if n.startswith(head)} | norms
    per_layer = 2 * (2 if tuning_type == "adapter" else 1)  # (down, up) at 2 sites; LoRA (A, B) on >= 1 projection
    assert len({n for n in module if n.endswith("weight")}) >= per_layer * LAYERS
    if tuning_type == "adapter":
        assert len(norms) >= 2 * LAYERS
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model.train()(input_ids=ids, attention_mask=mask).logits,
                                                 torch.arange(len(ids)) % 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert not torch.allclose(_logits(model, ids, mask), plain)


def _perturbed(model, seed):
    """The model with every floating weight moved: a stand-in for fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_transplant_and_interpolation_reproduce_their_ends(architecture, plm_dirs, tokenizer, tmp_path, texts):
    ids, mask = _batch(texts, tokenizer)
    other = tmp_path / "other"
    models.new_masked_lm(_config(architecture), tokenizer, seed=1).save_pretrained(str(other))
    plm_old, plm_new = (load_file(str(p / "model.safetensors")) for p in (plm_dirs[architecture], other))
    tuned = _perturbed(_classifier(plm_dirs, architecture), seed=5)
    tuned_state = {k: v.clone() for k, v in tuned.state_dict().items()}
    head = architectures.of(tuned).head_prefixes
    skeleton = _classifier(plm_dirs, architecture, seed=9)

    # onto its own PLM: the tuned model back; onto another: the new backbone plus the old update, the old head
    same = recycle.transplant_delta(tuned_state, plm_old, plm_old, head)
    skeleton.load_state_dict(same, strict=True)
    torch.testing.assert_close(_logits(skeleton, ids, mask), _logits(tuned, ids, mask), rtol=0, atol=1e-5)
    moved = recycle.transplant_delta(tuned_state, plm_old, plm_new, head)
    skeleton.load_state_dict(moved, strict=True)
    key = next(k for k in moved if not k.startswith(head) and moved[k].is_floating_point() and moved[k].dim() == 2)
    torch.testing.assert_close(moved[key], plm_new[key] + tuned_state[key] - plm_old[key], rtol=0, atol=1e-6)
    assert all(torch.equal(moved[k], v) for k, v in tuned_state.items() if k.startswith(head))

    start = _classifier(plm_dirs, architecture).state_dict()
    for alpha, end in ((0.0, start), (1.0, tuned_state)):
        mixed = recycle.interpolate(start, tuned_state, alpha)
        assert mixed.keys() == end.keys() and all(torch.equal(v, end[k]) for k, v in mixed.items())
    skeleton.load_state_dict(recycle.interpolate(start, tuned_state, 0.5), strict=True)  # a point of the path loads
    skeleton.load_state_dict(recycle.interpolate(start, tuned_state, 1.0), strict=True)
    torch.testing.assert_close(_logits(skeleton, ids, mask), _logits(tuned, ids, mask), rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_distillation_states_and_attention_maps_have_one_entry_per_layer(architecture, plm_dirs, texts, tokenizer):
    ids, mask = _batch(texts, tokenizer)
    model = _classifier(plm_dirs, architecture)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    states = objectives.first_token_states(out.hidden_states)
    assert states.shape == (len(ids), LAYERS, HIDDEN)  # the embedding output and every layer but the last
    assert int(ids[:, 0].unique()) == architectures.start_token_id(tokenizer)
    torch.testing.assert_close(states[:, 0], out.hidden_states[0][:, 0])

    maps, real = analysis.attention_maps(model, [(ids[:3], mask[:3]), (ids[3:], mask[3:])])
    assert len(maps) == LAYERS and all(m.shape == (len(ids), HEADS, ids.shape[1], ids.shape[1]) for m in maps)
    rows = maps[0].sum(-1)[:, 0]  # (examples, queries): each real query's attention sums to one
    torch.testing.assert_close(rows[real], torch.ones(int(real.sum())), rtol=0, atol=1e-5)
    similarity = analysis.similarity(analysis.head_divergence(maps[1], maps[1], real))
    torch.testing.assert_close(similarity.diagonal(), torch.ones(HEADS), rtol=0, atol=1e-5)
    # the model still predicts what it predicted before its attention was switched to eager
    torch.testing.assert_close(_logits(model, ids, mask), out.logits, rtol=1e-5, atol=1e-5)

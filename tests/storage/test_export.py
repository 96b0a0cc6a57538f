"""`raysys export` on the micro study's storage: each tuned type and a PLM written in the ecosystem's formats, loaded
with the library's own API, predicting what raysys's own model predicts; bad input refused, nothing written."""

import pytest
import torch
from safetensors.torch import load_file

from raysys import cli
from raysys.storage import artifacts, results
from raysys.storage.export import BASE, load_exported

TEXTS = ["the river bank was quiet in the morning", "a short sentence", "prices rose again after the report"]


def _tuned(store, tuning_type: str) -> str:
    return next(r["cell_hash"] for r in results.read_table(store, "tuning_runs").to_pylist()
                if r["tuning_type"] == tuning_type and r["status"] == "ok")


def _export(store, tmp_path, *which: str):
    out = tmp_path / "exported"
    assert cli.main(["export", str(store.root), *which, "--to", str(out)]) == 0
    return out


def _raysys_logits(store, tuned_hash: str, tokenizer) -> torch.Tensor:
    model, _ = artifacts.load_tuned(store, tuned_hash)
    with torch.no_grad():
        return model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits


def test_a_fine_tuned_model_runs_in_a_transformers_pipeline(micro_run, tmp_path, capsys):
    from transformers import AutoTokenizer, pipeline

    _, store, _ = micro_run
    tuned = _tuned(store, "finetune")
    out = _export(store, tmp_path, "--tuned", tuned[:10])  # a prefix, as `raysys results` shows hashes
    assert f"exported: {out}" in capsys.readouterr().out
    expected = _raysys_logits(store, tuned, AutoTokenizer.from_pretrained(out)).softmax(-1)
    labels = artifacts.tuned_meta(store, tuned)["labels"]
    got = pipeline("text-classification", model=str(out), top_k=None)(TEXTS)
    for probs, scores in zip(expected, got, strict=True):
        by_label = {s["label"]: s["score"] for s in scores}
        assert set(by_label) == set(labels)
        assert [by_label[label] for label in labels] == pytest.approx(probs.tolist(), abs=1e-5)
    assert 'pipeline("text-classification"' in (out / "README.md").read_text()
    stored = pipeline("text-classification", model=str(store.artifact("tuned", tuned)), top_k=None)(TEXTS)
    assert stored == got  # the store's own folder carries the tokenizer too


def test_a_lora_model_loads_with_peft_and_predicts_the_same(micro_run, tmp_path):
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, store, _ = micro_run
    tuned = _tuned(store, "lora")
    out = _export(store, tmp_path, "--tuned", tuned)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= \
        {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = _raysys_logits(store, tuned, tokenizer)
    base = AutoModelForSequenceClassification.from_pretrained(out / BASE)
    loaded = PeftModel.from_pretrained(base, out).eval()
    assert torch.allclose(_logits(loaded, tokenizer), expected, atol=1e-5)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(out).eval()  # the base from adapter_config.json
    assert torch.allclose(_logits(auto, tokenizer), expected, atol=1e-5)
    # the LoRA update is in the saved adapter: without it the base alone predicts otherwise
    assert not torch.allclose(_logits(AutoModelForSequenceClassification.from_pretrained(out / BASE).eval(),
                                      tokenizer), expected, atol=1e-4)
    assert any("lora_B" in k for k in load_file(str(out / "adapter_model.safetensors")))


def test_an_adapter_model_is_rebuilt_from_its_folder_alone(micro_run, tmp_path):
    _, store, _ = micro_run
    tuned = _tuned(store, "adapter")
    out = _export(store, tmp_path, "--tuned", tuned)
    model, tokenizer = load_exported(out)
    assert torch.equal(_logits(model, tokenizer), _raysys_logits(store, tuned, tokenizer))
    assert model.config.id2label == dict(enumerate(artifacts.tuned_meta(store, tuned)["labels"]))
    assert "load_exported" in (out / "README.md").read_text()


def test_a_plm_loads_as_a_masked_lm(micro_run, tmp_path):
    from transformers import AutoModelForMaskedLM

    _, store, _ = micro_run
    plm = results.read_table(store, "pretrain_runs").to_pylist()[-1]["cell_hash"]
    out = _export(store, tmp_path, "--plm", plm)
    state = AutoModelForMaskedLM.from_pretrained(out).state_dict()
    stored = artifacts.plm_state(store, plm)
    assert stored and all(torch.equal(state[k], v) for k, v in stored.items())
    assert not (out / artifacts.STREAMS).exists()


def test_bad_exports_are_refused_naming_what_is_wrong_and_write_nothing(micro_run, tmp_path, capsys):
    _, store, _ = micro_run
    tuned = _tuned(store, "lora")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert cli.main(["export", str(store.root), "--tuned", tuned, "--to", str(taken)]) == 2
    assert "--to" in capsys.readouterr().err and [p.name for p in taken.iterdir()] == ["mine.txt"]
    assert cli.main(["export", str(store.root), "--tuned", "f" * 40, "--to", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert f"--tuned {'f' * 40}: no stored tuned models match" in err and "tuning_runs" in err
    assert cli.main(["export", str(store.root), "--tuned", "", "--to", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["taken"]

"""A stored model in the formats the ecosystem loads, in a folder of its own (`raysys export`):

    fine-tuning  config.json + model.safetensors + tokenizer: `transformers.pipeline("text-classification", model=DIR)`
    lora         adapter_config.json + adapter_model.safetensors (the head in `modules_to_save`) + tokenizer, and
                 base_model/ (the PLM with the tuned head): `PeftModel.from_pretrained(base, DIR)`
    adapter      the paper's bottleneck adapter is no peft type: base_model/ + trainable.safetensors + raysys.json,
                 rebuilt by `load_exported(DIR)`
    plm          the masked LM + tokenizer: `AutoModelForMaskedLM.from_pretrained(DIR)`

Each folder has a README.md saying how to load it. The folder is written under a temporary name and renamed when
complete, and an existing one is never written into.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from raysys.config import FULL_FINETUNING
from raysys.core import architectures, models, pet
from raysys.storage import artifacts
from raysys.storage.store import Store

BASE = "base_model"


def resolve(store: Store, kind: str, prefix: str) -> str:
    """The one stored `kind` artifact whose hash starts with `prefix` (a hash as `raysys results` prints it)."""
    table = {"tuned": "tuning_runs", "plm": "pretrain_runs"}[kind]
    found = [h for h in store.list_dirs(f"artifacts/{kind}") if h.startswith(prefix)] if prefix else []
    if len(found) != 1:
        raise ValueError(f"--{kind} {prefix}: {'no' if not found else len(found)} stored {kind} models match in "
                         f"{store.shown} (the cell_hash column of {table} names them)")
    return found[0]


def export_tuned(store: Store, tuned_hash: str, out: Path) -> Path:
    """The tuned model `tuned_hash` (a tuning run's cell hash) as a folder `out`; returns `out`."""
    model, meta = artifacts.load_tuned(store, tuned_hash)
    model.config.id2label = dict(enumerate(meta["labels"]))  # what a pipeline names its predictions by
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    tokenizer = models.load_tokenizer(store.artifact("plm", meta["plm_hash"]))
    if meta["tuning_type"] == FULL_FINETUNING:
        write = _write_full
    elif meta["tuning_type"] == "lora":
        write = _write_lora
    else:  # the bottleneck adapter: peft has no type for it
        write = _write_raysys
    return _writing(out, lambda tmp: write(tmp, out, model, meta, tokenizer, store))


def export_plm(store: Store, plm_hash: str, out: Path) -> Path:
    def write(tmp: Path) -> None:
        shutil.copytree(store.artifact("plm", plm_hash), tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(artifacts.STREAMS))
        _readme(tmp, f"PLM {plm_hash} of a raysys chain (a masked LM)", f"""\
from transformers import AutoModelForMaskedLM, AutoTokenizer
model = AutoModelForMaskedLM.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")""")

    return _writing(out, write)


def _writing(out: Path, write) -> Path:
    """Run `write(tmp)` into a fresh temporary folder beside `out`, then rename it to `out`."""
    out = out.resolve()
    if out.exists():
        raise ValueError(f"--to {out}: exists (export writes a new folder and never into one)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_full(tmp: Path, out: Path, model, meta: dict, tokenizer, store: Store) -> None:
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    _readme(tmp, _title(meta), f"""\
from transformers import pipeline
classify = pipeline("text-classification", model="{out}")
classify("a sentence of the task")""")


def _base_classifier(store: Store, model, meta: dict):
    """The PLM as a sequence classifier with the tuned head (and labels): a PET model's backbone and head, without
    its module."""
    base = models.classifier_from_plm(store.artifact("plm", meta["plm_hash"]), len(meta["labels"]), meta["seed"])
    base.config.id2label, base.config.label2id = model.config.id2label, model.config.label2id
    head, norms = architectures.of(base).head_prefixes, pet.trained_norms(model)
    tuned = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, param in base.state_dict().items():
            if name.startswith(head) or name in norms:
                param.copy_(tuned[name])
    return base


def _write_lora(tmp: Path, out: Path, model, meta: dict, tokenizer, store: Store) -> None:
    from peft import LoraConfig, get_peft_model

    base = _base_classifier(store, model, meta)
    base.save_pretrained(str(tmp / BASE))
    tokenizer.save_pretrained(str(tmp / BASE))
    spec = meta["pet"]
    head = [p.rstrip(".") for p in architectures.of(base).head_prefixes]
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], bias="none",
                        target_modules=architectures.lora_targets(base, spec["targets"]), modules_to_save=head)
    wrapped = get_peft_model(base, config)  # the head's copy to save is taken here, from the tuned head
    wrapped.peft_config["default"].base_model_name_or_path = str(tmp / BASE)  # peft reads the base's config there
    lora = {k: v for k, v in model.state_dict().items() if pet.TUNING_TYPES["lora"].is_module(k)}
    _, unexpected = wrapped.base_model.model.load_state_dict(lora, strict=False)
    if unexpected:
        raise RuntimeError(f"LoRA export: weights without a place in peft's model: {unexpected[:5]}")
    wrapped.save_pretrained(str(tmp))
    # where AutoPeftModel finds the base once the folder has its name: the copy beside the adapter
    adapter_config = json.loads((tmp / "adapter_config.json").read_text())
    (tmp / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(out / BASE)},
                                                        indent=2))
    tokenizer.save_pretrained(str(tmp))
    _readme(tmp, _title(meta), f"""\
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
base = AutoModelForSequenceClassification.from_pretrained("{out / BASE}")
model = PeftModel.from_pretrained(base, "{out}").eval()
tokenizer = AutoTokenizer.from_pretrained("{out}")""")


def _write_raysys(tmp: Path, out: Path, model, meta: dict, tokenizer, store: Store) -> None:
    base = models.classifier_from_plm(store.artifact("plm", meta["plm_hash"]), len(meta["labels"]), meta["seed"])
    base.save_pretrained(str(tmp / BASE))
    tokenizer.save_pretrained(str(tmp))
    pet.save_trainable(model, tmp)
    (tmp / artifacts.META).write_text(json.dumps(meta, indent=1))
    _readme(tmp, _title(meta), f"""\
# the paper's bottleneck adapter is no peft type: raysys rebuilds it on the PLM in base_model/
from raysys.storage.export import load_exported
model, tokenizer = load_exported("{out}")""")


def load_exported(folder: str | Path):
    """(model in eval mode, tokenizer) of a folder `export_tuned` wrote for a PET type peft has no format for."""
    folder = Path(folder)
    meta = json.loads((folder / artifacts.META).read_text())
    model = models.classifier_from_plm(folder / BASE, len(meta["labels"]), meta["seed"])
    model = pet.apply_pet(model, meta["tuning_type"], spec=meta.get("pet"), seed=meta["seed"])
    pet.load_trainable_state(model, load_file(str(folder / pet.WEIGHTS_FILE)))
    model.config.id2label = dict(enumerate(meta["labels"]))
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    return model.eval(), models.load_tokenizer(folder)


def _title(meta: dict) -> str:
    return (f"{meta['tuning_type']} of task {meta.get('task', '?')} (seed {meta['seed']}) on PLM {meta['plm_hash']}, "
            f"labels {list(meta['labels'])}")


def _readme(folder: Path, title: str, snippet: str) -> None:
    (folder / "README.md").write_text(f"# {title}\n\nExported by `raysys export`. Load it with:\n\n```python\n"
                                      f"{snippet}\n```\n")

"""The `transfer` stage's run code (torch): one pair's weights as the methods see them, and the scoring of a
method's grid on them. See raysys.stages.transfer for what is transferred and why."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from raysys.config import transfer_not_applicable
from raysys.core import architectures, pet, transfer
from raysys.core.classifier_loop import evaluate
from raysys.stages.base import Context
from raysys.stages.recipe import clone_state, encoded_task
from raysys.storage import artifacts


@dataclass(frozen=True)
class Scored:
    setting: dict
    metrics: dict  # dev_accuracy, dev_loss; test_* for the selected setting only
    selected: bool
    num_versions: int
    relative_change: float  # ‖method's delta − Δ‖ / ‖Δ‖


@dataclass(frozen=True)
class Loaded:
    """One pair's weights as the methods see them."""

    skeleton: torch.nn.Module  # the tuned model's start on M_j: what every method's weights are loaded into
    new_start: dict  # its state (a LoRA model's merged)
    delta: dict  # Δ_i: the tuned model's update against its own start on M_i, on the updated names
    old_start: dict  # the start on M_i
    kept: dict  # the entries carried as tuned (the head; LayerNorms under pet_norms "absolute")


def _merged(state: dict, meta: dict) -> dict:
    """A LoRA model's state with its update folded into the base weights (other types as they are)."""
    return pet.merge_lora(state, pet.lora_scaling(meta["pet"])) if meta["tuning_type"] == "lora" else state


class PairWeights:
    """Δ_i of one (task, type, seed) and the start weights on M_i and M_j, loaded on first use (so that a failure
    to load is the failing cell's), shared by the pair's methods."""

    def __init__(self, ctx: Context, cell):
        self.ctx, self.cell = ctx, cell

    @cached_property
    def meta(self) -> dict:
        return artifacts.tuned_meta(self.ctx.store, self.cell.source_tuned_hash)

    @cached_property
    def _loaded(self) -> Loaded:
        store, meta = self.ctx.store, self.meta
        tuned, _ = artifacts.load_tuned(store, self.cell.source_tuned_hash)
        tuned_state = _merged(clone_state(tuned), meta)
        old_start = _merged(clone_state(artifacts.tuning_start(store, meta)), meta)
        skeleton = artifacts.tuning_start(store, meta, on_plm=self.cell.target_plm_hash).eval()
        carried = self._carried(tuned)
        return Loaded(skeleton, _merged(clone_state(skeleton), meta), update_of(tuned_state, old_start, carried),
                      old_start, {k: tuned_state[k] for k in carried})

    def _carried(self, model) -> set[str]:
        """The entries every method keeps as tuned: the head, and trained LayerNorms under pet_norms "absolute"."""
        heads = architectures.of(model).head_prefixes
        names = {n for n in model.state_dict() if n.startswith(heads)}
        if self.ctx.study.tuning.pet_norms == "absolute":
            names |= pet.trained_norms(model)
        return names

    @cached_property
    def history(self) -> tuple[dict, ...]:
        """Δ_0 … Δ_{i-1}: each earlier version's update against its own start, on the same names."""
        carried = set(self._loaded.kept)
        out = []
        for tuned_hash in self.cell.history:
            model, meta = artifacts.load_tuned(self.ctx.store, tuned_hash)
            start = _merged(clone_state(artifacts.tuning_start(self.ctx.store, meta)), meta)
            out.append(update_of(_merged(clone_state(model), meta), start, carried))
        return tuple(out)

    @cached_property
    def data(self):
        return encoded_task(self.ctx, self.cell.task)

    def not_applicable(self, cell) -> str | None:
        return transfer_not_applicable(cell.method, self.meta["tuning_type"], len(cell.history) + 1)

    def _inputs(self, cell) -> transfer.TransferInputs:
        w = self._loaded
        history = self.history if cell.method == "multi_version" else ()
        return transfer.TransferInputs(w.delta, w.old_start, w.new_start, history, cell.seed)

    def start_state(self) -> dict:
        """The start's state on M_j that every method's weights are added to (a recycled model is stored as the
        entries that differ from it)."""
        return self._loaded.new_start

    def transferred(self, cell, setting: dict):
        """The model `cell`'s method makes for M_j with `setting` (a tuning start: the methods' transfer_init)."""
        self._load(transfer.METHODS[cell.method].fn(self._inputs(cell), **setting))
        return self._loaded.skeleton

    def score(self, cell) -> list[Scored]:
        """Every setting of the method's grid on dev; the best (dev accuracy, then dev loss, then grid order) also
        on test, its weights made again (every method is deterministic given the cell's seed): holding the best
        setting's weights beside the current ones would double the pair's memory at the paper's scale."""
        w, inputs, method = self._loaded, self._inputs(cell), transfer.METHODS[cell.method]
        history = inputs.history
        rows = []
        for setting in self.ctx.study.transfer.grid(cell.method):
            moved = method.fn(inputs, **setting)
            self._load(moved)
            rows.append((setting, self._split(w.skeleton, "dev"), transfer.relative_change(w.delta, moved)))
        best = max(range(len(rows)), key=lambda n: (rows[n][1][0], -rows[n][1][1], -n))
        self._load(method.fn(inputs, **rows[best][0]))
        test = self._split(w.skeleton, "test")
        return [Scored(setting, {"dev_accuracy": dev[0], "dev_loss": dev[1],
                                 **({"test_accuracy": test[0], "test_loss": test[1]} if n == best else {})},
                       n == best, len(history) + 1, change)
                for n, (setting, dev, change) in enumerate(rows)]

    def _load(self, moved: dict) -> None:
        w = self._loaded
        state = {**w.new_start, **{k: w.new_start[k] + v for k, v in moved.items()}, **w.kept}
        w.skeleton.load_state_dict(state, strict=True)

    def _split(self, model, split: str) -> tuple[float, float]:
        data, device = self.data, self.ctx.device
        model.to(device)
        return evaluate(model, *data.encoded[split], self.ctx.study.pilot.eval_batch_size, data.pad_id, device)


def update_of(tuned: dict, start: dict, carried: set[str]) -> dict[str, torch.Tensor]:
    """Δ = tuned − start over the floating entries tuning changed, the carried ones and a LoRA model's factors (zero
    in a merged state's effect) aside: for fine-tuning the whole backbone, for LoRA the merged base weights, for an
    adapter its module (against its seeded init) and, under pet_norms "delta", its LayerNorms."""
    return {k: v - start[k] for k, v in tuned.items()
            if v.is_floating_point() and k not in carried and "lora_" not in k and not torch.equal(v, start[k])}

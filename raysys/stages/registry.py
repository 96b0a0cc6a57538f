"""The stages of a study, in the order they run (each consumes what the earlier ones made). A stage is one module —
its cells, its done rule, its run code — and one entry here."""

from __future__ import annotations

import importlib

from raysys.stages import (
    compatibility,
    interpolation,
    methods,
    pretrain,
    recycle,
    search,
    similarity,
    training_free,
    transfer,
    tuning,
)
from raysys.stages.base import Stage

# transfer before methods: a transferred start (transfer_init) begins from the setting the transfer stage chose
STAGES: tuple[Stage, ...] = (pretrain.STAGE, tuning.STAGE, compatibility.STAGE, interpolation.STAGE, similarity.STAGE,
                             transfer.STAGE, methods.STAGE, search.STAGE, training_free.STAGE, recycle.STAGE)
NAMES = tuple(stage.name for stage in STAGES)
_BY_NAME = {stage.name: stage for stage in STAGES}


def stage(name: str, module: str | None = None) -> Stage:
    """The stage called `name`: one of the study's, or one defined in `module` (a stage of another package — a
    benchmark's — that a trial process finds by importing the module its launcher named)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    found = [s for s in vars(importlib.import_module(module)).values()
             if isinstance(s, Stage) and s.name == name] if module else []
    if not found:
        raise KeyError(f"unknown stage '{name}'; stages: {list(NAMES)}" + (f" (none in {module})" if module else ""))
    return found[0]


def origin(stage: Stage) -> dict:
    """What a trial needs besides the stage's name to find it (`stage(name, module)`): nothing for the study's own
    stages, the defining module for any other."""
    return {} if _BY_NAME.get(stage.name) is stage else {"module": type(stage).__module__}

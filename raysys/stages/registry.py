"""The stages of a study, in the order they run (each consumes what the earlier ones made). A stage is one module —
its cells, its done rule, its run code — and one entry here."""

from __future__ import annotations

from raysys.stages import (
    compatibility,
    interpolation,
    methods,
    pretrain,
    search,
    similarity,
    training_free,
    tuning,
)
from raysys.stages.base import Stage

STAGES: tuple[Stage, ...] = (pretrain.STAGE, tuning.STAGE, compatibility.STAGE, interpolation.STAGE, similarity.STAGE,
                             methods.STAGE, search.STAGE, training_free.STAGE)
NAMES = tuple(stage.name for stage in STAGES)
_BY_NAME = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    if name not in _BY_NAME:
        raise KeyError(f"unknown stage '{name}'; stages: {list(NAMES)}")
    return _BY_NAME[name]

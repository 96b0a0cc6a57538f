"""A stage whose cells do nothing, for measuring what the launcher itself costs per cell (bench/compare.py). Its
trials find it by module (`raysys.stages.registry.stage(name, module)`), so `bench/` must be on their path."""

from __future__ import annotations

from dataclasses import dataclass

from ray import tune

from raysys.stages.base import Resources, Stage


@dataclass(frozen=True)
class NoopCell:
    cell_hash: str


class NoopStage(Stage):
    name = "noop"
    tables = ()
    cell_types = (NoopCell,)
    light = True  # the lightest cell there is: the launcher shares trials among them as it does for evaluations

    def plan(self, study, chain) -> list:
        return []

    def outputs(self, cell):
        return ()

    def done(self, cell, view) -> bool:
        return False  # no outputs: every cell of a trial runs (its nothing)

    def resources(self, study) -> Resources:
        return Resources(cpus=1.0)

    def run(self, ctx, cell) -> None:
        pass


STAGE = NoopStage()


def plain_trial(config: dict) -> None:
    """The same nothing as a plain Tune function trainable."""
    tune.report({"cells_ok": 1})

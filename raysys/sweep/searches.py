"""Many Optuna searches as one Tune experiment. The search stage has one search per grid cell (288 at the paper's
scale); one Tune run per search would run them one after another, leaving the cluster idle while a search waits
for its last trials. Here every search keeps its own seeded TPE sampler and its own trials, and Tune schedules the
trials of all of them together, as many at once as the cluster (and what the autoscaler adds) holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

SEARCH_KEY = "search"  # the config entry naming which search proposed a trial


@dataclass(frozen=True)
class SearchSpec:
    """One search: its key (the encoded search cell), knob -> (low, high, log scale), budget left, the seed of
    its sampler, and its trials already finished (knobs, metric), told to the sampler before it proposes."""

    key: dict
    space: dict[str, tuple[float, float, bool]]
    budget: int
    seed: int
    finished: tuple[tuple[dict, float], ...] = ()


def _sampler(spec: SearchSpec, metric: str) -> OptunaSearch:
    from optuna.distributions import FloatDistribution

    space = {knob: FloatDistribution(low, high, log=log) for knob, (low, high, log) in spec.space.items()}
    finished = list(spec.finished)
    return OptunaSearch(space=space, metric=metric, mode="max", seed=spec.seed,
                        points_to_evaluate=[knobs for knobs, _ in finished] or None,
                        evaluated_rewards=[value for _, value in finished] or None)


class ParallelSearches(Searcher):
    """Proposes the next trial from the search with the fewest trials in flight (ties: the fewest proposed, then
    plan order) that has budget left and fewer than `parallel` in flight; hands each result back to the search
    that proposed it. FINISHED once every budget is proposed."""

    def __init__(self, specs: list[SearchSpec], metric: str, parallel: int):
        super().__init__(metric=metric, mode="max")
        self.specs, self.parallel = specs, parallel
        self.samplers = [_sampler(spec, metric) for spec in specs]
        self.proposed = [0] * len(specs)
        self.in_flight: list[set[str]] = [set() for _ in specs]
        self.owner: dict[str, int] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # every search's space is its own, set above

    def suggest(self, trial_id: str):
        open_ = [i for i, spec in enumerate(self.specs) if self.proposed[i] < spec.budget]
        if not open_:
            return Searcher.FINISHED
        ready = [i for i in open_ if len(self.in_flight[i]) < self.parallel]
        if not ready:
            return None  # asked again when a trial completes
        i = min(ready, key=lambda k: (len(self.in_flight[k]), self.proposed[k], k))
        knobs = self.samplers[i].suggest(trial_id)
        self.proposed[i] += 1
        self.in_flight[i].add(trial_id)
        self.owner[trial_id] = i
        return {SEARCH_KEY: self.specs[i].key, **knobs}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.samplers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        i = self.owner.get(trial_id)
        if i is None:
            return
        self.in_flight[i].discard(trial_id)
        self.samplers[i].on_trial_complete(trial_id, result=result, error=error)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Nothing to save: a rerun rebuilds every search from the store's finished trials, never from Tune's
        experiment state."""

"""The plan every stage builds on: the PLM chains (main M0 → … → Mk and the control chain), the pairs of tuned
models the pilot studies compare, and the checks that the chain's checkpoints can be recycled between at all."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from raysys.config import ConfigError, ModelConfig, StudyConfig
from raysys.identity import checkpoint_identity, config_hash, data_spec, identity, tuned_hash, world_if_builtin
from raysys.storage.store import Store, atomic_write_bytes


@dataclass(frozen=True)
class Link:
    """One PLM of a chain: `chain` is "main" or "control", `index` the corpus (`domain`) it was last trained on."""

    chain: str
    index: int
    plm_hash: str
    parent: str | None
    seed: int
    checkpoint: str | None  # the pretrained checkpoint an index-0 link starts from (None: from scratch)
    domain: str

    @property
    def cell_hash(self) -> str:
        return self.plm_hash


@dataclass(frozen=True)
class ChainPlan:
    """The PLMs of one main chain (and the control chain); `replicates`: the main chain again from each of
    `pretrain.replicate_seeds`, each a plan of its own that shares this one's tokenizer and control chain."""

    tokenizer_hash: str
    links: tuple[Link, ...]
    seed: int  # the main chain's (an M0 it shares with another chain keeps that chain's: it is that PLM)
    replicates: tuple[ChainPlan, ...] = ()

    def hashes(self, chain: str = "main") -> tuple[str, ...]:
        return tuple(link.plm_hash for link in self.links if link.chain == chain)

    @property
    def plm_hashes(self) -> tuple[str, ...]:
        """M0 .. Mk of the main chain."""
        return self.hashes("main")

    def replicas(self) -> tuple[ChainPlan, ...]:
        """This main chain (without its replicates), then each replicate chain."""
        return (dataclasses.replace(self, replicates=()), *self.replicates)

    def replica(self, seed: int) -> ChainPlan:
        found = [plan for plan in self.replicas() if plan.seed == seed]
        if not found:
            raise ValueError(f"no main chain of seed {seed} (pretrain.seed and replicate_seeds: "
                             f"{[plan.seed for plan in self.replicas()]})")
        return found[0]

    @property
    def all_links(self) -> tuple[Link, ...]:
        """Every PLM of every replica, each once, parents first."""
        return tuple({link.plm_hash: link for plan in self.replicas() for link in plan.links}.values())

    def link(self, plm_hash: str) -> Link:
        return next(link for link in self.all_links if link.plm_hash == plm_hash)


def _chain(study: StudyConfig, tokenizer_hash: str, name: str, length: int, seed: int,
           checkpoint: str | None, fingerprint: str, origin: Link | None = None) -> list[Link]:
    """The links of one chain; `origin`: an M0 it shares with another chain (a checkpoint kept as it is)."""
    first_corpus = study.corpora[0]
    recipe = {k: v for k, v in identity(chain_config(study, seed)).items() if k != "replicate_seeds"}
    initial = {k: v for k, v in recipe.items() if k not in ("continual_steps", "continual_lr", "replay")}
    continual = {k: v for k, v in recipe.items() if k not in ("initial_steps", "lr")}
    # identity(): the architecture enters only when it is not RoBERTa, so the RoBERTa chains keep their hashes
    model = identity(dataclasses.replace(study.model, name_or_path=checkpoint_identity(checkpoint, fingerprint)))
    # M0 kept as it is (0 steps) has never seen D0: D0 is then no part of it (and need not exist)
    trained = study.pretrain.initial_steps > 0
    first = config_hash("plm", model, tokenizer_hash, data_spec(first_corpus) if trained else None,
                        world_if_builtin(study, first_corpus.source) if trained else None, initial)
    links = [origin or Link(name, 0, first, None, seed, checkpoint, first_corpus.name)]
    for index, corpus in enumerate(study.corpora[1:length], start=1):
        # a link with nothing to replay trains as without replay: the same PLM, so the same hash
        recipe = continual if replay_sources(study, index) else {k: v for k, v in continual.items() if k != "replay"}
        plm_hash = config_hash("plm", links[-1].plm_hash, data_spec(corpus), world_if_builtin(study, corpus.source),
                               recipe)
        links.append(Link(name, index, plm_hash, links[-1].plm_hash, seed, None, corpus.name))
    return links


def chain_config(study: StudyConfig, seed: int):
    """The pre-training settings of the chain of `seed`: its seed drives initialisation, data order and masking of
    every link of that chain."""
    return dataclasses.replace(study.pretrain, seed=seed, replicate_seeds=())


def replay_sources(study: StudyConfig, index: int) -> list[int]:
    """The corpora link `index` replays under `pretrain.replay`: the earlier links' domains D1…D_index−1 (not D0,
    the general corpus every link's vocabulary comes from: the domains are what an upgrade forgets). M1 replays
    nothing, so it is the same PLM in both regimes."""
    return list(range(1, index)) if study.pretrain.replay else []


def plan_chain(study: StudyConfig) -> ChainPlan:
    """The main chain M0 → … → Mk and the control chain M0' → … (another origin, the same continual data)."""
    first_corpus = study.corpora[0]
    m, pilot = study.model, study.pilot
    tokenizer_hash = config_hash("tokenizer", checkpoint_identity(m.name_or_path, m.checkpoint_fingerprint) or
                                 [m.vocab_size, data_spec(first_corpus), world_if_builtin(study, first_corpus.source)])
    main = _chain(study, tokenizer_hash, "main", len(study.corpora), study.pretrain.seed, m.name_or_path,
                  m.checkpoint_fingerprint)
    control = _chain(study, tokenizer_hash, "control", study.control_length, pilot.control_seed,
                     pilot.control_name_or_path, pilot.control_checkpoint_fingerprint) if study.control_length else []
    # a checkpoint kept as it is (0 initial steps) is the same M0 whatever the chain's seed: replicates share it
    shared = main[0] if m.name_or_path and study.pretrain.initial_steps == 0 else None
    replicates = tuple(
        ChainPlan(tokenizer_hash, tuple(_chain(study, tokenizer_hash, "main", len(study.corpora), seed, m.name_or_path,
                                               m.checkpoint_fingerprint, shared) + control), seed)
        for seed in study.pretrain.replicate_seeds)
    return ChainPlan(tokenizer_hash, tuple(main + control), study.pretrain.seed, replicates)


def planned_cells(stage, study: StudyConfig, chain: ChainPlan) -> list:
    """A stage's cells on the main chain and on each replicate chain (`pretrain.replicate_seeds`), each once:
    a stage plans one chain; what replicas share (the control chain, a shared M0) is planned once."""
    cells = {}
    for replica in chain.replicas():
        for cell in stage.plan(study, replica):
            cells.setdefault(cell.cell_hash, cell)
    return list(cells.values())


def pilot_hops(study: StudyConfig) -> list[tuple[int, int]]:
    """(i, i + h) for every hop h of the pilot studies between two tuned PLMs of the main chain."""
    return list(study.pilot_pairs)


def control_indices(study: StudyConfig) -> list[int]:
    """The control-chain PLMs some control pair needs (and so the tuning stage tunes)."""
    return sorted({j for _, j in pilot_hops(study) if j < study.control_length})


def task_grid(study: StudyConfig):
    """(task, tuning type, seed) of every tuned model of one PLM."""
    for task in study.tasks:
        for tuning_type in study.tuning.types:
            for seed in study.seeds:
                yield task, tuning_type, seed


@dataclass(frozen=True)
class Pair:
    """Two tuned models the interpolation and similarity stages compare: tuned M_i and tuned M_j of the main chain
    ("continual"), tuned M_i and the control chain's tuned C_j ("control": no shared pre-training history), or two
    seeds tuned on one M_i ("same_plm": the classic mode-connectivity floor; `seed` is end a's, `seed_b` end
    b's — equal in the other kinds)."""

    pair_hash: str
    pair_kind: str
    task: str
    tuning_type: str
    seed: int
    plm_index_a: int
    plm_index_b: int
    chain_b: str
    tuned_hash_a: str
    tuned_hash_b: str
    seed_b: int


def plan_pairs(study: StudyConfig, chain: ChainPlan) -> list[Pair]:
    """The continual pair of each hop, the control pair where the control chain reaches j, and the same-PLM
    reference pairs on each hop's M_i (`pilot.reference_pairs`)."""
    pairs = []
    for i, j in pilot_hops(study):
        ends = [("continual", "main")] + ([("control", "control")] if j < study.control_length else [])
        for kind, chain_b in ends:
            plm_a, plm_b = chain.plm_hashes[i], chain.hashes(chain_b)[j]
            for task, tuning_type, seed in task_grid(study):
                a = tuned_hash(study, plm_a, task, tuning_type, seed)
                b = tuned_hash(study, plm_b, task, tuning_type, seed)
                pairs.append(Pair(config_hash("pair", a, b), kind, task.name, tuning_type, seed, i, j, chain_b, a, b,
                                  seed))
    return pairs + (same_plm_pairs(study, chain) if study.pilot.reference_pairs else [])


def seed_couples(seeds: tuple[int, ...]) -> list[tuple[int, int]]:
    """Which seeds pair up on one PLM: each with the next, and the last with the first from three seeds on, so
    that every seed has a reference (two seeds make one pair: a path and its reverse are one path)."""
    couples = list(itertools.pairwise(seeds))
    return couples + [(seeds[-1], seeds[0])] if len(seeds) > 2 else couples


def same_plm_pairs(study: StudyConfig, chain: ChainPlan) -> list[Pair]:
    """Two seeds tuned on the M_i of every hop: how connected two tuned models are with no upgrade between them."""
    pairs = []
    for i in sorted({i for i, _ in pilot_hops(study)}):
        plm = chain.plm_hashes[i]
        for task in study.tasks:
            for tuning_type in study.tuning.types:
                for seed, seed_b in seed_couples(study.seeds):
                    a = tuned_hash(study, plm, task, tuning_type, seed)
                    b = tuned_hash(study, plm, task, tuning_type, seed_b)
                    pairs.append(Pair(config_hash("pair", a, b), "same_plm", task.name, tuning_type, seed, i, i,
                                      "main", a, b, seed_b))
    return pairs


# ------------------------------------------------------------------------------------------------ checking


def check_same_architecture(named: dict[str, str | Path]) -> None:
    """Refuse, before any trial starts, to recycle weights between checkpoints whose architecture or vocabulary
    differ (name -> checkpoint path or hub name); the error names both and the first differing field."""
    from raysys.core import models  # transformers: only where checkpoints are compared
    from raysys.core.recycle import WeightMismatchError

    shapes = {name: models.architecture(path) for name, path in named.items()}
    (first, reference), *others = shapes.items()
    for name, shape in others:
        for field in models.ARCHITECTURE_FIELDS:
            if shape[field] != reference[field]:
                raise WeightMismatchError(
                    f"{first} and {name} differ in {field} ({reference[field]} vs {shape[field]}): deltas, "
                    "interpolation and PET modules need one architecture and one vocabulary")


def _plm_config_folder(store: Store, plm_hash: str) -> Path:
    """A folder holding only the PLM's config.json: enough to compare architectures without fetching weights."""
    if not store.remote:
        return store.artifact("plm", plm_hash)
    folder = store.local / "configs" / plm_hash
    atomic_write_bytes(folder / "config.json", store.artifact_file("plm", plm_hash, "config.json"))
    return folder


def check_checkpoint_types(study: StudyConfig) -> None:
    """A pretrained origin's architecture is its config.json's `model_type`: one of the table's, and the one
    `model.architecture` names when that is set away from its default."""
    from raysys.core import architectures

    origins = {"model.name_or_path": study.model.name_or_path,
               "pilot.control_name_or_path": study.pilot.control_name_or_path if study.control_length else None}
    for where, path in origins.items():
        if not path:
            continue
        model_type = architectures.checkpoint_type(path, where=f"{where} ({path})")
        if study.model.architecture not in (ModelConfig().architecture, model_type):
            raise ConfigError(f"model.architecture: '{study.model.architecture}', but {where} ({path}) is a "
                              f"'{model_type}' checkpoint")


def preflight(study: StudyConfig, store: Store, chain: ChainPlan) -> None:
    """Checks that need checkpoints: pretrained origins are of a known architecture, the control origin matches the
    main chain, and every PLM already in the store shares one architecture (a store reused across studies could mix
    them)."""
    check_checkpoint_types(study)
    named = {}
    for link in chain.all_links:
        if store.has_artifact("plm", link.plm_hash):
            try:
                named[f"plm {link.chain}[{link.index}]"] = _plm_config_folder(store, link.plm_hash)
            except FileNotFoundError:  # spoiled: set aside (CorruptArtifact), so its link is made again
                continue
    if study.pilot.control_name_or_path and study.control_length:
        main = study.model.name_or_path
        named = {f"model.name_or_path ({main})": main,
                 f"pilot.control_name_or_path ({study.pilot.control_name_or_path})": study.pilot.control_name_or_path,
                 **named}
    if len(named) > 1:
        check_same_architecture(named)

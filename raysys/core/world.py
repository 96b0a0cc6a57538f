"""A built-in, offline, deterministic multi-domain world: corpora for masked-LM pre-training and relation tasks.

Why it is built this way: the paper's phenomena only appear when domain pre-training teaches something the task needs
and the small task training set cannot teach by itself (tests/core/test_world.py checks that it does).

- All domains share one general language: English function words and a general pseudo-word vocabulary.
- Domain d (1..N) has its own content vocabulary and its own latent world: entities of latent classes, and a
  relation table R_d[class(e1), class(e2)] -> relation. Its corpus states class facts ("e is a <class noun>") and
  relation facts ("e1 <relation verb> e2"), each wrong with probability `fact_noise`.
- The task of domain d asks for the relation between two entities from a sentence that never states it, so the
  label is a function of knowledge the corpus holds. Train/dev/test use disjoint entity pairs.
- The general domain D0 mentions every domain word in class-neutral sentences, so the tokenizer trained on D0 knows
  the entity names (as a general tokenizer knows "aspirin") while M0 learns nothing about their classes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from raysys.config import WorldConfig

FUNCTION_WORDS = ["the", "a", "of", "and", "in", "with", "was", "is", "that", "to", "by", "from", "this", "it", "were", "as", "on", "for", "are", "be", "has", "not", "its", "which", "at"]
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Domain:
    name: str
    entities: tuple[str, ...]
    entity_class: dict
    class_nouns: tuple[str, ...]
    relation_verbs: tuple[tuple[str, str], ...]  # two synonyms per relation label
    context_nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    relation_table: tuple[tuple[int, ...], ...]  # (num_classes, num_classes) -> label index


@dataclass(frozen=True)
class World:
    config: WorldConfig
    general_nouns: tuple[str, ...]
    general_verbs: tuple[str, ...]
    general_adjectives: tuple[str, ...]
    domains: tuple[Domain, ...]  # d1..dN; D0 is the general language

    def domain(self, name: str) -> Domain:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"no builtin domain '{name}'; have d0 and {[d.name for d in self.domains]}")


class _WordMaker:
    """Unique pseudo-words from consonant-vowel syllables (the shared phonology every domain draws from)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used = set(FUNCTION_WORDS)

    def words(self, count: int, syllables: tuple[int, int]) -> tuple[str, ...]:
        out = []
        while len(out) < count:
            n = self.rng.randint(*syllables)
            word = "".join(self.rng.choice(_CONSONANTS) + self.rng.choice(_VOWELS) for _ in range(n))
            if word not in self.used:
                self.used.add(word)
                out.append(word)
        return tuple(out)


def _balanced_relation_table(rng: random.Random, num_classes: int, num_labels: int) -> tuple[tuple[int, ...], ...]:
    cells = num_classes * num_classes
    labels = [i % num_labels for i in range(cells)]
    rng.shuffle(labels)
    return tuple(tuple(labels[r * num_classes : (r + 1) * num_classes]) for r in range(num_classes))


@lru_cache(maxsize=8)
def build_world(config: WorldConfig) -> World:
    """The world is a pure function of its config (and so of its seed)."""
    rng = random.Random(config.seed)
    maker = _WordMaker(rng)
    general = (maker.words(60, (2, 3)), maker.words(30, (2, 3)), maker.words(30, (2, 3)))
    domains = []
    for d in range(1, config.num_domains + 1):
        entities = maker.words(config.num_classes * config.entities_per_class, (2, 3))
        classes = [i % config.num_classes for i in range(len(entities))]
        rng.shuffle(classes)
        verbs = maker.words(2 * config.num_labels, (2, 3))
        domains.append(
            Domain(
                name=f"d{d}",
                entities=entities,
                entity_class=dict(zip(entities, classes)),
                class_nouns=maker.words(config.num_classes, (2, 3)),
                relation_verbs=tuple((verbs[2 * i], verbs[2 * i + 1]) for i in range(config.num_labels)),
                context_nouns=maker.words(20, (2, 3)),
                adjectives=maker.words(10, (2, 3)),
                relation_table=_balanced_relation_table(rng, config.num_classes, config.num_labels),
            )
        )
    return World(config, *general, tuple(domains))


def _general_sentence(world: World, rng: random.Random) -> str:
    n, v, a = world.general_nouns, world.general_verbs, world.general_adjectives
    frames = (
        lambda: f"the {rng.choice(a)} {rng.choice(n)} {rng.choice(v)} the {rng.choice(n)} .",
        lambda: f"a {rng.choice(n)} was {rng.choice(a)} and the {rng.choice(n)} was not .",
        lambda: f"it is {rng.choice(a)} that the {rng.choice(n)} {rng.choice(v)} with a {rng.choice(n)} .",
        lambda: f"in this {rng.choice(n)} , the {rng.choice(n)} {rng.choice(v)} by the {rng.choice(a)} {rng.choice(n)} .",
    )
    return rng.choice(frames)()


def _domain_words(dom: Domain) -> tuple[str, ...]:
    verbs = tuple(v for pair in dom.relation_verbs for v in pair)
    return dom.entities + dom.class_nouns + verbs + dom.context_nouns + dom.adjectives


def _neutral_mention(world: World, rng: random.Random) -> str:
    entity = rng.choice(_domain_words(rng.choice(world.domains)))
    n, v = world.general_nouns, world.general_verbs
    frames = (
        f"the {rng.choice(n)} on {entity} was {rng.choice(v)} in a {rng.choice(n)} .",
        f"a {rng.choice(n)} about {entity} is in the {rng.choice(n)} .",
        f"{entity} was the name of the {rng.choice(n)} .",
    )
    return rng.choice(frames)


def general_corpus(world: World) -> list[str]:
    """D0: general language, plus class-neutral mentions of every domain word (one sentence in three) — entity
    names, class nouns and relation verbs appear, but never in a sentence that relates them."""
    rng = random.Random(f"{world.config.seed}-d0")
    return [
        _neutral_mention(world, rng) if i % 3 == 2 else _general_sentence(world, rng)
        for i in range(world.config.general_sentences)
    ]


def _maybe_noisy(rng: random.Random, true_index: int, count: int, noise: float) -> int:
    return rng.randrange(count) if rng.random() < noise else true_index


def _class_fact(dom: Domain, rng: random.Random, noise: float) -> str:
    e = rng.choice(dom.entities)
    noun = dom.class_nouns[_maybe_noisy(rng, dom.entity_class[e], len(dom.class_nouns), noise)]
    frames = (
        f"{e} is a {noun} .",
        f"the {rng.choice(dom.adjectives)} {noun} {e} was in the {rng.choice(dom.context_nouns)} .",
        f"as a {noun} , {e} has a {rng.choice(dom.adjectives)} {rng.choice(dom.context_nouns)} .",
    )
    return rng.choice(frames)


def _relation_fact(dom: Domain, rng: random.Random, noise: float) -> str:
    e1, e2 = rng.sample(dom.entities, 2)
    label = dom.relation_table[dom.entity_class[e1]][dom.entity_class[e2]]
    verb = rng.choice(dom.relation_verbs[_maybe_noisy(rng, label, len(dom.relation_verbs), noise)])
    frames = (
        f"{e1} {verb} {e2} .",
        f"in the {rng.choice(dom.context_nouns)} , {e1} {verb} {e2} .",
        f"the {rng.choice(dom.adjectives)} {e1} {verb} {e2} with {rng.choice(dom.context_nouns)} .",
    )
    return rng.choice(frames)


def domain_corpus(world: World, name: str) -> list[str]:
    """D1..DN: class facts (45%), relation facts (50%) and domain filler (5%), with noise."""
    if name == "d0":
        return general_corpus(world)
    dom = world.domain(name)
    rng = random.Random(f"{world.config.seed}-{name}")
    noise = world.config.fact_noise
    out = []
    for _ in range(world.config.domain_sentences):
        u = rng.random()
        if u < 0.45:
            out.append(_class_fact(dom, rng, noise))
        elif u < 0.95:
            out.append(_relation_fact(dom, rng, noise))
        else:
            out.append(f"the {rng.choice(dom.context_nouns)} was {rng.choice(dom.adjectives)} .")
    return out


_TASK_FRAMES = (
    "{e1} and {e2} were in the same {n} .",
    "a {n} with {e1} and {e2} was {v} .",
    "the {n} has {e1} as well as {e2} .",
)


def task_label_names(world: World) -> list[str]:
    return [f"rel{i}" for i in range(world.config.num_labels)]


def task_splits(world: World, name: str) -> dict[str, list[dict]]:
    """The relation task of domain `name`: {"train"|"dev"|"test": [{"text", "label"}]}, disjoint entity pairs.
    The text never states the relation; the label is R[class(e1)][class(e2)]."""
    dom = world.domain(name)
    cfg = world.config
    rng = random.Random(f"{cfg.seed}-{name}-task")
    pairs = [(a, b) for a in dom.entities for b in dom.entities if a != b]
    rng.shuffle(pairs)
    labels = task_label_names(world)
    sizes = {"train": cfg.task_train, "dev": cfg.task_dev, "test": cfg.task_test}
    out, start = {}, 0
    for split, size in sizes.items():
        rows = []
        for e1, e2 in pairs[start : start + size]:
            frame = rng.choice(_TASK_FRAMES)
            text = frame.format(e1=e1, e2=e2, n=rng.choice(world.general_nouns), v=rng.choice(world.general_verbs))
            rows.append({"text": text, "label": labels[dom.relation_table[dom.entity_class[e1]][dom.entity_class[e2]]]})
        out[split] = rows
        start += size
    return out


def entity_class_probe(embeddings, world: World, domain: str, tokenizer) -> float:
    """Leave-one-out nearest-centroid accuracy of an entity's latent class from its (single-token) input embedding:
    a seconds-cheap check that pre-training learned the domain's world (chance = 1 / num_classes)."""
    import torch

    dom = world.domain(domain)
    ids = [tokenizer(" " + e, add_special_tokens=False)["input_ids"] for e in dom.entities]
    vectors = torch.stack([embeddings[i].mean(0) for i in ids]).float()  # (entities, hidden)
    vectors = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=-1)
    classes = torch.tensor([dom.entity_class[e] for e in dom.entities])
    correct = 0
    for i in range(len(vectors)):
        keep = torch.arange(len(vectors)) != i
        centroids = torch.stack([vectors[keep & (classes == c)].mean(0) for c in range(world.config.num_classes)])
        correct += int((centroids @ vectors[i]).argmax() == classes[i])
    return correct / len(vectors)

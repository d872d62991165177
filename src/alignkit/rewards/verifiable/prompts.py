"""Seeded constraint prompts: a task about a topic, followed by the instructions of a combination of constraints.
The held-out set shares no topic and no combination of constraint types with the training set, so a gain there is
generalisation, not memory; the held-out-phrasings set also words every instruction differently from training
(constraints.HELD_OUT_PHRASINGS). `alignkit rl` ships files written by write_prompt_sets and a test regenerates them."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from alignkit.rewards.verifiable.constraints import (
    CHECKERS,
    describe,
    describe_training,
    n_phrasings,
    n_training_wordings,
    validate_constraints,
)

TASKS = ("Write a short description of {topic}.", "Tell me about {topic}.", "Explain {topic} to a child.",
         "Give me some advice about {topic}.", "What do you like about {topic}?", "Write a short note about {topic}.")
TOPICS = ("the ocean", "a rainy morning", "city parks", "learning to cook", "old libraries", "mountain hiking",
          "a quiet village", "winter evenings", "public transport", "house plants", "the night sky", "street markets",
          "a birthday party", "school gardens", "bicycles", "coffee shops", "a summer festival", "train journeys",
          "the desert", "a family dinner", "autumn leaves", "board games", "the beach", "a small bakery",
          "learning a language", "rivers", "a snowy forest", "museums", "a road trip", "pet dogs", "the moon",
          "bird watching", "a music lesson", "farm animals", "sunflowers", "a lighthouse", "kites", "honey bees",
          "a picnic", "science fairs", "lakes", "volcanoes", "a new job", "camping", "a thunderstorm", "bridges",
          "painting", "chess", "the post office", "a tea ceremony")
WORDS = ("river", "lantern", "garden", "silver", "window", "journey", "bright", "gentle")
COMMON = ("very", "really", "also", "many")
OPENINGS = ("In short", "Here is my answer", "Dear reader", "Well")
ENDINGS = ("That is all.", "Thank you.", "The end.")

# Arguments each type is drawn with.
ARGUMENTS = {
    "max_words": [{"n": n} for n in (10, 15, 20)], "min_words": [{"n": n} for n in (30, 40)],
    "max_sentences": [{"n": n} for n in (1, 2)], "min_sentences": [{"n": n} for n in (3, 4)],
    "max_capital_words": [{"n": 0}], "include": [{"words": [w]} for w in WORDS],
    "exclude": [{"words": [w]} for w in COMMON], "starts_with": [{"phrase": p} for p in OPENINGS],
    "ends_with": [{"phrase": p} for p in ENDINGS], "bullets": [{"n": n} for n in (2, 3)],
    "paragraphs": [{"n": n} for n in (2, 3)], "placeholders": [{"n": n} for n in (1, 2)],
    **{t: [{}] for t in ("lowercase", "uppercase", "no_commas", "quoted", "title", "json")},
}
# Pairs that contradict or make each other moot.
CONFLICTS = {frozenset(p) for p in [
    ("lowercase", "uppercase"), ("uppercase", "max_capital_words"), ("max_words", "min_words"),
    ("max_sentences", "min_sentences"), ("bullets", "paragraphs"), ("quoted", "starts_with"), ("quoted", "ends_with"),
    ("json", "bullets"), ("json", "paragraphs"), ("json", "quoted"), ("json", "title"), ("json", "starts_with"),
    ("json", "ends_with"), ("min_words", "max_sentences"), ("max_words", "min_sentences"), ("uppercase", "starts_with"),
    ("uppercase", "ends_with"), ("max_capital_words", "starts_with"), ("max_capital_words", "ends_with"),
    ("lowercase", "starts_with"), ("lowercase", "ends_with"), ("lowercase", "title"), ("bullets", "max_sentences"),
]}


def combinations(types: tuple[str, ...], size: int) -> list[tuple[str, ...]]:
    """Every combination of `size` distinct types with no conflicting pair, in a fixed order."""
    return [c for c in itertools.combinations(sorted(types), size)
            if not any(frozenset(p) in CONFLICTS for p in itertools.combinations(c, 2))]


def make_record(rng: random.Random, topic: str, combo: tuple[str, ...], held_out_phrasing: bool = False) -> dict:
    """One prompt; its instructions in the training wording, or each in a held-out phrasing drawn from rng."""
    constraints = validate_constraints([{"type": t, **rng.choice(ARGUMENTS[t])} for t in combo])
    task = rng.choice(TASKS).format(topic=topic)
    wordings = [rng.randrange(1, n_phrasings(c["type"])) if held_out_phrasing else 0 for c in constraints]
    text = " ".join([task, *(describe(c, k) for c, k in zip(constraints, wordings))])
    return {"prompt": [{"role": "user", "content": text}], "constraints": constraints}


def _check_types(types: tuple[str, ...]) -> None:
    unknown = [t for t in types if t not in CHECKERS]
    if unknown:
        raise ValueError(f"unknown constraint types {unknown}; known: {', '.join(CHECKERS)}")


def split(rng: random.Random, types: tuple[str, ...], size: int, eval_share: float) -> tuple[list, list, list, list]:
    """(training combinations, held-out combinations, training topics, held-out topics), drawn from rng."""
    combos = combinations(types, size)
    rng.shuffle(combos)
    n_held = max(1, round(len(combos) * eval_share))
    held, train = combos[:n_held], combos[n_held:]
    missing = set(types) - {t for c in train for t in c}
    if missing or not train:
        raise ValueError(f"types {sorted(missing)} appear in no training combination; add types or lower eval_share")
    topics = list(TOPICS)
    rng.shuffle(topics)
    n_topics = max(1, round(len(topics) * eval_share))
    return train, held, topics[n_topics:], topics[:n_topics]


def prompt_sets(types: tuple[str, ...], n_train: int, n_eval: int, seed: int = 0, size: int = 2,
                eval_share: float = 0.25) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records over `types`: the combinations and the topics are split, eval_share of each held
    out; every type still appears in some training combination. Records cycle through their combinations."""
    _check_types(types)
    rng = random.Random(seed)
    train, held, train_topics, held_topics = split(rng, types, size, eval_share)

    def draw(pool_combos, pool_topics, n):
        return [make_record(rng, rng.choice(pool_topics), pool_combos[i % len(pool_combos)]) for i in range(n)]

    return draw(train, train_topics, n_train), draw(held, held_topics, n_eval)


def phrasing_set(train_types: tuple[str, ...], n: int, seed: int = 0, size: int = 2, eval_share: float = 0.25,
                 types: tuple[str, ...] = tuple(CHECKERS)) -> list[dict]:
    """Held-out-phrasings records for a training set made by prompt_sets(train_types, ..., seed, size, eval_share):
    every instruction in a held-out phrasing, topics from that split's held-out topics, combinations of `types` that
    are not among its training combinations. Record i has types[i % len(types)] in its combination, so every type
    appears."""
    _check_types(train_types + types)
    rng = random.Random(seed)
    seen, _, _, topics = split(rng, train_types, size, eval_share)
    pool = [c for c in combinations(types, size) if c not in set(seen)]
    by_type = {t: [c for c in pool if t in c] for t in types}
    lacking = [t for t, combos in by_type.items() if not combos]
    if lacking:
        raise ValueError(f"types {lacking} are in no combination training did not see; add types")
    records = []
    for i in range(n):
        combo = rng.choice(by_type[types[i % len(types)]])
        records.append(make_record(rng, rng.choice(topics), combo, held_out_phrasing=True))
    return records


def task_of(record: dict) -> str:
    """A prompt_sets record's task sentence: its text without the instructions in the training wording."""
    text, instructions = record["prompt"][0]["content"], " ".join(describe(c) for c in record["constraints"])
    if not text.endswith(" " + instructions):
        raise ValueError(f"not a prompt_sets record in the training wording: {text[:80]!r}")
    return text[:-len(instructions) - 1]


def vary_training(records: list[dict], seed: int = 0, wordings: bool = True, single_types: tuple[str, ...] = (),
                  single_every: int = 0) -> list[dict]:
    """Training records with more variety, drawn from their own rng so the held-out sets stay as they are: each
    instruction in one of its training wordings (constraints.TRAINING_PHRASINGS, the checker's own included) when
    `wordings`; and every single_every-th record's constraints replaced by one constraint of single_types (in turn,
    arguments drawn), on the same task, so types held out of the pairs are still trained (a single constraint is no
    held-out pair)."""
    _check_types(single_types)
    if single_types and single_every < 1:
        raise ValueError(f"single_every must be >= 1 with single_types, got {single_every!r}")
    rng, out = random.Random(f"training variety {seed}"), []
    for i, record in enumerate(records):
        constraints = record["constraints"]
        if single_types and i % single_every == single_every - 1:
            kind = single_types[(i // single_every) % len(single_types)]
            constraints = validate_constraints([{"type": kind, **rng.choice(ARGUMENTS[kind])}])
        chosen = [rng.randrange(n_training_wordings(c["type"])) if wordings else 0 for c in constraints]
        text = " ".join([task_of(record), *(describe_training(c, k) for c, k in zip(constraints, chosen))])
        out.append({"prompt": [{"role": "user", "content": text}], "constraints": constraints})
    return out


def write_prompt_sets(out_dir: str | Path, types: tuple[str, ...], n_train: int, n_eval: int, seed: int = 0,
                      variety: dict | None = None) -> None:
    """rl_train.jsonl (vary_training(..., **variety) when variety is given) and rl_eval.jsonl."""
    from alignkit.data.load import write_jsonl_atomic

    train, held = prompt_sets(types, n_train, n_eval, seed)
    train = vary_training(train, seed, **variety) if variety is not None else train
    write_jsonl_atomic(Path(out_dir) / "rl_train.jsonl", train)
    write_jsonl_atomic(Path(out_dir) / "rl_eval.jsonl", held)


def write_phrasing_set(out_dir: str | Path, train_types: tuple[str, ...], n: int, seed: int = 0) -> None:
    from alignkit.data.load import write_jsonl_atomic

    write_jsonl_atomic(Path(out_dir) / "rl_eval_phrasings.jsonl", phrasing_set(train_types, n, seed))

"""Seeded constraint prompts: a task about a topic, followed by the instructions of a combination of constraints.
The held-out set shares no topic and no combination of constraint types with the training set, so a gain there is
generalisation, not memory. `alignkit rl` ships files written by write_prompt_sets and a test regenerates them."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from alignkit.rewards.verifiable.constraints import CHECKERS, describe, validate_constraints

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


def make_record(rng: random.Random, topic: str, combo: tuple[str, ...]) -> dict:
    constraints = validate_constraints([{"type": t, **rng.choice(ARGUMENTS[t])} for t in combo])
    text = " ".join([rng.choice(TASKS).format(topic=topic), *(describe(c) for c in constraints)])
    return {"prompt": [{"role": "user", "content": text}], "constraints": constraints}


def prompt_sets(types: tuple[str, ...], n_train: int, n_eval: int, seed: int = 0, size: int = 2,
                eval_share: float = 0.25) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records over `types`: the combinations and the topics are split, eval_share of each held
    out; every type still appears in some training combination. Records cycle through their combinations."""
    unknown = [t for t in types if t not in CHECKERS]
    if unknown:
        raise ValueError(f"unknown constraint types {unknown}; known: {', '.join(CHECKERS)}")
    rng = random.Random(seed)
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
    held_topics, train_topics = topics[:n_topics], topics[n_topics:]

    def draw(pool_combos, pool_topics, n):
        return [make_record(rng, rng.choice(pool_topics), pool_combos[i % len(pool_combos)]) for i in range(n)]

    return draw(train, train_topics, n_train), draw(held, held_topics, n_eval)


def write_prompt_sets(out_dir: str | Path, types: tuple[str, ...], n_train: int, n_eval: int, seed: int = 0) -> None:
    from alignkit.data.load import write_jsonl_atomic

    train, held = prompt_sets(types, n_train, n_eval, seed)
    write_jsonl_atomic(Path(out_dir) / "rl_train.jsonl", train)
    write_jsonl_atomic(Path(out_dir) / "rl_eval.jsonl", held)

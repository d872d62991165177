"""A training file for `alignkit rl` over more constraint types than the shipped one: the recipe's 8 types plus
the five the base model already meets often (min_words, max_sentences, min_sentences, exclude, max_capital_words),
so training rewards keeping them. Combinations in neither shipped held-out file, topics of the shipped training file
only, the checkers' own wording (the held-out phrasings stay unseen). The pilot in docs/online.md:

    python benchmarks/rl_more_types.py /tmp/train13.jsonl
    alignkit rl --output_dir DIR --online.prompts /tmp/train13.jsonl

Not run in CI."""

from __future__ import annotations

import json
import random
import sys
from importlib import resources

from alignkit.recipes.rl import TYPES
from alignkit.rewards.verifiable.prompts import TOPICS, combinations, make_record

MORE = ("min_words", "max_sentences", "min_sentences", "exclude", "max_capital_words")


def shipped(name: str) -> list[dict]:
    text = (resources.files("alignkit") / "assets" / name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(out: str, n: int = 512, seed: int = 13) -> None:
    combo = lambda record: tuple(sorted(c["type"] for c in record["constraints"]))  # noqa: E731
    held = {combo(r) for r in shipped("rl_eval.jsonl") + shipped("rl_eval_phrasings.jsonl")}
    train = shipped("rl_train.jsonl")
    topics = [t for t in TOPICS if any(t in r["prompt"][0]["content"] for r in train)]
    combos = [c for c in combinations(TYPES + MORE, 2) if c not in held]
    rng = random.Random(seed)
    rng.shuffle(combos)
    records = [make_record(rng, rng.choice(topics), combos[i % len(combos)]) for i in range(n)]
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"{out}: {n} records, {len(combos)} combinations of {len(TYPES + MORE)} types, {len(topics)} topics")


if __name__ == "__main__":
    main(sys.argv[1])

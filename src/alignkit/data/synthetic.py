"""The quickstart's synthetic task, generated deterministically: review a topic; a response's reward is
its share of positive minus negative sentiment words. Small enough for a tiny model to learn in seconds."""

from __future__ import annotations

import random

POSITIVE = ["good", "great", "happy", "love", "nice", "wonderful", "excellent", "fine", "best", "bright"]
NEGATIVE = ["bad", "awful", "sad", "hate", "poor", "terrible", "worst", "dull", "ugly", "wrong"]
NEUTRAL = ["the", "a", "it", "was", "is", "this", "very", "really", "and", "so", "quite", "felt", "seemed"]
TOPICS = ["movie", "food", "day", "book", "place", "service", "song", "game", "trip", "show"]
PROMPT_WORDS = ["review", "describe", "rate", "tell", "about", "my", "your", "latest", ":"]
VOCABULARY = POSITIVE + NEGATIVE + NEUTRAL + TOPICS + PROMPT_WORDS


def sentiment_reward(text: str) -> float:
    """(#positive - #negative) / #words, in [-1, 1]; 0 for an empty text."""
    words = [w for w in text.split() if w.startswith("<") is False]
    if not words:
        return 0.0
    positive = sum(w in POSITIVE for w in words)
    negative = sum(w in NEGATIVE for w in words)
    return (positive - negative) / len(words)


def make_prompt(rng: random.Random) -> str:
    verb = rng.choice(PROMPT_WORDS[:4])
    return f"{verb} {rng.choice(['my', 'your', 'the', 'latest'])} {rng.choice(TOPICS)} :"


def make_response(rng: random.Random, topic: str) -> str:
    words = [rng.choice(["the", "this", "it"]), topic if rng.random() < 0.5 else "was"]
    for _ in range(5):  # fixed length: the reward's share of words is then a plain count
        r = rng.random()
        if r < 0.25:
            words.append(rng.choice(POSITIVE))
        elif r < 0.5:
            words.append(rng.choice(NEGATIVE))
        else:
            words.append(rng.choice(NEUTRAL))
    return " ".join(words)


def sft_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = make_prompt(rng)
        records.append({"prompt": prompt, "completion": make_response(rng, prompt.split()[-2])})
    return records


def preference_records(n: int, seed: int, min_gap_words: int = 2) -> list[dict]:
    """Pairs of two sampled responses; the one with the higher reward is chosen. Pairs whose rewards differ
    by less than `min_gap_words` sentiment words are redrawn, as preference sets drop near-ties."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        prompt = make_prompt(rng)
        topic = prompt.split()[-2]
        a, b = make_response(rng, topic), make_response(rng, topic)
        ra, rb = sentiment_reward(a), sentiment_reward(b)
        if abs(ra - rb) * (len(a.split())) < min_gap_words - 1e-9:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def prompt_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": make_prompt(rng)} for _ in range(n)]


# ---- a long-context task: a fact buried at a random depth of a long document ----

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "grey"]
FILLER = NEUTRAL + TOPICS + ["day", "then", "later", "again"]
NEEDLE_WORDS = sorted(set(COLOURS + FILLER + ["key", "what", "?", "."]))


def needle_records(n: int, seed: int, doc_words: int = 120, rejections: int = 2) -> list[dict]:
    """Documents of `doc_words` filler words with one fact, "the key is <colour> .", at a uniformly random depth;
    the question "what is the key ?"; the answer is that colour. Each record carries `rejections` other colours
    (LOGO's negatives), `rejected` (the first of them, for pairs) and `short_prompt` (the fact and the question
    alone: LongPO's short context)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour = rng.choice(COLOURS)
        filler = [rng.choice(FILLER) for _ in range(doc_words)]
        depth = rng.randrange(doc_words + 1)
        fact = ["the", "key", "is", colour, "."]
        document = " ".join(filler[:depth] + fact + filler[depth:])
        wrong = rng.sample([c for c in COLOURS if c != colour], rejections)
        out.append({"prompt": f"{document} what is the key ?", "short_prompt": f"{' '.join(fact)} what is the key ?",
                    "chosen": colour, "rejected": wrong[0], "rejections": wrong, "depth": depth / doc_words})
    return out

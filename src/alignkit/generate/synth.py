"""Synthetic alignment data from a model itself, written as alignkit records (prompts / sft / pairs).

- Magpie (arXiv 2406.08464; magpie-align/magpie exp/gen_ins.py): give an instruct model only the chat
  template's pre-query part (everything before the user's text) and let it write the user turn. Stops at the
  end-of-user-turn marker, and (early_stop, the official default) at the first newline; strip; drop exact
  duplicates after lower-casing and whitespace folding, keeping the first (the official code drops
  near-duplicates by embedding distance; that needs an embedding model and is left to the caller).
- Self-instruct (arXiv 2212.10560): few-shot prompts drawn from seed tasks plus tasks made so far; a new task
  is kept when its ROUGE-L (word LCS F-measure) against every task in the pool is below max_similarity (0.7).
- Principle-driven responses (Self-Align, arXiv 2305.03047): answer with the principles in a system turn, store
  the record without them ("principle engraving"). With contrast principles, the answer under the contrasting
  principles is the rejected response of a pair (RLCD, arXiv 2307.12950) unless a reward orders the two.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from alignkit.config import SamplingOptions
from alignkit.data.pairs import best_worst_pairs
from alignkit.data.template import render_chat
from alignkit.errors import AlignkitError
from alignkit.generate.sample import sample
from alignkit.rewards.base import Reward, score_groups

QUERY_MARKER = "ALIGNKIT_USER_QUERY_MARKER"


def pre_query_template(tokenizer, system: str | None = None) -> tuple[str, str]:
    """(pre-query text, end-of-user-turn text): the template's rendering before and after the user's text."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": QUERY_MARKER}]
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    head, found, tail = text.partition(QUERY_MARKER)
    if not found:
        raise AlignkitError("Magpie: the chat template does not render the user's text verbatim")
    return head, tail.strip()


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def dedupe(texts: list[str], seen: set[str] | None = None) -> list[str]:
    """Texts in order without exact duplicates (after lower-casing and folding whitespace), nor any in `seen`."""
    seen = set() if seen is None else seen
    out = []
    for text in texts:
        key = normalise(text)
        if key and key not in seen:
            seen.add(key)
            out.append(text)
    return out


@dataclass(frozen=True)
class MagpieOptions:
    system: str | None = None  # a system turn before the elicited user turn
    early_stop: bool = True  # also stop at the first newline (the official default)
    min_words: int = 1  # shorter queries are dropped
    seed: int = 0  # of the sampling


def magpie_prompts(model, tokenizer, n: int, cfg: SamplingOptions | None = None,
                   options: MagpieOptions = MagpieOptions()) -> list[dict]:
    """Up to n prompt records {prompt, source} elicited from the pre-query template (fewer after dedup)."""
    cfg = cfg or SamplingOptions(max_new_tokens=64, temperature=1.0)
    head, end_of_turn = pre_query_template(tokenizer, options.system)
    stop = tuple(s for s in (end_of_turn, "\n" if options.early_stop else "") if s)
    queries = [s[0] for s in sample(model, tokenizer, [head] * n,
                                          cfg.model_copy(update={"stop": [*cfg.stop_strings, *stop]}), 1, options.seed)]
    queries = [q for q in dedupe(queries) if len(q.split()) >= options.min_words]
    return [{"prompt": q, "source": "magpie"} for q in queries]


def chat_prompt(query: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]


@dataclass(frozen=True)
class PairOptions:
    """How sampled responses become pairs: num_responses per prompt scored by reward, best vs worst, kept when the
    rewards differ by more than min_gap."""

    reward: Reward | None = None
    num_responses: int = 4
    min_gap: float = 0.0
    seed: int = 0  # of the sampling


def respond(model, tokenizer, prompt_records: list[dict], shape: str = "sft", cfg: SamplingOptions | None = None,
            pairs: PairOptions = PairOptions()) -> list[dict]:
    """Answer prompt records through the chat template. shape 'sft': one answer each (greedy by default, as Magpie
    does) -> {prompt (as a user turn), completion}; shape 'pairs': best vs worst of sampled responses (PairOptions)
    -> pair records."""
    prompts = [r["prompt"] if isinstance(r["prompt"], list) else chat_prompt(r["prompt"]) for r in prompt_records]
    if shape == "sft":
        cfg = cfg or SamplingOptions(max_new_tokens=64, temperature=0.0)
        answers = [s[0] for s in sample(model, tokenizer, prompts, cfg, 1, pairs.seed)]
        return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers) if a.strip()]
    if shape == "pairs":
        if pairs.reward is None:
            raise AlignkitError("pairs need a reward to order the responses")
        cfg = cfg or SamplingOptions(max_new_tokens=64, temperature=1.0)
        groups = sample(model, tokenizer, prompts, cfg, pairs.num_responses, pairs.seed)
        return best_worst_pairs(prompts, groups, score_groups(pairs.reward, prompts, groups), pairs.min_gap)
    raise AlignkitError(f"shape '{shape}': use sft or pairs (or keep the prompt records as they are)")


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure over words: 2 * LCS / (|a| + |b|)."""
    x, y = a.lower().split(), b.lower().split()
    if not x or not y:
        return 0.0
    previous = [0] * (len(y) + 1)
    for word in x:
        current = [0]
        for j, other in enumerate(y):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return 2 * previous[-1] / (len(x) + len(y))


@dataclass(frozen=True)
class SelfInstructOptions:
    num_examples: int = 3  # pool tasks shown in each few-shot prompt
    max_similarity: float = 0.7  # a new task is kept when its ROUGE-L against every pool task is below this
    example_format: str = "Task: {task}"
    separator: str = "\n"
    min_words: int = 2
    max_rounds: int = 10
    seed: int = 0  # draws the few-shot examples and seeds the sampling


def self_instruct_prompts(model, tokenizer, seed_tasks: list[str], n: int, cfg: SamplingOptions | None = None,
                          options: SelfInstructOptions = SelfInstructOptions()) -> list[dict]:
    """Up to n new task prompts {prompt, source}, each from a few-shot prompt of pool tasks (seed + made so far)."""
    if not seed_tasks:
        raise AlignkitError("self-instruct needs at least one seed task")
    cfg = cfg or SamplingOptions(max_new_tokens=48, temperature=1.0)
    rng = random.Random(options.seed)
    separator, example_format = options.separator, options.example_format
    lead = example_format.split("{task}")[0].rstrip()
    pool, made = list(seed_tasks), []
    for round_index in range(options.max_rounds):
        if len(made) >= n:
            break
        shots = [rng.sample(pool, min(options.num_examples, len(pool))) for _ in range(n - len(made))]
        prompts = [separator.join(example_format.format(task=t) for t in s) + separator + lead for s in shots]
        round_cfg = cfg.model_copy(update={"stop": [*cfg.stop_strings, separator.strip() or "\n"]})
        for text in (s[0] for s in sample(model, tokenizer, prompts, round_cfg, 1, options.seed + 7919 * round_index)):
            text = re.sub(r"\s+", " ", text).strip()
            if len(text.split()) < options.min_words or any(rouge_l(text, t) >= options.max_similarity for t in pool):
                continue
            pool.append(text)
            made.append(text)
    return [{"prompt": t, "source": "self-instruct"} for t in made[:n]]


@dataclass(frozen=True)
class Principles:
    rules: list[str]  # Self-Align's principles
    contrast: list[str] | None = None  # RLCD's contrasting principles: given, every prompt becomes a pair
    seed: int = 0  # of the sampling (the contrasting answers: seed + 1)


def principle_driven(model, tokenizer, prompts: list, principles: Principles, cfg: SamplingOptions | None = None,
                     reward=None) -> list[dict]:
    """sft records answered under the principles (stored without them); with contrast principles, pair records
    (principled answer chosen, contrasting answer rejected, or ordered by `reward` when given)."""
    cfg = cfg or SamplingOptions(max_new_tokens=64, temperature=0.7)
    queries = [p if isinstance(p, list) else chat_prompt(p) for p in prompts]

    def answer(rules: list[str], seed_offset: int) -> list[str]:
        system = "Follow these principles:\n" + "\n".join(f"{i + 1}. {r}" for i, r in enumerate(rules))
        framed = [[{"role": "system", "content": system}, *q] for q in queries]
        return [s[0] for s in sample(model, tokenizer, framed, cfg, 1, principles.seed + seed_offset)]

    good = answer(principles.rules, 0)
    if not principles.contrast:
        return [{"prompt": q, "completion": a, "source": "principle-driven"} for q, a in zip(queries, good) if a.strip()]
    bad = answer(principles.contrast, 1)
    records = []
    for query, chosen, rejected in zip(queries, good, bad):
        if not chosen.strip() or not rejected.strip() or normalise(chosen) == normalise(rejected):
            continue
        if reward is not None:
            chosen_reward, rejected_reward = reward([query, query], [chosen, rejected])
            if chosen_reward == rejected_reward:
                continue
            if chosen_reward < rejected_reward:
                chosen, rejected = rejected, chosen
        records.append({"prompt": query, "chosen": chosen, "rejected": rejected, "source": "principle-contrast"})
    return records

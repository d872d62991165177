"""`alignkit rl`'s warm start on the model's own answers (rejection-sampling SFT: STaR, arXiv 2203.14465; RAFT,
arXiv 2304.06767): before GRPO, answer training prompts with the starting model under the run's sampling, keep the
answers that meet every constraint, pass the training reward's guards and trip no degeneracy flag, and SFT on them
through the one training loop (recipes/warm_start.py), LoRA merged: GRPO then starts from the warm-started weights,
which are also its reference (with LoRA, the adapters off)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from alignkit.data import TokenizedExample
from alignkit.data.load import write_jsonl_atomic
from alignkit.errors import ConfigError
from alignkit.generate.sample import sample_with_counts
from alignkit.recipes.warm_start import SFTSettings, run_warm_start
from alignkit.rewards.verifiable.constraints import check_all, repeated_share, validate_constraints, words
from alignkit.rewards.verifiable.degenerate import flagged


class OwnAnswersWarmStart(SFTSettings):
    prompts: int = Field(0, ge=0, description="training prompts answered (the first of the training file); 0: no "
                                              "warm start")
    samples_per_prompt: int = Field(8, gt=0, description="answers sampled per prompt (the run's sampling, seeded)")
    temperature: float | None = Field(None, gt=0.0, description="the answers' sampling temperature; null: the run's "
                                                                "(online.sampling)")
    keep_per_prompt: int = Field(1, gt=0, description="at most this many distinct passing answers kept per prompt")
    evaluate: bool = Field(True, description="also answer the held-out prompts and phrasings with the warm-started "
                                             "model (last, so no other figure moves)")
    examples_per_step: int = Field(8, gt=0, description="answers per optimizer step")


def check_prompts(settings: OwnAnswersWarmStart, available: int) -> None:
    if settings.prompts > available:
        raise ConfigError("warm_start.prompts", f"{settings.prompts} prompts asked, the training file has "
                                                f"{available}: give at most that")


def passes(record: dict, text: str, min_words: int, max_repeat: float) -> bool:
    """Every constraint met, no degeneracy flag, and none of the training reward's floors (too short, repetitive):
    an answer GRPO would give its highest reward."""
    constraints = validate_constraints(record["constraints"])
    if len(words(text)) < min_words or repeated_share(text) > max_repeat:
        return False
    return all(check_all(constraints, text)) and not flagged(text, constraints, record["prompt"])


def passing_answers(records: list[dict], generation, keep: int, guards: tuple[int, float]) -> tuple[list, dict]:
    """From a generation ([record][sample]): the SFT examples, token-exact (the sampled ids, end token included),
    at most `keep` distinct passing answers per record in sample order, and counts for the summary."""
    examples, counts = [], {"prompts": len(records), "answers": 0, "all_met": 0, "passing": 0,
                            "prompts_passing": 0, "examples": 0}
    for i, (record, prompt_ids) in enumerate(zip(records, generation.prompt_ids)):
        kept: list[str] = []
        for text, ids in zip(generation.texts[i], generation.ids[i]):
            counts["answers"] += 1
            counts["all_met"] += all(check_all(validate_constraints(record["constraints"]), text))
            if not passes(record, text, *guards):
                continue
            counts["passing"] += 1
            if len(kept) < keep and text not in kept:
                kept.append(text)
                examples.append(TokenizedExample(list(prompt_ids), [list(ids)], "<warm start>", i + 1))
        counts["prompts_passing"] += bool(kept)
    counts["examples"] = len(examples)
    return examples, counts


def own_answers_warm_start(model, tokenizer, records: list[dict], cfg, stages, out: Path) -> tuple:
    """(the warm-started model, LoRA merged, or `model` itself where no answer passed; the counts). cfg: the rl
    job's config (warm_start, online's sampling, LoRA and precision, the guards, seed)."""
    settings = cfg.warm_start
    check_prompts(settings, len(records))
    chosen = records[:settings.prompts]
    sampling = cfg.online.sampling
    if settings.temperature is not None:
        sampling = sampling.model_copy(update={"temperature": settings.temperature})
    generation = stages.run(f"warm start: {settings.samples_per_prompt} answers to each of {len(chosen)} training "
                            f"prompts", lambda: sample_with_counts(model, tokenizer, [r["prompt"] for r in chosen],
                                                                   sampling, settings.samples_per_prompt,
                                                                   cfg.seed + 29).extra["generation"])
    examples, counts = passing_answers(chosen, generation, settings.keep_per_prompt, (cfg.min_words, cfg.max_repeat))
    write_jsonl_atomic(out / "warm_start.jsonl", [
        {"prompt": chosen[e.row - 1]["prompt"], "constraints": chosen[e.row - 1]["constraints"],
         "completion": tokenizer.decode(e.response_ids[0], skip_special_tokens=True)} for e in examples])
    if not examples:
        return model, counts
    online = cfg.online.model_copy(update={"model": cfg.model, "seed": cfg.seed})
    warm = stages.run(f"warm start: SFT on {len(examples)} passing answers x {settings.epochs} epoch(s)",
                      lambda: run_warm_start(model, tokenizer, examples, settings, online, out))
    return warm, counts

"""GKD's lambda within one online run (arXiv 2306.13649; TRL's GKDTrainer.training_step): each round is drawn as
sampled by the student (probability lmbda), else sampled by the teacher (seq_kd), else the dataset's completions of
the round's prompts. The draw is seeded by the round, so a resumed run draws the same sources.

A dataset round trains on the records' completions tokenised exactly as offline training tokenises them
(`alignkit train --loss gkd`): the same examples, one response per prompt, nothing generated. With `teacher_cache`
their teacher top-k is read from disk (built once, train/teacher_cache.py), so the teacher runs in sampled rounds only."""

from __future__ import annotations

import time

import torch

from alignkit.data import ExampleSettings, TokenizedExample, prepare_examples
from alignkit.errors import ConfigError, DataError
from alignkit.online.rollout import Rollout
from alignkit.online.sampling import student_samples
from alignkit.train.teacher_cache import TeacherCache, check_cache_options

SOURCES = ("student", "teacher", "dataset")


def round_source(seed: int, round_index: int, lmbda: float, seq_kd: bool) -> str:
    """Who gives a round's responses: the student with probability lmbda, else the teacher (seq_kd), else the
    dataset (TRL: `random() <= lmbda`, then `elif seq_kd`, else the batch's own completions)."""
    if student_samples(seed, round_index, lmbda):
        return "student"
    return "teacher" if seq_kd else "dataset"


def source_metrics(source: str) -> dict[str, float]:
    """The round's source, one-hot, for metrics.jsonl."""
    return {"student_sampled": float(source == "student"), "teacher_sampled": float(source == "teacher"),
            "dataset_completions": float(source == "dataset")}


def needs_dataset(cfg) -> bool:
    return cfg.lmbda < 1 and not cfg.seq_kd


def dataset_examples(cfg, tokenizer, prompts: list, source, given: list | None) -> list[TokenizedExample] | None:
    """The completion of every prompt record, tokenised as offline training does (shape sft, cfg.max_length), in
    the prompts' order; None where no round is a dataset round. source: the records the prompts were read from
    (None: prompts handed over in memory, whose completions are `given`). A record without a usable completion stops
    the run naming its file, row and field, before anything is written."""
    if not needs_dataset(cfg):
        return None
    if given is None and source is None:
        raise ConfigError("prompts", "lmbda < 1 without seq_kd trains the rounds the student does not sample on the "
                                     "dataset's completions: give records with prompt and completion (or seq_kd: "
                                     "true, the teacher samples them)")
    try:
        examples = list(given) if given is not None else list(
            prepare_examples(source, tokenizer, ExampleSettings("sft", cfg.max_length, training=True)))
    except DataError as err:  # on_bad_record is no key here: skipping would unpair prompts and completions
        raise DataError(err.file, err.row, err.field, err.reason, "fix the record: rounds that are not sampled "
                        "(lmbda < 1 without seq_kd) train on each record's prompt and completion") from None
    if len(examples) != len(prompts):
        raise ConfigError("prompts", f"{len(examples)} completions for {len(prompts)} prompts: each prompt record "
                                     "needs its completion")
    return examples


def dataset_rollout(examples: list[TokenizedExample], prompts: list, reward, tokenizer) -> Rollout:
    """A round of the dataset's completions: one response per prompt, scored by the reward for the metrics (as
    every sample is), with no engine log-probs (no sampler to compare) and no generated tokens."""
    tic = time.perf_counter()
    texts = [[tokenizer.decode(e.response_ids[0], skip_special_tokens=True)] for e in examples]
    values = reward(list(prompts), [group[0] for group in texts])
    rewards = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
    finished = torch.ones(len(examples), 1, dtype=torch.bool)
    return Rollout(list(prompts), texts, list(examples), rewards.view(-1, 1), finished, 0, 0.0,
                   time.perf_counter() - tic)


def open_teacher_cache(cfg, teacher, opts, completions: list[TokenizedExample] | None) -> TeacherCache | None:
    """cfg.teacher_cache checked against this run, before anything is written: it serves the dataset rounds of a gkd
    run with top_k (a sampled round's responses are new every round), and a directory built for other records,
    another teacher, k, temperature or precision is refused."""
    if cfg.teacher_cache is None:
        return None
    if completions is None:
        raise ConfigError("teacher_cache", f"holds the teacher's top-k of the records' completions, read by the "
                                           f"dataset rounds of a gkd run (lmbda < 1 without seq_kd); method "
                                           f"{cfg.method} with lmbda {cfg.lmbda} and seq_kd {cfg.seq_kd} has no "
                                           "dataset rounds: leave it unset")
    check_cache_options("teacher_cache", cfg.method, opts, None)
    return TeacherCache.open(cfg.teacher_cache, teacher, opts, {"train": completions, "eval": []}, cfg.precision)


def with_teacher_topk(cache: TeacherCache | None, completions, teacher, opts, packing, ctx):
    """The records' completions, each carrying the teacher's top-k from the cache (scored now where the cache is new:
    on every rank, written by rank 0); the learner reads it in dataset rounds (train/method.Method.teacher_data)."""
    if cache is None:
        return completions
    return cache.fill(teacher, opts, {"train": completions, "eval": []}, packing, ctx.is_main)["train"]

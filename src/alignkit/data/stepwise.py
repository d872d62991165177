"""Stepwise supervision for process reward models: TRL's format (`prompt`, `completions` = the steps, `labels` = one
bool per step) tokenised as TRL's PRMTrainer did. Each step is tokenised on its own and followed by the separator's
tokens; a step's label sits on its last token (the separator's last), every other token is IGNORE."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.data.load import load_records
from alignkit.errors import ConfigError, DataError

IGNORE = -100  # the label of a token that carries no loss (torch's cross-entropy ignore_index)


@dataclass(frozen=True)
class StepSettings:
    """step_separator: the text after every step (TRL's default "\\n"); max_length: tokens of prompt + steps;
    max_completion_length: tokens of the steps; train_on_last_step_only: label only the last step (an outcome
    model trained on the same rows)."""

    step_separator: str = "\n"
    max_length: int | None = 1024
    max_completion_length: int | None = None
    train_on_last_step_only: bool = False


@dataclass
class StepExample:
    input_ids: list[int]
    labels: list[int]  # per token: 1 (good step), 0 (bad step) or IGNORE
    source: str = "<memory>"
    row: int | None = None


def separator_ids(tokenizer, separator: str) -> list[int]:
    ids = tokenizer.encode(separator, add_special_tokens=False)
    if not ids:
        raise ConfigError("step_separator", f"{separator!r} tokenizes to no tokens with this tokenizer, so steps "
                                            "would have no token of their own to label; pick a separator it keeps")
    return ids


def prompt_text(prompt) -> str:
    if not isinstance(prompt, str):
        raise ConfigError("prompt", "process reward models read plain-text prompts (TRL's stepwise format), "
                                    "not chat messages")
    return prompt


def tokenize_steps(tokenizer, prompt: str, steps: list[str], labels: list[bool | None],
                   settings: StepSettings) -> tuple[list[int], list[int]]:
    """(input_ids, labels): [bos] + prompt + (step + separator) for every step; a step's label (None: IGNORE) on
    its last token. Cut like TRL: the steps to max_completion_length, then the whole to max_length."""
    prompt_ids = tokenizer(prompt_text(prompt), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    sep = separator_ids(tokenizer, settings.step_separator)
    step_ids, step_labels = [], []
    for step, label in zip(steps, labels):
        ids = tokenizer(step, add_special_tokens=False)["input_ids"] + sep
        step_ids += ids
        step_labels += [IGNORE] * (len(ids) - 1) + [IGNORE if label is None else int(label)]
    if settings.max_completion_length is not None:
        step_ids = step_ids[:settings.max_completion_length]
        step_labels = step_labels[:settings.max_completion_length]
    input_ids, token_labels = prompt_ids + step_ids, [IGNORE] * len(prompt_ids) + step_labels
    if settings.max_length is not None:
        input_ids, token_labels = input_ids[:settings.max_length], token_labels[:settings.max_length]
    return input_ids, token_labels


def stepwise_example(tokenizer, record: dict, settings: StepSettings, training: bool = True) -> StepExample:
    """One validated record as a StepExample; with train_on_last_step_only (in training) only the last label."""
    labels = list(record["labels"])
    if settings.train_on_last_step_only and training:
        labels = [None] * (len(labels) - 1) + labels[-1:]
    input_ids, token_labels = tokenize_steps(tokenizer, record["prompt"], record["completions"], labels, settings)
    source, row = record.get("_source", "<memory>"), record.get("_row")
    if all(label == IGNORE for label in token_labels):
        raise DataError(source, row, "completions", f"no step's last token is within max_length "
                        f"{settings.max_length} (prompt + steps are {len(input_ids)} tokens after the cut)",
                        hint="raise max_length or shorten the record")
    return StepExample(input_ids, token_labels, source, row)


def load_stepwise(source, tokenizer, settings: StepSettings, on_bad_record: str = "error",
                  training: bool = True) -> list[StepExample]:
    """The records of `source` (a file, folder, glob, dataset or list of dicts) validated as shape "stepwise" and
    tokenised; a bad record stops the run naming its file, row and field (or is skipped with on_bad_record: skip)."""
    examples = []
    for record in load_records(source, shape="stepwise", on_bad_record=on_bad_record):
        try:
            examples.append(stepwise_example(tokenizer, record, settings, training))
        except DataError:
            if on_bad_record != "skip":
                raise
    return examples


def split_steps(response: str, separator: str) -> list[str]:
    """A generated solution cut into its steps at the separator, as the rows were joined (empty pieces dropped)."""
    return [step.strip() for step in response.split(separator) if step.strip()]

"""The offline run's examples and plan: the training and evaluation sets, every optimizer step's micro-batches (and
this rank's share), and the reference's values for them."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from itertools import chain

from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, TokenizedExample, prepare_examples
from alignkit.data.pack import token_budget_batches
from alignkit.data.recovery import recovery_examples, recovery_options
from alignkit.data.table import select
from alignkit.data.tokenize import train_on_prompt
from alignkit.errors import ConfigError
from alignkit.models.reward import prepare_reward_examples
from alignkit.train.loss_inputs import check_record_fields
from alignkit.train.packing import Packing
from alignkit.train.pair_filter import ches_filter
from alignkit.train.reference import Reference, build_reference
from alignkit.train.selective import selective_filter

log = logging.getLogger("alignkit.train")


@dataclass
class OfflineData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    steps: list[list[list[int]]] | None = None  # every optimizer step's micro-batches (example indices), all ranks
    local_steps: list[list[list[int]]] | None = None  # this rank's micro-batches of each step
    ref_cache: bool = True  # the reference's values of these examples may come from the disk cache (cfg.ref_cache)


def plan_steps(examples, cfg: TrainConfig) -> list[list[list[int]]]:
    """Every optimizer step as its list of micro-batches (example indices); fixed by the seed, so a resumed
    run sees exactly the batches it would have seen."""
    steps, epoch = [], 0
    while True:
        batches = token_budget_batches(examples, cfg.max_tokens_per_batch, cfg.seed, epoch)
        for start in range(0, len(batches), cfg.grad_accum):
            steps.append(batches[start:start + cfg.grad_accum])
        epoch += 1
        if cfg.max_steps is None and epoch >= cfg.epochs or cfg.max_steps is not None and len(steps) >= cfg.max_steps:
            break
    return steps[:cfg.max_steps] if cfg.max_steps is not None else steps


def load_data(cfg: TrainConfig, tokenizer, shape: str):
    def prep(source, training=False):
        settings = ExampleSettings(shape, cfg.max_length, cfg.max_prompt_length, cfg.on_bad_record, training)
        examples = prepare_examples(source, tokenizer, settings, cache=cfg.data_cache, progress=cfg.progress)
        return [train_on_prompt(e) for e in examples] if cfg.sft_include_prompt else examples

    train_examples = prep(cfg.train_data, training=True)
    if cfg.eval_data is not None:
        return train_examples, prep(cfg.eval_data)
    if cfg.eval_fraction > 0:
        order = list(range(len(train_examples)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, int(len(order) * cfg.eval_fraction))
        return select(train_examples, order[n_eval:]), select(train_examples, order[:n_eval])
    return train_examples, []


def offline_data(cfg: TrainConfig, model, tokenizer, spec, examples=None) -> OfflineData:
    """The training and evaluation examples of the loss's data shape, checked for the fields it reads, in the
    reward model's layout where it trains one, and the steps planned over them. examples: training examples already
    prepared (Selective DPO's fold runs), trained as they are: no evaluation set, no augmentation or filter."""
    if examples is not None:
        train_examples, eval_examples = examples, []
    else:
        train_examples, eval_examples = load_data(cfg, tokenizer, spec.data_shape)
    if cfg.augment and "recovery" in cfg.augment and examples is None:
        train_examples = with_recovery_examples(cfg, spec.data_shape, train_examples)
    if cfg.filter is not None and cfg.filter.ches is not None and examples is None:
        train_examples = ches_filter(model, train_examples, cfg.filter.ches.get("drop", 0.1), cfg.output_dir)
    if cfg.filter is not None and cfg.filter.selective is not None and examples is None:
        train_examples = selective_filter(cfg, model, tokenizer, train_examples)
    check_record_fields(spec, chain(train_examples, eval_examples))  # e.g. MODPO's other objectives' rewards
    if spec.output == "rewards":  # encoders read [CLS] prompt [SEP] response [SEP]
        train_examples = prepare_reward_examples(model, tokenizer, train_examples, cfg.max_length)
        eval_examples = prepare_reward_examples(model, tokenizer, eval_examples, cfg.max_length)
    return OfflineData(train_examples, eval_examples, plan_steps(train_examples, cfg), ref_cache=cfg.ref_cache)


def with_recovery_examples(cfg: TrainConfig, shape: str, examples) -> list[TokenizedExample]:
    """The training set with deep safety alignment's recovery examples (data/recovery.py); evaluation sets stay."""
    options = check_recovery(cfg, shape)
    examples, prefix_lengths = recovery_examples(examples, options, cfg.max_length)
    log.info("recovery examples: %d refusal(s) read after a harmful prefix of %s tokens", len(prefix_lengths),
             f"{min(prefix_lengths)}..{max(prefix_lengths)}" if prefix_lengths else "-")
    return examples


def check_recovery(cfg: TrainConfig, shape: str):
    """augment.recovery's options, refused where the run is not SFT on prompt/completion records."""
    if shape != "sft":
        raise ConfigError("augment.recovery", f"recovery examples are SFT data; loss '{cfg.loss}' trains on {shape} "
                          "(use loss: sft or sft_constrained)")
    if cfg.sft_include_prompt:
        raise ConfigError("augment.recovery", "does not combine with sft_include_prompt (the harmful prefix must "
                          "stay untrained)")
    return recovery_options(cfg.augment["recovery"])


def with_reference_context(examples: list[TokenizedExample], name: str) -> list[TokenizedExample]:
    """The examples with the prompt the reference reads (extras[name], token ids), their responses unchanged."""
    return [replace(e, prompt_ids=e.extras[name]) for e in examples]


def score_references(method, data: OfflineData, packing: Packing, source, live=None,
                     use_cache: bool | None = None) -> tuple[Reference | None, Reference | None]:
    """The reference's values for the training and evaluation sets (None, None for a reference-free loss), scored
    with `source` (the reference model where there is one, else the starting policy, before any update); live: the
    reference model a method reads in its forward (SparsePO, TR-DPO). KTO's mismatched pairs are scored for exactly
    the micro-batches this rank will pack (data.local_steps; Packing.batches for evaluation). use_cache: from the
    disk cache where the fingerprint matches (default: data.ref_cache)."""
    spec = method.spec
    use_cache = data.ref_cache if use_cache is None else use_cache
    if not spec.needs_reference:
        return None, None
    train_examples, eval_examples = data.train, data.eval
    if spec.reference_context:  # LongPO: the reference reads each example's short context instead
        train_examples, eval_examples = (with_reference_context(e, spec.reference_context)
                                         for e in (train_examples, eval_examples))
    train_batches = [mb for step in data.local_steps for mb in step] if method.kl_pairs else None
    train_ref = build_reference(source, train_examples, packing, train_batches, method.max_length, use_cache)
    eval_ref = None
    if eval_examples:
        eval_batches = packing.batches(eval_examples) if method.kl_pairs else None
        eval_ref = build_reference(source, eval_examples, packing, eval_batches, method.max_length, use_cache)
    for ref in (train_ref, eval_ref):
        if ref is not None:
            ref.model = live
    return train_ref, eval_ref

"""Selective DPO's pair filter (Gao et al., arXiv 2502.09650; `filter: {selective: {drop, folds}}`): the training
pairs are dealt into seeded folds; for each fold a copy of the starting model is trained by the one loop
(train/loop.train) with the run's own loss and settings on the other folds, and each pair of the fold is scored by
its loss under that model (its held-out "validation loss", the paper's difficulty). The share `drop` with the
highest scores, the hardest, is dropped; every score is written next to the run."""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from alignkit.config import TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.table import select
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.models.attention import set_attention
from alignkit.models.inference import eval_mode
from alignkit.train.checkpoint import rng_state, set_rng_state
from alignkit.train.loss_inputs import mean_trained_lengths
from alignkit.train.method import Method
from alignkit.train.packing import Packing
from alignkit.train.reference import Reference, cache_subsets, reference_logps, score_examples
from alignkit.train.step import autocast

log = logging.getLogger("alignkit.filter")


def check_selective(cfg: TrainConfig, spec) -> None:
    """Refuse, before anything is loaded or written, what the filter cannot score: data that is not preference
    pairs, a reward model's loss, several processes."""
    if cfg.filter is None or cfg.filter.selective is None:
        return
    if spec.data_shape != "pairs" or spec.output == "rewards":
        what = "a reward model" if spec.output == "rewards" else f"{spec.data_shape} data"
        raise ConfigError("filter.selective", f"scores preference pairs by a log-prob loss; loss '{cfg.loss}' trains "
                                              f"on {what}; use a pairwise loss (dpo, ipo, ...) or remove the filter")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError("filter.selective", "trains its fold models in one process; run without torchrun for now")


def fold_assignment(n: int, folds: int, seed: int) -> list[int]:
    """The fold of each of n pairs: a Random(seed) shuffle of the pairs dealt round-robin (sizes differ by <= 1)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    fold_of = [0] * n
    for position, i in enumerate(order):
        fold_of[i] = position % folds
    return fold_of


@torch.no_grad()
def pair_losses(model, examples, method: Method, ref: Reference | None, packing: Packing) -> list[float]:
    """Each example's loss under `model` (the method's forward, as in evaluation), in order."""
    losses = [0.0] * len(examples)
    mean_lengths = mean_trained_lengths(examples, range(len(examples)))
    with eval_mode(model):
        for indices in packing.batches(examples):
            batch = method.pack(examples, indices, packing)
            with autocast(packing, model):
                values, _ = method.forward(model, batch, examples, ref, mean_lengths)
            for i, value in zip(indices, values.float().tolist()):
                losses[i] = value
    return losses


def whole_reference(cfg: TrainConfig, method: Method, model, examples, packing: Packing, fold_of: list[int]):
    """The reference's (seq_logps, token_logps) of every pair, scored once; with ref_cache, also stored as the cache
    entries of every fold run's training pairs, so no fold run scores its reference again. None: no reference."""
    if not method.spec.needs_reference:
        return None
    if method.spec.reference_context:  # LongPO's reference reads another prompt: each run scores it as it reads it
        raise ConfigError("filter.selective", f"loss '{cfg.loss}' scores its reference on other prompts; not built")
    if not cfg.ref_cache:
        return score_examples(model, examples, packing)
    values = reference_logps(model, examples, packing, use_cache=True)
    folds = range(max(fold_of) + 1)
    cache_subsets(model, examples, packing, [[i for i, f in enumerate(fold_of) if f != fold] for fold in folds], values)
    return values


def fold_run(cfg: TrainConfig, model, tokenizer, examples, fold: int):
    """The starting model trained by the one loop on `examples` (the other folds' pairs) with the run's settings;
    its run is <output_dir>/selective/fold-<fold> (config, metrics, final model)."""
    from alignkit.train.loop import train  # the loop reaches this filter through its data stage

    options = cfg.filter.selective
    steps = {"epochs": options.epochs, "max_steps": None} if options.epochs is not None else {}
    fold_cfg = cfg.model_copy(update={
        "filter": None, "output_dir": str(Path(cfg.output_dir) / "selective" / f"fold-{fold}"), "eval_data": None,
        "eval_fraction": 0.0, "eval_every": 0, "save_every": 0, "report_to": ["jsonl"], **steps})
    return train(fold_cfg, copy.deepcopy(model), tokenizer, examples=examples).model


def selective_filter(cfg: TrainConfig, model, tokenizer, examples: Sequence[TokenizedExample],
                     ) -> Sequence[TokenizedExample]:
    """The examples (a view, for a table) without the int(drop * n) highest-scoring pairs (ties: the earlier pair is
    dropped first), in their order; writes <output_dir>/selective_scores.jsonl (source, row, fold, score, dropped)."""
    options, n = cfg.filter.selective, len(examples)
    if n < options.folds:
        raise ConfigError("filter.selective.folds", f"{options.folds} folds of {n} training pairs: each fold needs a "
                                                    "pair; lower folds")
    method = Method.from_config(cfg)
    packing = Packing.from_config(cfg, tokenizer, cfg.attention)
    set_attention(model, cfg.attention)  # the run sets it too: the reference is scored as the runs score it
    fold_of = fold_assignment(n, options.folds, cfg.seed if options.seed is None else options.seed)
    reference = whole_reference(cfg, method, model, examples, packing, fold_of)
    scores, saved_rng = [0.0] * n, rng_state()  # the fold runs reseed; the run goes on as if they had not run
    for fold in range(options.folds):
        held = [i for i in range(n) if fold_of[i] == fold]
        fold_model = fold_run(cfg, model, tokenizer, select(examples, [i for i in range(n) if fold_of[i] != fold]), fold)
        ref = None if reference is None else Reference(reference[0][held], [reference[1][i] for i in held],
                                                       model=model if method.live_reference else None)
        for i, score in zip(held, pair_losses(fold_model, select(examples, held), method, ref, packing)):
            scores[i] = score
    set_rng_state(saved_rng)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    dropped = set(order[:int(options.drop * n)])
    kept = [i for i in range(n) if i not in dropped]
    if reference is not None and cfg.ref_cache:  # the filtered run's own reference: read, not scored again
        cache_subsets(model, examples, packing, [kept], reference)
    path = Path(cfg.output_dir) / "selective_scores.jsonl"
    write_jsonl_atomic(path, [{"source": e.source, "row": e.row, "fold": fold_of[i], "score": scores[i],
                               "dropped": i in dropped} for i, e in enumerate(examples)])
    if dropped:
        log.info("filter selective: dropped %d of %d pairs (held-out %s loss >= %.4g over %d folds; rows %s); scores "
                 "in %s", len(dropped), n, cfg.loss, min(scores[i] for i in dropped), options.folds,
                 sorted(examples[i].row for i in dropped)[:20], path)
    return select(examples, kept)

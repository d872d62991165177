"""The learner of a round: passes over its experience in minibatch optimizer steps of the shared step."""

from __future__ import annotations

import random

from alignkit.train.distributed import split_for_ranks
from alignkit.train.loss_inputs import mean_trained_lengths


def learn(stepper, method, packing, experience, cfg, round_index: int) -> dict:
    """cfg.num_iterations passes over the experience, each in cfg.minibatches optimizer steps of the shared step (examples
    shuffled, seeded by the round); a minibatch over max_tokens_per_batch accumulates over micro-batches, which are
    shared out over the ranks. Returns the loss metrics averaged over the round's steps, and the engine/trainer gap
    of the first step (before any update). stepper: train/step.Stepper; method: train/method.Method; packing:
    train/packing.Packing; cfg: the OnlineConfig."""
    examples, ctx = experience.examples, stepper.ctx
    rng = random.Random(cfg.seed * 1_000_003 + round_index)
    totals: dict[str, float] = {}
    gap = {"sum": 0.0, "tokens": 0.0, "max": 0.0}
    steps = 0
    stepper.train_model.train()
    for _ in range(cfg.num_iterations):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for part in (order[i::cfg.minibatches] for i in range(cfg.minibatches)):
            if not part:
                continue
            step_lengths = mean_trained_lengths(examples, part)
            micro = [[part[j] for j in mb] for mb in packing.batches([examples[i] for i in part])]
            local = split_for_ranks(micro, ctx.world_size, stepper.steps_done)[ctx.rank]

            def forward(indices, step_lengths=step_lengths, first=steps == 0):
                batch = packing.pack([examples[i] for i in indices], indices)
                losses, metrics = method.forward(stepper.train_model, batch, experience, experience.reference,
                                                 step_lengths)
                if first and "engine_gap/sum" in metrics:  # before any update: the engine against the trainer
                    gap["sum"] += float(metrics["engine_gap/sum"].sum())
                    gap["tokens"] += float(metrics["engine_gap/tokens"].sum())
                    gap["max"] = max(gap["max"], float(metrics["engine_gap/max"].max()))
                return losses, {k: v for k, v in metrics.items() if not k.startswith("engine_gap/")}, batch.num_tokens

            for key, value in stepper.step(local, len(part), forward).items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
    averaged = {key: value / steps for key, value in totals.items() if key not in ("examples", "skipped_steps")}
    if gap["tokens"]:  # mean and max |log pi_engine - log pi_trainer| over the sampled tokens of the first step
        averaged.update({"engine_gap_mean": gap["sum"] / gap["tokens"], "engine_gap_max": gap["max"]})
    return {**averaged, "updates": steps, "skipped_steps": stepper.skipped}

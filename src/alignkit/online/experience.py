"""From a rollout to an Experience the shared step trains on: one builder per kind of method (ONLINE_METHODS picks
it). GRPO / RLOO: the rollout's rewards, the reference's log-probs (only where the loss has a KL term) and the
behaviour policy's (only where a rollout feeds more than one update); PPO adds advantages, returns and the value
head's predictions at rollout time; online DPO / self-rewarding: preference pairs of the samples, with APO's
extrapolated reference and CREAM's consistency weights. All scoring goes through train/reference.score_examples."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from alignkit.data.pack import PackedBatch
from alignkit.data.pairs import best_worst
from alignkit.data.tokenize import TokenizedExample
from alignkit.losses import LossInputs
from alignkit.losses.base import needs
from alignkit.models.token_kl import pad_tokens
from alignkit.online.advantages import (
    RunningMoments,
    masked_whiten,
    normalise_scores,
    ppo_advantages,
    reinforce_pp_advantages,
)
from alignkit.online.rollout import Rollout, training_examples
from alignkit.online.self_reward import consistency_weights, implicit_reward_agreement
from alignkit.online.turn_credit import turn_credit_advantages, turn_credit_scores
from alignkit.train.apo import extrapolated_logps
from alignkit.train.cross_teacher import with_teacher_tokens
from alignkit.train.packing import Packing
from alignkit.train.ref_update import MovingReference
from alignkit.train.reference import Reference, reference_logps, score_examples


@dataclass
class Experience:
    """A rollout made ready for a loss: examples (a prompt and its responses), the reference's values (a Reference,
    as offline) and, by LossInputs field name, what the loss reads of each example: per_response [n, k] (rewards,
    old_logps), per_token (one flat tensor per example over its responses' tokens in packing order, as score_examples
    returns them: old_token_logps, advantages, returns, old_values) and per_example [n] (consistency)."""

    examples: list[TokenizedExample]
    reference: Reference | None = None
    per_response: dict[str, torch.Tensor] = field(default_factory=dict)
    per_token: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # of the rollout: mean reward, KL, ...
    trained: torch.Tensor | None = None  # [n, k] bool: responses that carry loss (mask_truncated drops the cut ones)

    def fill(self, inputs: LossInputs, batch: PackedBatch) -> None:
        """Set the batch's rows of every field on `inputs` (train/method.Method.forward calls this)."""
        idx = batch.example_indices
        device = inputs.logps.device
        for name, values in {**self.per_response, **self.per_example}.items():
            setattr(inputs, name, values[idx].to(device))
        for name, flat in self.per_token.items():
            setattr(inputs, name, pad_tokens(torch.cat([flat[i] for i in idx]).to(device), batch))
        if self.trained is not None:  # the responses keep their place in the group; their tokens carry no loss
            inputs.token_mask = inputs.token_mask & self.trained[idx].to(inputs.token_mask.device)[..., None]


@dataclass
class Scorer:
    """Scores examples without gradients, in the learner's packing: the behaviour policy (the module the step
    trains: with PPO's value head, its values too) and the reference (a frozen model, or, under LoRA, the policy
    with its adapters disabled)."""

    trained: torch.nn.Module  # the policy, or a PolicyWithValueHead
    policy: torch.nn.Module
    packing: Packing

    def reference(self, model, examples: list[TokenizedExample]):
        """(seq [n, k], flat token log-probs) of `model`; None: the policy's base (train/reference.reference_logps
        disables LoRA adapters; never cached: a rollout is scored once)."""
        return reference_logps(model if model is not None else self.policy, examples, self.packing, use_cache=False)

    def behaviour(self, examples: list[TokenizedExample], with_values: bool = False):
        return score_examples(self.trained, examples, self.packing, with_values)


@dataclass
class RoundContext:
    """What an experience builder may read in a round."""

    cfg: object  # OnlineConfig
    opts: object  # the loss's options
    scorer: Scorer
    references: MovingReference | None  # the reference and the previous round's (None under LoRA: the base)
    moments: RunningMoments
    judge_for: Callable | None  # model -> Reward (self-rewarding: the previous iteration's judge)
    prompt_pool: list = field(default_factory=list)  # every training prompt (dynamic sampling refills from it)
    metrics: dict[str, float] = field(default_factory=dict)
    teacher: object = None  # distillation's frozen teacher
    tokenizers: tuple = ()  # uld: (the student's tokenizer, the teacher's)

    @property
    def reference(self):
        """The reference model (None: the policy with its LoRA adapters off)."""
        return self.references.reference if self.references is not None else None

    @property
    def previous(self):
        """The previous round's reference, once there is one."""
        return self.references.last if self.references is not None else None


def _scored(rollout: Rollout, round_ctx: RoundContext, behaviour: bool, with_values: bool = False):
    """Experience with rewards, the reference where the loss reads it, the behaviour policy's log-probs if asked.
    The later segments of forked conversations are examples too, each with its prompt's rewards (and finished), so
    a segment's slot takes its conversation's group-relative advantage."""
    examples, engine_logps, rows = training_examples(rollout)
    index = torch.tensor(rows, dtype=torch.long)
    experience = Experience(examples, per_response={"rewards": rollout.rewards[index]})
    if engine_logps is not None:
        experience.per_token["engine_token_logps"] = engine_logps
    if round_ctx.cfg.mask_truncated:
        experience.trained = rollout.finished[index].clone()
    if "reference" in needs(round_ctx.opts):
        experience.reference = Reference(*round_ctx.scorer.reference(round_ctx.reference, examples))
    if behaviour:
        old = round_ctx.scorer.behaviour(examples, with_values)
        experience.per_response["old_logps"] = old[0]
        experience.per_token["old_token_logps"] = old[1]
        if experience.reference is not None:  # per conversation: the sum over its segments
            kl = torch.zeros_like(rollout.rewards).index_add_(0, index, old[0] - experience.reference.seq_logps)
            experience.metrics["kl"] = float(kl.mean())
        if with_values:
            experience.per_token["old_values"] = old[2]
    return experience


def rl_experience(rollout: Rollout, round_ctx: RoundContext) -> Experience:
    """GRPO / RLOO: behaviour log-probs only where a rollout feeds several updates (else the ratio is 1 and the
    policy's own detached log-probs stand in, as TRL does). With turn_credit per_turn, each token's advantage is its
    turn's (online/turn_credit.py), in place of the loss's group advantage of the conversations' rewards."""
    experience = _scored(rollout, round_ctx, behaviour=round_ctx.cfg.updates_per_round > 1)
    if round_ctx.cfg.turn_credit == "per_turn":
        experience.per_token["advantages"] = turn_credit_advantages(
            rollout.examples, experience.examples, training_examples(rollout)[2], round_ctx.opts.scale_rewards)
    return experience


def distill_experience(rollout: Rollout, round_ctx: RoundContext) -> Experience:
    """On-policy distillation: GRPO's experience plus the teacher's log-probs of every sampled token, scored once
    per rollout in the learner's packing (at the sampling temperature, as the student)."""
    if round_ctx.teacher is None:
        raise ValueError("on-policy distillation needs a teacher model in the round")
    experience = rl_experience(rollout, round_ctx)
    seq_logps, token_logps = round_ctx.scorer.reference(round_ctx.teacher, experience.examples)  # forked segments too
    experience.per_token["teacher_token_logps"] = token_logps
    experience.metrics["teacher_logp"] = float(seq_logps.mean())
    return experience


def uld_experience(rollout: Rollout, round_ctx: RoundContext) -> Experience:
    """On-policy ULD (GOLD's on-policy mode): GRPO's experience with each sample also in the teacher's tokenisation,
    aligned to the student's (data/crosstok.py); the teacher runs on those tokens in the learner's forward."""
    experience = rl_experience(rollout, round_ctx)
    experience.examples = with_teacher_tokens(experience.examples, *round_ctx.tokenizers)
    return experience


def reinforce_experience(rollout: Rollout, round_ctx: RoundContext) -> Experience:
    """REINFORCE++: the group-centred rewards whitened over every trained token of the whole rollout (global, not per
    micro-batch: the experience holds the round's every response); with turn_credit per_turn, each token's turn's
    return centred on the group's returns of that turn index."""
    experience = _scored(rollout, round_ctx, behaviour=round_ctx.cfg.updates_per_round > 1)
    examples = experience.examples
    _, mask = pad_flat([torch.zeros(sum(e.trained_lengths)) for e in examples], examples)
    if experience.trained is not None:
        mask = mask & experience.trained[..., None]
    if round_ctx.cfg.turn_credit == "per_turn":  # each token its turn's centred return, then the same whitening
        scores = turn_credit_scores(rollout.examples, examples, training_examples(rollout)[2], round_ctx.opts.baseline)
        advantages = masked_whiten(pad_flat(scores, examples)[0], mask)
    else:
        advantages = reinforce_pp_advantages(experience.per_response["rewards"], mask, round_ctx.opts.baseline)
    experience.per_token["advantages"] = split_flat(advantages, examples)
    return experience


def ppo_experience(rollout: Rollout, round_ctx: RoundContext) -> Experience:
    """PPO: behaviour log-probs and values always (the KL-shaped reward and value clipping read them), then GAE.
    GAE runs over each response's trained tokens in order: in a multi-turn conversation over its assistant tokens
    only, the environment's skipped (verl's convention), across its segments where it forked, with the score on its
    last sampled token."""
    experience = _scored(rollout, round_ctx, behaviour=True, with_values=True)
    examples, rows = experience.examples, training_examples(rollout)[2]
    values, mask = pad_flat(experience.per_token["old_values"], examples, rows)
    old_logps, _ = pad_flat(experience.per_token["old_token_logps"], examples, rows)
    ref_logps, _ = pad_flat(experience.reference.token_logps, examples, rows)
    opts = round_ctx.opts
    rewards = normalise_scores(rollout.rewards, round_ctx.moments, opts.reward_norm, opts.reward_clip)
    out = ppo_advantages(rewards, old_logps, ref_logps, values, mask, opts)
    experience.per_token.update(advantages=split_flat(out["advantages"], examples, rows),
                                returns=split_flat(out["returns"], examples, rows))
    experience.metrics["value_mean"] = float(values[mask].mean())
    experience.metrics["return_mean"] = float(out["returns"][mask].mean())
    return experience


def pair_experience(rollout: Rollout, round_ctx: RoundContext) -> Experience:
    """Online DPO / self-rewarding: (chosen, rejected) pairs of the rollout's samples for a pairwise loss, the
    reference's log-probs scored once per rollout, APO's extrapolated reference (arXiv 2410.06293: with apo_alpha > 0,
    log pi_ref <- (1 + a) log pi_t - a log pi_{t-1}, whose normaliser cancels in every pairwise loss), CREAM's
    consistency weights from the previous iteration's judge, and the implicit reward's agreement with the judge."""
    cfg, metrics = round_ctx.cfg, round_ctx.metrics
    triples = preference_pairs(rollout.rewards, cfg.pairs)
    ref_seq, _ = round_ctx.scorer.reference(round_ctx.reference, rollout.examples)
    previous = round_ctx.previous
    previous_seq = round_ctx.scorer.reference(previous, rollout.examples)[0] if previous is not None else None
    consistency = None
    if cfg.consistency != "none" and previous is not None:
        flat_prompts = [p for p, group in zip(rollout.prompts, rollout.texts) for _ in group]
        flat_texts = [t for group in rollout.texts for t in group]
        earlier = torch.tensor(round_ctx.judge_for(previous)(flat_prompts, flat_texts), dtype=torch.float32)
        consistency = consistency_weights(rollout.rewards, earlier.view_as(rollout.rewards), cfg.consistency)
        metrics["consistency"] = float(consistency.mean())
    if previous_seq is not None and round_ctx.judge_for is not None:
        # The implicit reward of the policy at this round's start (the reference) against its own reference.
        metrics["implicit_judge_agreement"] = implicit_reward_agreement(ref_seq - previous_seq, triples)
    metrics["pairs"] = len(triples)
    return pairs_of(rollout, triples, ref_seq, previous_seq, cfg.apo_alpha, consistency)


def pairs_of(rollout: Rollout, triples: list[tuple[int, int, int]], ref_seq: torch.Tensor,
             previous_ref_seq: torch.Tensor | None = None, apo_alpha: float = 0.0,
             consistency: torch.Tensor | None = None) -> Experience:
    """The Experience of (prompt, chosen, rejected) triples; ref_seq [B, k]: the reference's log-probs of every
    sample; consistency [B]: CREAM's per-prompt weight, carried to the loss."""
    if apo_alpha > 0 and previous_ref_seq is not None:
        ref_seq = extrapolated_logps(ref_seq, previous_ref_seq, apo_alpha)
    examples = [TokenizedExample(rollout.examples[b].prompt_ids,
                                 [rollout.examples[b].response_ids[i], rollout.examples[b].response_ids[j]])
                for b, i, j in triples]
    prompt_idx = torch.tensor([b for b, _, _ in triples], dtype=torch.long)
    chosen = torch.tensor([i for _, i, _ in triples], dtype=torch.long)
    rejected = torch.tensor([j for _, _, j in triples], dtype=torch.long)
    pair_ref = torch.stack([ref_seq[prompt_idx, chosen], ref_seq[prompt_idx, rejected]], 1)
    experience = Experience(examples, Reference(pair_ref, [torch.empty(0)] * len(examples)))
    if consistency is not None:
        experience.per_example["consistency"] = consistency[prompt_idx]
    return experience


def preference_pairs(rewards: torch.Tensor, mode: str = "best-worst") -> list[tuple[int, int, int]]:
    """(prompt, chosen sample, rejected sample) triples from [B, k] rewards. best-worst: the highest against the lowest
    reward (first of equals), none if they tie; all: every pair with a strictly higher reward. NaN rewards are skipped."""
    triples = []
    for b, row in enumerate(rewards.tolist()):
        valid = [i for i, r in enumerate(row) if not math.isnan(r)]
        if mode == "best-worst":
            chosen = best_worst(row)
            triples += [(b, *chosen)] if chosen is not None else []
        else:
            triples += [(b, i, j) for i in valid for j in valid if row[i] > row[j]]
    return triples


def _offsets(examples: list[TokenizedExample], rows: list[int] | None):
    """(rows, per example and response its first token's place in its prompt's row of [B, k, T], T)."""
    rows = list(range(len(examples))) if rows is None else rows
    k = len(examples[0].response_ids)
    filled = torch.zeros(max(rows) + 1, k, dtype=torch.long)
    starts = []
    for row, example in zip(rows, examples):
        starts.append(filled[row].tolist())
        filled[row] += torch.tensor(example.trained_lengths, dtype=torch.long)
    return rows, starts, int(filled.max())


def split_flat(values: torch.Tensor, examples: list[TokenizedExample], rows: list[int] | None = None
               ) -> list[torch.Tensor]:
    """A [B, k, T] tensor back to one flat tensor per example (its responses' tokens in order), the Experience form;
    rows: the prompt (row of values) of each example, whose responses continue that row's (default: example b is
    row b)."""
    rows, starts, _ = _offsets(examples, rows)
    return [torch.cat([values[row, i, start:start + n] for i, (start, n) in enumerate(zip(first, e.trained_lengths))])
            for row, first, e in zip(rows, starts, examples)]


def pad_flat(flat: list[torch.Tensor], examples: list[TokenizedExample], rows: list[int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One flat tensor per example -> ([B, k, T] zero-padded, bool mask): the inverse of split_flat (rows: the
    same)."""
    rows, starts, T = _offsets(examples, rows)
    k = len(examples[0].response_ids)
    values = torch.zeros(max(rows) + 1, k, T)
    mask = torch.zeros(max(rows) + 1, k, T, dtype=torch.bool)
    for row, first, part_flat, example in zip(rows, starts, flat, examples):
        for i, part in enumerate(torch.split(part_flat, example.trained_lengths)):
            values[row, i, first[i]:first[i] + len(part)] = part
            mask[row, i, first[i]:first[i] + len(part)] = True
    return values, mask

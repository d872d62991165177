"""From a rollout to an Experience the learner trains on: the reference's (and, where more than one update uses the
rollout, the behaviour policy's) log-probs for GRPO / RLOO / PPO, PPO's advantages, or preference pairs for online
DPO, with APO's extrapolated reference and CREAM's consistency weights."""

from __future__ import annotations

import math

import torch

from alignkit.data.tokenize import TokenizedExample
from alignkit.online.advantages import RunningMoments, ppo_advantages
from alignkit.online.learner import Experience, Learner, pad_flat, split_flat
from alignkit.online.rollout import Rollout
from alignkit.train.apo import extrapolated_logps
from alignkit.train.reference import score_examples


def reference_scores(model, examples: list[TokenizedExample], learner: Learner):
    """Summed [n, k] and per-example flat per-token log-probs of `model` (no gradients, eval mode)."""
    cfg = learner.cfg
    return score_examples(model, examples, cfg.max_tokens_per_batch, cfg.max_tokens_per_row, learner.pad_token_id,
                          cfg.precision, cfg.chunk_size)


def rl_experience(rollout: Rollout, learner: Learner, reference, method: str, opts,
                  moments: RunningMoments | None = None) -> Experience:
    """GRPO / RLOO / PPO: the rollout's rewards as `scores`, the reference's log-probs (unless the loss has no KL
    term: GRPO / RLOO with kl_coef 0, as TRL then loads no reference), and the behaviour policy's wherever the ratio
    is not trivially 1 (PPO always: its KL-shaped reward and value clipping read them); PPO adds advantages, returns
    and the value head's predictions at rollout time."""
    examples = rollout.examples
    experience = Experience(examples, per_response={"scores": rollout.rewards})
    ref_seq = ref_tokens = None
    if method == "ppo" or opts.kl_coef > 0:
        ref_seq, ref_tokens = reference_scores(reference, examples, learner)
        experience.per_response["ref_logps"] = ref_seq
        experience.per_token["ref_token_logps"] = ref_tokens
    if method == "ppo" or learner.cfg.updates_per_rollout > 1:
        old_seq, old_tokens, old_values = learner.score(examples)
        experience.per_response["old_logps"] = old_seq
        experience.per_token["old_token_logps"] = old_tokens
        if ref_seq is not None:
            experience.metrics["kl"] = float((old_seq - ref_seq).mean())
        if method == "ppo":
            values, mask = pad_flat(old_values, examples)
            old_logps, _ = pad_flat(old_tokens, examples)
            ref_logps, _ = pad_flat(ref_tokens, examples)
            out = ppo_advantages(rollout.rewards, old_logps, ref_logps, values, mask, opts, moments)
            experience.per_token.update(old_values=old_values, advantages=split_flat(out["advantages"], examples),
                                        returns=split_flat(out["returns"], examples))
            experience.metrics["value_mean"] = float(values[mask].mean())
            experience.metrics["return_mean"] = float(out["returns"][mask].mean())
    return experience


def preference_pairs(rewards: torch.Tensor, mode: str = "best-worst") -> list[tuple[int, int, int]]:
    """(prompt, chosen sample, rejected sample) triples from [B, k] rewards. best-worst: the highest against the lowest
    reward (first of equals), none if they tie; all: every pair with a strictly higher reward. NaN rewards are skipped."""
    triples = []
    for b, row in enumerate(rewards.tolist()):
        valid = [i for i, r in enumerate(row) if not math.isnan(r)]
        if mode == "best-worst":
            if len(valid) < 2:
                continue
            best = max(valid, key=lambda i: (row[i], -i))
            worst = min(valid, key=lambda i: (row[i], i))
            if row[best] > row[worst]:
                triples.append((b, best, worst))
        else:
            triples += [(b, i, j) for i in valid for j in valid if row[i] > row[j]]
    return triples


def pair_experience(rollout: Rollout, triples: list[tuple[int, int, int]], ref_seq: torch.Tensor,
                    previous_ref_seq: torch.Tensor | None = None, apo_alpha: float = 0.0,
                    consistency: torch.Tensor | None = None) -> Experience:
    """Pairs (chosen, rejected) of the rollout's samples for a pairwise loss (dpo, cream, ...). ref_seq [B, k]: the
    reference's summed log-probs of every sample, scored once per rollout. APO (arXiv 2410.06293): with apo_alpha > 0
    the reference is extrapolated from the previous round's, log pi_ref <- (1 + a) log pi_t - a log pi_{t-1}
    (train/apo.py's extrapolated_logps: the paper's form, whose normaliser cancels in every pairwise loss).
    consistency [B]: CREAM's per-prompt weight, carried to the loss."""
    if apo_alpha > 0 and previous_ref_seq is not None:
        ref_seq = extrapolated_logps(ref_seq, previous_ref_seq, apo_alpha)
    examples = [TokenizedExample(rollout.examples[b].prompt_ids,
                                 [rollout.examples[b].response_ids[i], rollout.examples[b].response_ids[j]])
                for b, i, j in triples]
    prompt_idx = torch.tensor([b for b, _, _ in triples], dtype=torch.long)
    chosen = torch.tensor([i for _, i, _ in triples], dtype=torch.long)
    rejected = torch.tensor([j for _, _, j in triples], dtype=torch.long)
    experience = Experience(examples, per_response={
        "ref_logps": torch.stack([ref_seq[prompt_idx, chosen], ref_seq[prompt_idx, rejected]], 1)})
    if consistency is not None:
        experience.per_example["consistency"] = consistency[prompt_idx]
    return experience

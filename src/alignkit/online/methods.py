"""The online methods, one line each: the loss they train with (a registry name), the function that turns a rollout
into an Experience, whether they need a value head, whether they train on preference pairs of the samples, whether
the policy judges its own samples, and how often the reference follows the policy by default. Adding a method is a
loss in the registry, perhaps an experience builder, and one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from alignkit.online.experience import (
    distill_experience,
    pair_experience,
    ppo_experience,
    reinforce_experience,
    rl_experience,
    uld_experience,
)


@dataclass(frozen=True)
class OnlineMethod:
    loss: str  # the default loss (online-dpo / self-reward: any pairwise loss on sequence log-probs, via `loss`)
    experience: Callable  # (Rollout, RoundContext) -> Experience
    paper: str
    value_head: bool = False  # PPO's critic: a PolicyWithValueHead is trained, its head in its own parameter group
    pairs: bool = False  # trains on (chosen, rejected) pairs of a prompt's samples
    self_judge: bool = False  # the policy (or `judge`) scores the samples; CREAM compares consecutive iterations
    reference_every: int = 0  # default ref_update_every (0: the reference stays the starting policy)
    dynamic_sampling: bool = False  # default: groups whose rewards all tie are dropped and refilled (DAPO)
    turn_credit: bool = False  # takes per-token advantages, so turn_credit per_turn (online/turn_credit.py)


ONLINE_METHODS: dict[str, OnlineMethod] = {
    "grpo": OnlineMethod("grpo", rl_experience, "arXiv 2402.03300", turn_credit=True),
    "dapo": OnlineMethod("dapo", rl_experience, "arXiv 2503.14476", dynamic_sampling=True,
                         turn_credit=True),
    "gspo": OnlineMethod("gspo", rl_experience, "arXiv 2507.18071", turn_credit=True),
    "cispo": OnlineMethod("cispo", rl_experience, "arXiv 2506.13585", turn_credit=True),
    "reinforce++": OnlineMethod("reinforce++", reinforce_experience, "arXiv 2501.03262",
                                turn_credit=True),
    "rloo": OnlineMethod("rloo", rl_experience, "arXiv 2402.14740"),
    "ppo": OnlineMethod("ppo", ppo_experience, "arXiv 1707.06347, 2307.04964", value_head=True),
    "online-dpo": OnlineMethod("dpo", pair_experience, "arXiv 2402.04792", pairs=True),
    # Distillation toward `teacher` (docs/distillation.md): its log-probs of the samples as a per-token advantage,
    # or GKD's divergence over the vocabulary on the student's samples (TRL's DistillationTrainer: beta 1).
    "opd": OnlineMethod("opd", distill_experience, "Thinking Machines 2025, on-policy distillation"),
    "gkd": OnlineMethod("gkd", rl_experience, "arXiv 2306.13649"),
    # ULD on the student's samples toward a teacher of any vocabulary (TRL's GOLD, on-policy): teacher_tokenizer own
    "uld": OnlineMethod("uld", uld_experience, "arXiv 2402.12030"),
    "self-reward": OnlineMethod("dpo", pair_experience, "arXiv 2401.10020", pairs=True, self_judge=True,
                                reference_every=1),
}

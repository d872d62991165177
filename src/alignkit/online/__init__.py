"""Online and iterative alignment: a rollout (sample k responses per prompt with the current policy, score them) and a
learner (the registered loss on packed log-probs) per round. GRPO, RLOO, PPO, online / iterative DPO (with APO) and
self-rewarding (with CREAM). See docs/online.md."""

from alignkit.online.run import METHODS, OnlineConfig, OnlineResult, evaluate_policy, run_online

__all__ = ["METHODS", "OnlineConfig", "OnlineResult", "evaluate_policy", "run_online"]

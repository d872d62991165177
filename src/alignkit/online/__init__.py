"""Online and iterative alignment: rounds of rollout (sample k responses per prompt with the current policy, score
them) -> experience (ONLINE_METHODS' builder) -> the shared optimizer step of train/step.py. GRPO, RLOO, PPO, online /
iterative DPO (with APO) and self-rewarding (with CREAM). See docs/online.md."""

from alignkit.online.config import OnlineConfig, online_config
from alignkit.online.methods import ONLINE_METHODS, OnlineMethod
from alignkit.online.run import METHODS, OnlineInputs, OnlineResult, run_online
from alignkit.online.sampling import evaluate_policy

__all__ = ["METHODS", "ONLINE_METHODS", "OnlineConfig", "OnlineInputs", "OnlineMethod", "OnlineResult", "evaluate_policy",
           "online_config", "run_online"]

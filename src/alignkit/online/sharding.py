"""What an online run with an FSDP2-sharded learner (`distributed: fsdp`) refuses, said before anything is written:
whatever runs the policy outside the learner's lockstep forwards (every rank takes part in every forward of a sharded
model, while each rank samples a different share of the prompts). docs/distributed.md, "Online RL with FSDP2"."""

from __future__ import annotations

from alignkit.errors import ConfigError
from alignkit.generate.engines import fast_engine_supports
from alignkit.online.config import OnlineConfig
from alignkit.online.methods import ONLINE_METHODS


def check_sharded_setup(cfg: OnlineConfig) -> None:
    """The keys an FSDP2 online run refuses, checked from the config alone."""
    method = ONLINE_METHODS[cfg.method]
    refused = {"lora": cfg.lora is not None and "fsdp with lora is not supported (nor offline); use distributed: ddp",
               "method": (method.value_head and "ppo's value head is not sharded yet; use distributed: ddp")
               or (method.self_judge and f"{cfg.method}: the policy judges its samples on each rank's share, which "
                                         "a sharded policy cannot; use distributed: ddp"),
               "sampling.engine": cfg.sampling.engine == "hf" and "hf samples with the training model itself, which "
                                  "FSDP2 shards; use fast (CPU) or vllm (GPU): they hold their own whole copy"}
    for key, reason in refused.items():
        if reason:
            raise ConfigError(key, reason)


def check_sharded_engine(cfg: OnlineConfig, model, ctx) -> None:
    """engine auto picks hf where the fast engine does not run the model: refused under FSDP2 like hf itself."""
    if ctx.enabled and cfg.distributed == "fsdp" and cfg.sampling.engine == "auto" and not fast_engine_supports(model):
        raise ConfigError("sampling.engine", f"auto falls back to hf for {type(model).__name__}, which samples with the "
                                             "training model FSDP2 shards; use vllm (GPU) or distributed: ddp")

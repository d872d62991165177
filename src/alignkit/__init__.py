"""alignkit: align language models with human preferences (SFT, DPO family, reward models, online RL)."""

__version__ = "0.1.0"

"""Rollout engines: generate(prompt_ids, sampling, num_samples) -> the sampled token ids, each token's log-prob under
the distribution it was sampled from, and why each sample ended; update_weights(model) after every optimizer step.
`hf` (engines/hf.py) is the reference engine: HF generate on the training model itself."""

from alignkit.generate.engines.base import Engine, Generation, cut_at_stop
from alignkit.generate.engines.hf import HFEngine

__all__ = ["Engine", "Generation", "HFEngine", "cut_at_stop"]

"""Batched sampling, seeded and reproducible, with stop strings, through a rollout engine (generate/engines: HF
generate, the fast CPU engine, vLLM).

`sample` returns texts; `sample_with_counts` also returns how many tokens each sample cost, which the
decoding-time methods (decode/) turn into compute accounting. An engine (e.g. generate/engines/vllm.py's
VLLMEngine) is accepted in place of the model and used the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.config import SamplingOptions
from alignkit.generate.engines import as_engine, encode_prompts


@dataclass
class Samples:
    texts: list[list[str]]  # [prompt][sample]
    num_tokens: list[list[int]]  # tokens generated for each sample (up to and including its stop token)
    extra: dict = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(sum(row) for row in self.num_tokens)


@torch.no_grad()
def sample_with_counts(model, tokenizer, prompts: list, sampling: SamplingOptions, num_samples: int = 1,
                       seed: int = 0) -> Samples:
    """num_samples completions per prompt and the tokens each cost. Same seed, prompts and batch_size ->
    the same samples; the global torch RNG is left as it was. `extra["generation"]` holds the engine's token ids,
    log-probs and finish reasons (generate/engines)."""
    engine = as_engine(model, tokenizer, sampling)
    generation = engine.generate(encode_prompts(tokenizer, prompts), sampling, num_samples, seed)
    return Samples(generation.texts, generation.generated, {"generation": generation})


def sample(model, tokenizer, prompts: list, sampling: SamplingOptions, num_samples: int = 1,
           seed: int = 0) -> list[list[str]]:
    """num_samples completions per prompt (decoded, special tokens stripped, cut at stop strings)."""
    return sample_with_counts(model, tokenizer, prompts, sampling, num_samples, seed).texts

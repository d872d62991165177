"""Batched sampling, seeded and reproducible, with stop strings, through a rollout engine (generate/engines: HF
generate, the fast CPU engine, vLLM).

`sample` returns texts; `sample_with_counts` also returns how many tokens each sample cost, which the
decoding-time methods (decode/) turn into compute accounting. An engine (e.g. generate/engines/vllm.py's
VLLMEngine) is accepted in place of the model and used the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.generate.engines import as_engine, encode_prompts


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    batch_size: int = 16  # prompts per generate call (each with num_samples sequences)
    seed: int = 0
    stop: tuple[str, ...] = ()  # a sample is cut before the first occurrence of any of these strings
    engine: str = "auto"  # hf (the reference), fast, vllm, or auto: fast where it runs (generate/engines)
    engine_precision: str = "fp32"  # the fast engine's weights: fp32 or bf16

    @classmethod
    def from_options(cls, options, seed: int) -> SamplingConfig:
        """From a command's `sampling:` section (config.SamplingOptions) and the seed of this use."""
        return cls(max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                   top_k=options.top_k, batch_size=options.batch_size, seed=seed, stop=options.stop_strings,
                   engine=options.engine, engine_precision=options.engine_precision)


@dataclass
class Samples:
    texts: list[list[str]]  # [prompt][sample]
    num_tokens: list[list[int]]  # tokens generated for each sample (up to and including its stop token)
    extra: dict = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(sum(row) for row in self.num_tokens)


@torch.no_grad()
def sample_with_counts(model, tokenizer, prompts: list, cfg: SamplingConfig, num_samples: int = 1) -> Samples:
    """num_samples completions per prompt and the tokens each cost. Same seed, prompts and batch_size ->
    the same samples; the global torch RNG is left as it was. `extra["generation"]` holds the engine's token ids,
    log-probs and finish reasons (generate/engines)."""
    generation = as_engine(model, tokenizer, cfg).generate(encode_prompts(tokenizer, prompts), cfg, num_samples)
    return Samples(generation.texts, generation.generated, {"generation": generation})


def sample(model, tokenizer, prompts: list, cfg: SamplingConfig, num_samples: int = 1) -> list[list[str]]:
    """num_samples completions per prompt (decoded, special tokens stripped, cut at stop strings)."""
    return sample_with_counts(model, tokenizer, prompts, cfg, num_samples).texts

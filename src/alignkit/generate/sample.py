"""Batched sampling, seeded and reproducible, with stop strings, through a rollout engine (generate/engines: HF
generate, the fast CPU engine, vLLM).

`sample` returns texts; `sample_with_counts` also returns how many tokens each sample cost, which the
decoding-time methods (decode/) turn into compute accounting. An engine (e.g. generate/vllm_backend.py's vLLM
engine) is accepted in place of the model and used the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.data.template import render_chat


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    batch_size: int = 16  # prompts per generate call (each with num_samples sequences)
    seed: int = 0
    stop: tuple[str, ...] = ()  # a sample is cut before the first occurrence of any of these strings
    engine: str = "auto"  # hf (the reference), fast, or auto: fast where it runs (generate/engines)
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


def prompt_texts(tokenizer, prompts: list) -> list[str]:
    """Plain strings verbatim; message lists through the chat template with the generation prompt."""
    return [p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]


def stop_index(text: str, stop) -> int | None:
    """Where the first occurrence of any stop string starts in text; None if none occurs."""
    return min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=None)


def truncate_at_stop(text: str, stop) -> str:
    """text up to (not including) the first occurrence of any stop string."""
    cut = stop_index(text, stop)
    return text if cut is None else text[:cut]


def stop_token_ids(tokenizer, stop) -> list[int]:
    """Ids of the EOS token and of every stop string that is itself a special token (decoding with
    skip_special_tokens would drop those, so they are matched as tokens, and generation stops on them)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    special = set(tokenizer.all_special_tokens)
    ids += [tokenizer.convert_tokens_to_ids(s) for s in stop if s in special]
    return list(dict.fromkeys(ids))


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """The token ids generation starts from: plain strings verbatim, chats through the template."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts(tokenizer, prompts)]


@torch.no_grad()
def sample_with_counts(model, tokenizer, prompts: list, cfg: SamplingConfig, num_samples: int = 1) -> Samples:
    """num_samples completions per prompt and the tokens each cost. Same seed, prompts and batch_size ->
    the same samples; the global torch RNG is left as it was. `extra["generation"]` holds the engine's token ids,
    log-probs and finish reasons (generate/engines)."""
    from alignkit.generate.engines import as_engine

    generation = as_engine(model, tokenizer, cfg).generate(encode_prompts(tokenizer, prompts), cfg, num_samples)
    return Samples(generation.texts, generation.generated, {"generation": generation})


def sample(model, tokenizer, prompts: list, cfg: SamplingConfig, num_samples: int = 1) -> list[list[str]]:
    """num_samples completions per prompt (decoded, special tokens stripped, cut at stop strings)."""
    return sample_with_counts(model, tokenizer, prompts, cfg, num_samples).texts

"""Batched sampling with a KV cache (HF generate), seeded and reproducible, with stop strings.

`sample` returns texts; `sample_with_counts` also returns how many tokens each sample cost, which the
decoding-time methods (decode/) turn into compute accounting. A vLLM engine (generate/vllm_backend.py) is
accepted in place of the HF model and used the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.data.template import render_chat
from alignkit.models.inference import eval_mode


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    batch_size: int = 16  # prompts per generate call (each with num_samples sequences)
    seed: int = 0
    stop: tuple[str, ...] = ()  # a sample is cut before the first occurrence of any of these strings

    @classmethod
    def from_options(cls, options, seed: int) -> SamplingConfig:
        """From a command's `sampling:` section (config.SamplingOptions) and the seed of this use."""
        return cls(max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                   top_k=options.top_k, batch_size=options.batch_size, seed=seed, stop=options.stop_strings)


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


def truncate_at_stop(text: str, stop) -> str:
    """text up to (not including) the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def stop_token_ids(tokenizer, stop) -> list[int]:
    """Ids of the EOS token and of every stop string that is itself a special token (decoding with
    skip_special_tokens would drop those, so they are matched as tokens, and generation stops on them)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    special = set(tokenizer.all_special_tokens)
    ids += [tokenizer.convert_tokens_to_ids(s) for s in stop if s in special]
    return list(dict.fromkeys(ids))


def finish_sample(tokenizer, new_ids: list[int], end_ids: list[int], stop) -> tuple[str, int]:
    """(text, tokens generated) of one sample's new token ids: cut at the first end token, decode without
    special tokens, cut at the first stop string, strip."""
    length = len(new_ids)
    for i, token in enumerate(new_ids):
        if token in end_ids:
            length = i + 1
            new_ids = new_ids[:i]
            break
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return truncate_at_stop(text, stop).strip(), length


@torch.no_grad()
def sample_with_counts(model, tokenizer, prompts: list, cfg: SamplingConfig, num_samples: int = 1) -> Samples:
    """num_samples completions per prompt and the tokens each cost. Same seed, prompts and batch_size ->
    the same samples; the global torch RNG is left as it was."""
    if getattr(model, "is_vllm", False):
        return model.sample(tokenizer, prompts, cfg, num_samples)
    texts = prompt_texts(tokenizer, prompts)
    end_ids = stop_token_ids(tokenizer, cfg.stop)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = Samples([[] for _ in prompts], [[] for _ in prompts])
    device = next(model.parameters()).device
    do_sample = cfg.temperature > 0
    try:
        with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, len(texts), cfg.batch_size):
                chunk = texts[start:start + cfg.batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                torch.manual_seed(cfg.seed + start)  # each batch seeded: same prompts, same samples
                generated = model.generate(
                    **enc, do_sample=do_sample, max_new_tokens=cfg.max_new_tokens, num_return_sequences=num_samples,
                    temperature=cfg.temperature if do_sample else None, top_p=cfg.top_p if do_sample else None,
                    top_k=cfg.top_k if do_sample else None, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=end_ids or None,
                )
                new_tokens = generated[:, enc["input_ids"].shape[1]:].tolist()
                for j, ids in enumerate(new_tokens):
                    text, length = finish_sample(tokenizer, ids, end_ids, cfg.stop)
                    out.texts[start + j // num_samples].append(text)
                    out.num_tokens[start + j // num_samples].append(length)
    finally:
        tokenizer.padding_side = padding_side
    return out


def sample(model, tokenizer, prompts: list, cfg: SamplingConfig, num_samples: int = 1) -> list[list[str]]:
    """num_samples completions per prompt (decoded, special tokens stripped, cut at stop strings)."""
    return sample_with_counts(model, tokenizer, prompts, cfg, num_samples).texts

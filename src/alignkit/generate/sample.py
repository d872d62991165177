"""Batched sampling with a KV cache (HF generate), seeded and reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.template import render_chat


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16
    seed: int = 0


def prompt_texts(tokenizer, prompts: list) -> list[str]:
    """Plain strings verbatim; message lists through the chat template with the generation prompt."""
    return [p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]


@torch.no_grad()
def sample(model, tokenizer, prompts: list, cfg: SamplingConfig, num_samples: int = 1) -> list[list[str]]:
    """num_samples completions per prompt (decoded, special tokens stripped)."""
    was_training = model.training
    model.eval()
    texts = prompt_texts(tokenizer, prompts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    generator_seed = cfg.seed
    out: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(texts), cfg.batch_size):
            chunk = texts[start:start + cfg.batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(generator_seed + start)  # each batch seeded: same prompts, same samples
            do_sample = cfg.temperature > 0
            generated = model.generate(
                **enc, do_sample=do_sample, max_new_tokens=cfg.max_new_tokens, num_return_sequences=num_samples,
                temperature=cfg.temperature if do_sample else None, top_p=cfg.top_p if do_sample else None,
                top_k=cfg.top_k if do_sample else None, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1]:]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for j, text in enumerate(decoded):
                out[start + j // num_samples].append(text.strip())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return out

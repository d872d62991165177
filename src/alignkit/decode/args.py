"""ARGS: reward-guided search, token by token (arXiv 2402.01694; the official argsearch.py `generate_step`).

At each step: the top-k next tokens v by the LM; each scored s(v) = log p(v | x, y_<t) + w * r(x, y_<t + v),
the reward of the text so far with v appended; 'greedy' appends argmax s, 'sample' draws from softmax(s / T).
Log-probs and the official code's raw logits differ by a per-step constant, so the choice is the same.
Stops at EOS (the official code has no EOS stop and always runs max_new_tokens).  w = 0, k = 1 is greedy decoding."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from alignkit.config import Strict
from alignkit.decode.base import DecodeResult, Search, token_search
from alignkit.generate.engines import encode_prompts
from alignkit.models.inference import eval_mode


class ARGSOptions(Strict):
    top_k: int = Field(10, gt=0, description="candidate tokens per step")
    weight: float = Field(1.0, description="w: reward weight against the log-prob")
    mode: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(0.7, gt=0, description="for mode sample (the official default)")
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0, description="prompts decoded together")
    seed: int = 0

    # `alignkit decode` keys that fill these fields under other names.
    config_keys: ClassVar[dict[str, str]] = {"top_k": "search_top_k", "temperature": "search_temperature"}


def args_decode(model, tokenizer, prompts: list, reward, cfg: ARGSOptions) -> DecodeResult:
    """ARGS responses for every prompt, with the reward of each final response and the compute spent."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    search = Search.start(model, tokenizer, reward, cfg)
    responses: list[str] = []
    with eval_mode(model):
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = list(range(start, min(start + cfg.batch_size, len(prompts))))
            responses += _decode_batch(search, [prompts[i] for i in chunk], [prompt_ids[i] for i in chunk])
    rewards = reward(list(prompts), responses)
    search.compute.add(rewards=len(prompts))
    return DecodeResult(method="args", prompts=list(prompts), responses=responses, rewards=rewards,
                        compute=search.compute, options=cfg.model_dump())


def _decode_batch(search: Search, prompts, prompt_ids) -> list[str]:
    def rewards(active, top_ids, generated):  # r(x, y_<t + v) of every candidate v
        texts = [search.tokenizer.decode(generated[i] + [t], skip_special_tokens=True).strip()
                 for i, ids in zip(active, top_ids.tolist()) for t in ids]
        values = search.reward([prompts[i] for i in active for _ in range(top_ids.shape[1])], texts)
        search.compute.add(rewards=len(texts))
        return torch.tensor(values, dtype=torch.float32)

    return [search.text(ids) for ids in token_search(search, prompt_ids, rewards)]

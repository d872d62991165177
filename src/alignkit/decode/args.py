"""ARGS: reward-guided search, token by token (arXiv 2402.01694; the official argsearch.py `generate_step`).

At each step: the top-k next tokens v by the LM; each scored s(v) = log p(v | x, y_<t) + w * r(x, y_<t + v),
the reward of the text so far with v appended; 'greedy' appends argmax s, 'sample' draws from softmax(s / T).
Log-probs and the official code's raw logits differ by a per-step constant, so the choice is the same.
Stops at EOS (the official code has no EOS stop and always runs max_new_tokens).  w = 0, k = 1 is greedy decoding."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from alignkit.decode.base import (
    Compute,
    DecodeResult,
    IncrementalLM,
    choose,
    commit_tokens,
    decode_text,
)
from alignkit.generate.engines import encode_prompts, stop_token_ids
from alignkit.models.inference import eval_mode
from alignkit.train.packing import pad_token_id


@dataclass
class ARGSConfig:
    top_k: int = 10
    weight: float = 1.0  # w: reward weight against the log-prob
    mode: str = "greedy"  # or "sample"
    temperature: float = 0.7  # for mode "sample" (the official default)
    max_new_tokens: int = 64
    batch_size: int = 16  # prompts decoded together
    seed: int = 0


def args_decode(model, tokenizer, prompts: list, reward, cfg: ARGSConfig) -> DecodeResult:
    """ARGS responses for every prompt, with the reward of each final response and the compute spent."""
    if cfg.top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {cfg.top_k}")
    prompt_ids = encode_prompts(tokenizer, prompts)
    end_ids = stop_token_ids(tokenizer, ())
    pad_id = pad_token_id(tokenizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    compute = Compute()
    responses: list[str] = []
    with eval_mode(model):
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = list(range(start, min(start + cfg.batch_size, len(prompts))))
            responses += _decode_batch(model, tokenizer, [prompts[i] for i in chunk], [prompt_ids[i] for i in chunk],
                                       reward, cfg, end_ids, pad_id, generator, compute)
    rewards = reward(list(prompts), responses)
    compute.add(rewards=len(prompts))
    return DecodeResult(method="args", prompts=list(prompts), responses=responses, rewards=rewards, compute=compute,
                        options=asdict(cfg))


def _decode_batch(model, tokenizer, prompts, prompt_ids, reward, cfg: ARGSConfig, end_ids, pad_id, generator,
                  compute: Compute) -> list[str]:
    lm = IncrementalLM(model, prompt_ids, pad_id)
    generated: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    k = min(cfg.top_k, lm.logps.shape[-1])
    for _ in range(cfg.max_new_tokens):
        active = [i for i, done in enumerate(finished) if not done]
        if not active:
            break
        top_logps, top_ids = lm.logps[active].topk(k, dim=-1)  # [A, k]
        scores = top_logps
        if cfg.weight != 0:
            texts = [tokenizer.decode(generated[i] + [t], skip_special_tokens=True).strip()
                     for i, ids in zip(active, top_ids.tolist()) for t in ids]
            values = reward([prompts[i] for i in active for _ in range(k)], texts)
            compute.add(rewards=len(texts))
            scores = top_logps + cfg.weight * torch.tensor(values, dtype=top_logps.dtype).view(len(active), k)
        picked = top_ids.gather(1, choose(scores, cfg.mode, cfg.temperature, generator)[:, None]).squeeze(1)
        commit_tokens(lm, generated, finished, active, picked, end_ids, pad_id, compute)
    return [decode_text(tokenizer, ids, end_ids) for ids in generated]

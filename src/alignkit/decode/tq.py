"""Transfer Q*-style value-guided decoding (arXiv 2405.20495; official direct.py `TQ_direct.generate_step`).

The base policy (the SFT / reference model) supplies the next-token log-probs. At each step its top-k tokens z
are scored
    s(z) = log pi_base(z | x, y_<t) + alpha * Q(x, y_<t, z),
where Q is estimated by rolling out a baseline model already aligned to the target (direct transfer) for
`lookahead` tokens after z, greedily, and valuing the continuation c = z + rollout:
  value "implicit": beta * [log pi_aligned(c | x, y_<t) - log pi_base(c | x, y_<t)], the aligned model's
                    implicit (DPO) reward of the continuation: no reward model needed;
  value "reward":   r(x, y_<t + c) with any Reward (what the official code does, with its RM).
The prefix's own log-ratio is the same for every z at a step, so it is left out. Deviations of the official
code, for comparison: its logits come from the aligned (DPO) model itself, and rollouts are 20 tokens (5 in
indirect.py). alpha = 0 is greedy decoding of the base model."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from alignkit.config import Strict
from alignkit.data.pack import pack
from alignkit.data.tokenize import TokenizedExample
from alignkit.decode.base import (
    DecodeResult,
    Search,
    greedy_rollouts,
    token_search,
)
from alignkit.generate.engines import encode_prompts
from alignkit.models.inference import eval_mode
from alignkit.models.logprobs import response_logprobs


class TQOptions(Strict):
    top_k: int = Field(10, gt=0, description="candidate tokens per step")
    weight: float = Field(1.0, description="alpha")
    beta: float = Field(1.0, gt=0, description="scale of the implicit reward log pi_aligned - log pi_base")
    value: Literal["implicit", "reward"] = "implicit"
    lookahead: int = Field(8, ge=0, description="greedy tokens of the aligned model after each candidate")
    mode: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(0.7, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    max_tokens_per_row: int = Field(512, gt=0, description="packing of the continuations scored for the implicit "
                                                           "reward")
    seed: int = 0

    # `alignkit decode` keys that fill these fields under other names.
    config_keys: ClassVar[dict[str, str]] = {"top_k": "search_top_k", "temperature": "search_temperature"}


def tq_decode(model, tokenizer, prompts: list, aligned_model, cfg: TQOptions, reward=None) -> DecodeResult:
    """Value-guided responses of the base `model`, guided by `aligned_model` (same tokenizer). `reward` scores the
    final responses (and is the value with value='reward'); without it the returned rewards are the implicit
    reward of each whole response."""
    if cfg.value == "reward" and reward is None:
        raise ValueError("value='reward' needs a reward")
    prompt_ids = encode_prompts(tokenizer, prompts)
    search = Search.start(model, tokenizer, reward, cfg, aligned=aligned_model)
    generated: list[list[int]] = []
    with eval_mode(model), eval_mode(aligned_model):
        for start in range(0, len(prompts), cfg.batch_size):
            rows = list(range(start, min(start + cfg.batch_size, len(prompts))))
            generated += _decode_batch(search, [prompts[i] for i in rows], [prompt_ids[i] for i in rows])
        responses = [search.text(ids) for ids in generated]
        if reward is not None:
            rewards = reward(list(prompts), responses)
            search.compute.add(rewards=len(prompts))
        else:
            rewards = (cfg.beta * implicit_values(search, prompt_ids, generated)).tolist()
    return DecodeResult(method="tq", prompts=list(prompts), responses=responses, rewards=rewards,
                        compute=search.compute, options=cfg.model_dump())


@torch.no_grad()
def implicit_values(search: Search, contexts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """log pi_aligned(c | context) - log pi_base(c | context) per continuation (empty continuations: 0), on packed
    batches (prefix-shared, padding-free: models.logprobs.response_logprobs)."""
    values = torch.zeros(len(continuations))
    keep = [i for i, c in enumerate(continuations) if c]
    if not keep:
        return values
    examples = [TokenizedExample(contexts[i], [continuations[i]]) for i in keep]
    batch = pack(examples, keep, search.opts.max_tokens_per_row, search.pad_id)
    aligned = response_logprobs(search.aligned, batch).seq_logps[:, 0].float().cpu()
    base = response_logprobs(search.model, batch).seq_logps[:, 0].float().cpu()
    search.compute.add(passes=2 * len(keep))
    values[keep] = aligned - base
    return values


def _decode_batch(search: Search, prompts, prompt_ids) -> list[list[int]]:
    return token_search(search, prompt_ids, lambda active, top_ids, generated: _q_values(
        search, prompts, prompt_ids, generated, active, top_ids))


def _q_values(search: Search, prompts, prompt_ids, generated, active, top_ids) -> torch.Tensor:
    """Q of every (active row, candidate token): value of candidate + greedy rollout of the aligned model."""
    rows = [i for i in active for _ in range(top_ids.shape[1])]
    tokens = top_ids.flatten().tolist()
    contexts = [prompt_ids[i] + generated[i] for i in rows]
    open_ = [j for j, t in enumerate(tokens) if t not in search.end_ids]
    rollouts = greedy_rollouts(search.aligned, [contexts[j] + [tokens[j]] for j in open_], search.opts.lookahead,
                               search.pad_id, search.end_ids)
    continuations = [[t] for t in tokens]
    for j, rollout in zip(open_, rollouts):
        continuations[j] += rollout
    rolled = sum(len(r) for r in rollouts)
    search.compute.add(tokens=rolled, passes=rolled)
    if search.opts.value == "reward":
        texts = [search.text(generated[i] + c) for i, c in zip(rows, continuations)]
        search.compute.add(rewards=len(texts))
        return torch.tensor(search.reward([prompts[i] for i in rows], texts), dtype=torch.float32)
    return search.opts.beta * implicit_values(search, contexts, continuations)

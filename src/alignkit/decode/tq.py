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

from dataclasses import asdict, dataclass

import torch

from alignkit.data.pack import pack
from alignkit.data.tokenize import TokenizedExample
from alignkit.decode.base import (
    Compute,
    DecodeResult,
    IncrementalLM,
    choose,
    commit_tokens,
    decode_text,
    greedy_rollouts,
)
from alignkit.generate.engines import encode_prompts, stop_token_ids
from alignkit.models.inference import eval_mode
from alignkit.models.logprobs import response_logprobs
from alignkit.train.packing import pad_token_id


@dataclass
class TQConfig:
    top_k: int = 10
    weight: float = 1.0  # alpha
    beta: float = 1.0  # scale of the implicit reward log pi_aligned - log pi_base
    value: str = "implicit"  # or "reward"
    lookahead: int = 8  # greedy tokens of the aligned model after each candidate
    mode: str = "greedy"  # or "sample"
    temperature: float = 0.7
    max_new_tokens: int = 64
    batch_size: int = 16
    max_tokens_per_row: int = 512  # packing of the continuations scored for the implicit reward
    seed: int = 0


def tq_decode(model, tokenizer, prompts: list, aligned_model, cfg: TQConfig, reward=None) -> DecodeResult:
    """Value-guided responses of the base `model`, guided by `aligned_model` (same tokenizer). `reward` scores the
    final responses (and is the value with value='reward'); without it the returned rewards are the implicit
    reward of each whole response."""
    if cfg.value not in ("implicit", "reward"):
        raise ValueError(f"value must be 'implicit' or 'reward', got {cfg.value!r}")
    if cfg.value == "reward" and reward is None:
        raise ValueError("value='reward' needs a reward")
    prompt_ids = encode_prompts(tokenizer, prompts)
    end_ids = stop_token_ids(tokenizer, ())
    pad_id = pad_token_id(tokenizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    compute = Compute()
    generated: list[list[int]] = []
    with eval_mode(model), eval_mode(aligned_model):
        for start in range(0, len(prompts), cfg.batch_size):
            rows = list(range(start, min(start + cfg.batch_size, len(prompts))))
            generated += _decode_batch(model, aligned_model, tokenizer, [prompts[i] for i in rows],
                                       [prompt_ids[i] for i in rows], reward, cfg, end_ids, pad_id, generator, compute)
        responses = [decode_text(tokenizer, ids, end_ids) for ids in generated]
        if reward is not None:
            rewards = reward(list(prompts), responses)
            compute.add(rewards=len(prompts))
        else:
            rewards = (cfg.beta * implicit_values(model, aligned_model, prompt_ids, generated, pad_id, cfg, compute)).tolist()
    return DecodeResult(method="tq", prompts=list(prompts), responses=responses, rewards=rewards, compute=compute,
                        options=asdict(cfg))


@torch.no_grad()
def implicit_values(model, aligned_model, contexts: list[list[int]], continuations: list[list[int]], pad_id: int,
                    cfg: TQConfig, compute: Compute) -> torch.Tensor:
    """log pi_aligned(c | context) - log pi_base(c | context) per continuation (empty continuations: 0), on packed
    batches (prefix-shared, padding-free: models.logprobs.response_logprobs)."""
    values = torch.zeros(len(continuations))
    keep = [i for i, c in enumerate(continuations) if c]
    if not keep:
        return values
    examples = [TokenizedExample(contexts[i], [continuations[i]]) for i in keep]
    batch = pack(examples, keep, cfg.max_tokens_per_row, pad_id)
    aligned = response_logprobs(aligned_model, batch).seq_logps[:, 0].float().cpu()
    base = response_logprobs(model, batch).seq_logps[:, 0].float().cpu()
    compute.add(passes=2 * len(keep))
    values[keep] = aligned - base
    return values


def _decode_batch(model, aligned_model, tokenizer, prompts, prompt_ids, reward, cfg: TQConfig, end_ids, pad_id,
                  generator, compute: Compute) -> list[list[int]]:
    lm = IncrementalLM(model, prompt_ids, pad_id)
    generated: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    k = min(cfg.top_k, lm.logps.shape[-1])
    for _ in range(cfg.max_new_tokens):
        active = [i for i, done in enumerate(finished) if not done]
        if not active:
            break
        top_logps, top_ids = lm.logps[active].topk(k, dim=-1)
        scores = top_logps
        if cfg.weight != 0:
            q = _q_values(model, aligned_model, tokenizer, prompts, prompt_ids, generated, active, top_ids, reward, cfg,
                          end_ids, pad_id, compute)
            scores = top_logps + cfg.weight * q.view(len(active), k)
        picked = top_ids.gather(1, choose(scores, cfg.mode, cfg.temperature, generator)[:, None]).squeeze(1)
        commit_tokens(lm, generated, finished, active, picked, end_ids, pad_id, compute)
    return generated


def _q_values(model, aligned_model, tokenizer, prompts, prompt_ids, generated, active, top_ids, reward, cfg: TQConfig,
              end_ids, pad_id, compute: Compute) -> torch.Tensor:
    """Q of every (active row, candidate token): value of candidate + greedy rollout of the aligned model."""
    rows = [i for i in active for _ in range(top_ids.shape[1])]
    tokens = top_ids.flatten().tolist()
    contexts = [prompt_ids[i] + generated[i] for i in rows]
    open_ = [j for j, t in enumerate(tokens) if t not in end_ids]
    rollouts = greedy_rollouts(aligned_model, [contexts[j] + [tokens[j]] for j in open_], cfg.lookahead, pad_id, end_ids)
    continuations = [[t] for t in tokens]
    for j, rollout in zip(open_, rollouts):
        continuations[j] += rollout
    rolled = sum(len(r) for r in rollouts)
    compute.add(tokens=rolled, passes=rolled)
    if cfg.value == "reward":
        texts = [decode_text(tokenizer, generated[i] + c, end_ids) for i, c in zip(rows, continuations)]
        compute.add(rewards=len(texts))
        return torch.tensor(reward([prompts[i] for i in rows], texts), dtype=torch.float32)
    return cfg.beta * implicit_values(model, aligned_model, contexts, continuations, pad_id, cfg, compute)

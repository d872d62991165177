"""What every decoding-time method shares: its result with compute accounting, and token-level helpers
(an incremental KV-cached decoder over a left-padded batch, greedy lookahead rollouts, candidate choice).

Compute is counted in sequence-steps: one forward of one sequence by one token is one forward pass, whether
it ran alone or in a batch; a prompt's prefill is counted with its first generated token. Scoring-only
forwards (Transfer Q*'s log-probs of a continuation) count one pass per sequence scored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from alignkit.generate.engines import stop_token_ids
from alignkit.models.inference import left_pad
from alignkit.train.packing import pad_token_id


@dataclass
class Compute:
    generated_tokens: int = 0  # tokens produced by any model: kept, discarded candidates and lookaheads
    forward_passes: int = 0  # sequence-steps (see the module docstring)
    reward_calls: int = 0  # (prompt, text) pairs scored by the reward

    def add(self, tokens: int = 0, passes: int = 0, rewards: int = 0) -> None:
        self.generated_tokens += tokens
        self.forward_passes += passes
        self.reward_calls += rewards


def sampling_record(sampling, seed: int) -> dict:
    """The sampling keys and seed a result records in its options (stop as a tuple, as it always was)."""
    return {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k, "batch_size": sampling.batch_size, "seed": seed, "stop": sampling.stop_strings,
            "engine": sampling.engine, "engine_precision": sampling.engine_precision}


@dataclass
class DecodeResult:
    method: str
    prompts: list
    responses: list[str]
    rewards: list[float]  # the reward of each returned response
    compute: Compute
    details: list[dict] = field(default_factory=list)  # per prompt: candidates, their scores, ...
    options: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = max(len(self.responses), 1)
        mean_reward = sum(self.rewards) / n
        tokens = self.compute.generated_tokens / n
        return {
            "method": self.method, "prompts": len(self.responses), "mean_reward": mean_reward,
            "generated_tokens_per_prompt": tokens, "forward_passes_per_prompt": self.compute.forward_passes / n,
            "reward_calls_per_prompt": self.compute.reward_calls / n,
            "reward_per_1k_tokens": mean_reward * 1000 / tokens if tokens else 0.0,
            "compute": asdict(self.compute), "options": self.options,
        }

    def records(self) -> list[dict]:
        """One JSON-ready record per prompt: prompt, response, reward and the method's details."""
        details = self.details or [{} for _ in self.responses]
        return [{"prompt": p, "response": r, "reward": s, **d}
                for p, r, s, d in zip(self.prompts, self.responses, self.rewards, details)]


def efficiency(result: DecodeResult, baseline: DecodeResult) -> dict:
    """Reward gained over a baseline (plain sampling) and what it cost, on each axis of compute: the ratios to the
    baseline, and the gain per 1k extra generated tokens and per extra reward call (None where less than one per
    prompt was spent: token-level search spends reward calls, not tokens)."""
    a, b = result.summary(), baseline.summary()
    gain = a["mean_reward"] - b["mean_reward"]
    extra_tokens = a["generated_tokens_per_prompt"] - b["generated_tokens_per_prompt"]
    extra_calls = a["reward_calls_per_prompt"] - b["reward_calls_per_prompt"]

    def ratio(key):
        return a[key] / b[key] if b[key] else None

    return {"method": result.method, "baseline_mean_reward": b["mean_reward"], "mean_reward": a["mean_reward"],
            "reward_gain": gain, "compute_ratio_tokens": ratio("generated_tokens_per_prompt"),
            "compute_ratio_passes": ratio("forward_passes_per_prompt"),
            "compute_ratio_reward_calls": ratio("reward_calls_per_prompt"),
            "gain_per_1k_extra_tokens": gain * 1000 / extra_tokens if extra_tokens >= 1 else None,
            "gain_per_extra_reward_call": gain / extra_calls if extra_calls >= 1 else None}


# ---------------------------------------------------------------------------------------------- token level


class IncrementalLM:
    """Next-token log-probs of a batch of sequences, extended one token per call with a KV cache."""

    def __init__(self, model, sequences: list[list[int]], pad_id: int):
        self.model = model
        device = next(model.parameters()).device
        input_ids, self.mask, positions = left_pad(sequences, pad_id, device)
        out = model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.past = out.past_key_values
        self.next_position = positions[:, -1] + 1
        self.logps = torch.log_softmax(out.logits[:, -1].float(), -1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], 1)
        out = self.model(input_ids=tokens[:, None].to(self.mask.device), attention_mask=self.mask,
                         position_ids=self.next_position[:, None], past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.next_position = self.next_position + 1
        self.logps = torch.log_softmax(out.logits[:, -1].float(), -1)
        return self.logps


def last_token_logps(model, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Next-token log-probs [B, V] after each sequence (one uncached forward of the batch)."""
    device = next(model.parameters()).device
    input_ids, mask, positions = left_pad(sequences, pad_id, device)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    return torch.log_softmax(logits[:, -1].float(), -1)


def greedy_rollouts(model, sequences: list[list[int]], length: int, pad_id: int, end_ids: list[int],
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation of up to `length` tokens after each sequence (without the padding after an end token)."""
    if length <= 0:
        return [[] for _ in sequences]
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        input_ids, mask, _ = left_pad(chunk, pad_id, device)
        generated = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=length,
                                   pad_token_id=pad_id, eos_token_id=end_ids or None, temperature=None, top_p=None,
                                   top_k=None)
        for row in generated[:, input_ids.shape[1]:].tolist():
            out.append(cut_at_end(row, end_ids))
    return out


def cut_at_end(ids: list[int], end_ids: list[int]) -> list[int]:
    """ids up to and including the first end token."""
    for i, token in enumerate(ids):
        if token in end_ids:
            return ids[:i + 1]
    return ids


def choose(scores: torch.Tensor, mode: str, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Index of the chosen candidate per row: argmax ('greedy'; ties -> first) or a draw from softmax(s / T)."""
    if mode == "greedy":
        return scores.argmax(-1)
    if mode == "sample":
        probs = torch.softmax(scores / temperature, -1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    raise ValueError(f"mode must be 'greedy' or 'sample', got {mode!r}")


@dataclass
class Search:
    """What a token-level search (ARGS, DeAL, Transfer Q*) holds for a whole run: the model, the reward, the
    method's options, the end and pad ids, the seeded generator and the compute spent."""

    model: Any
    tokenizer: Any
    reward: Any
    opts: Any
    end_ids: list[int]
    pad_id: int
    compute: Compute = field(default_factory=Compute)
    generator: torch.Generator | None = None
    aligned: Any = None  # Transfer Q*: the aligned model whose rollouts value the candidates

    @classmethod
    def start(cls, model, tokenizer, reward, opts, aligned=None) -> Search:
        """Stops at EOS only; the generator is seeded with opts.seed where the options have one."""
        pad_id = pad_token_id(tokenizer)
        seed = getattr(opts, "seed", None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return cls(model, tokenizer, reward, opts, stop_token_ids(tokenizer, ()), pad_id, Compute(), generator, aligned)

    def text(self, ids: list[int]) -> str:
        return decode_text(self.tokenizer, ids, self.end_ids)


def commit_tokens(search: Search, lm: IncrementalLM, generated: list[list[int]], finished: list[bool],
                  active: list[int], picked: torch.Tensor) -> None:
    """Append each active row's picked token, mark rows that ended, and advance the KV cache by one step."""
    next_tokens = torch.full((len(generated),), search.pad_id, dtype=torch.long)
    for row, token in zip(active, picked.tolist()):
        generated[row].append(token)
        next_tokens[row] = token
        finished[row] = token in search.end_ids
    search.compute.add(tokens=len(active), passes=len(active))
    if not all(finished):
        lm.step(next_tokens)


def token_search(search: Search, prompt_ids: list[list[int]], guide: Callable) -> list[list[int]]:
    """ARGS's and Transfer Q*'s loop: each step, the top_k next tokens of every unfinished row, scored by their
    log-prob plus opts.weight * guide(active rows, candidate ids [A, k], generated so far) [A, k] (not called at
    weight 0), one picked per row (opts.mode), until every row ended or max_new_tokens. Returns the generated ids."""
    cfg = search.opts
    lm = IncrementalLM(search.model, prompt_ids, search.pad_id)
    generated: list[list[int]] = [[] for _ in prompt_ids]
    finished = [False] * len(prompt_ids)
    k = min(cfg.top_k, lm.logps.shape[-1])
    for _ in range(cfg.max_new_tokens):
        active = [i for i, done in enumerate(finished) if not done]
        if not active:
            break
        top_logps, top_ids = lm.logps[active].topk(k, dim=-1)  # [A, k]
        scores = top_logps
        if cfg.weight != 0:
            scores = top_logps + cfg.weight * guide(active, top_ids, generated).to(top_logps.dtype).view(len(active), k)
        picked = top_ids.gather(1, choose(scores, cfg.mode, cfg.temperature, search.generator)[:, None]).squeeze(1)
        commit_tokens(search, lm, generated, finished, active, picked)
    return generated


def decode_text(tokenizer, ids: list[int], end_ids: list[int]) -> str:
    """The response text of generated ids (cut at the first end token, special tokens dropped)."""
    for i, token in enumerate(ids):
        if token in end_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


__all__ = ["Compute", "DecodeResult", "IncrementalLM", "Search", "choose", "commit_tokens", "cut_at_end", "decode_text",
           "efficiency", "greedy_rollouts", "last_token_logps", "token_search"]

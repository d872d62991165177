"""KL of a policy to its reference, estimated on the policy's own samples: the mean sequence log-ratio
log pi(y|x) - log pi_ref(y|x) over y ~ pi (the k1 estimator summed over a response; unbiased for KL(pi || pi_ref)
when the responses really are samples of pi at temperature 1). Log-probs come from models.logprobs on packed,
prefix-shared batches; responses are re-tokenised from their text, with EOS appended as in training."""

from __future__ import annotations

import contextlib
import math

import torch

from alignkit.data.pack import pack, token_budget_batches
from alignkit.data.tokenize import tokenize_records
from alignkit.models.inference import eval_mode
from alignkit.models.logprobs import response_logprobs
from alignkit.models.lora import adapters_disabled


def sequence_logps(model, examples, pad_token_id: int, max_tokens_per_batch: int = 4096,
                   max_tokens_per_row: int = 1024) -> torch.Tensor:
    """Summed log-prob of each example's (single) response, [n], without gradients."""
    out = torch.zeros(len(examples))
    with eval_mode(model):
        for indices in token_budget_batches(examples, max_tokens_per_batch, seed=0, shuffle=False):
            batch = pack([examples[i] for i in indices], indices, max_tokens_per_row, pad_token_id)
            out[indices] = response_logprobs(model, batch).seq_logps[:, 0].float().cpu()
    return out


def sequence_log_ratios(policy, reference, tokenizer, prompts: list, responses: list[str], max_length: int = 1024,
                        max_tokens_per_batch: int = 4096, max_tokens_per_row: int = 1024) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) per (prompt, response), re-tokenised from the texts; both models share the
    tokenizer. reference None: the policy's LoRA base (its adapters disabled)."""
    records = [{"prompt": p, "completion": r, "_row": i + 1} for i, (p, r) in enumerate(zip(prompts, responses))]
    examples = tokenize_records(tokenizer, records, "sft", max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return example_log_ratios(policy, reference, examples, pad, max_tokens_per_batch, max_tokens_per_row)


def example_log_ratios(policy, reference, examples, pad: int, max_tokens_per_batch: int = 4096,
                       max_tokens_per_row: int = 1024) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) per tokenised single-response example (e.g. the exact tokens a rollout
    sampled); reference None: the policy's LoRA base (its adapters disabled)."""
    policy_logps = sequence_logps(policy, examples, pad, max_tokens_per_batch, max_tokens_per_row)
    with adapters_disabled(policy) if reference is None else contextlib.nullcontext():
        reference_logps = sequence_logps(reference if reference is not None else policy, examples, pad,
                                         max_tokens_per_batch, max_tokens_per_row)
    return (policy_logps - reference_logps).tolist()


def kl_summary(log_ratios: list[float]) -> dict:
    """Mean log-ratio (the KL estimate), its standard error, and the sample count."""
    n = len(log_ratios)
    mean = sum(log_ratios) / n
    var = sum((x - mean) ** 2 for x in log_ratios) / (n - 1) if n > 1 else 0.0
    return {"kl": mean, "kl_sem": math.sqrt(var / n), "samples": n}

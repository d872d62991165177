"""KL of a policy to its reference, estimated on the policy's own samples: the mean sequence log-ratio
log pi(y|x) - log pi_ref(y|x) over y ~ pi (the k1 estimator summed over a response; unbiased for KL(pi || pi_ref)
when the responses really are samples of pi at temperature 1). Log-probs come from train/reference.score_examples on
packed, prefix-shared batches; responses are re-tokenised from their text, with EOS appended as in training."""

from __future__ import annotations

import contextlib
import math

from alignkit.data.tokenize import ExampleSettings, tokenize_records
from alignkit.models.lora import adapters_disabled
from alignkit.train.packing import Packing, pad_token_id
from alignkit.train.reference import score_examples


def kl_packing(pad_token_id: int = 0, precision: str = "fp32") -> Packing:
    """What every KL estimate is scored in: micro-batches of 4096 tokens in rows of at most 1024 (with a dense mask a
    row pays its length squared), at the run's precision. Not the run's own packing: other rows change a bf16 KL of
    a real model (SmolLM2: 0.125 against 0.146 nats on the same samples), and make rl reports this one."""
    return Packing(4096, 1024, pad_token_id, precision)


def sequence_log_ratios(policy, reference, tokenizer, prompts: list, responses: list[str],
                        max_length: int = 1024) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) per (prompt, response), re-tokenised from the texts; both models share the
    tokenizer. reference None: the policy's LoRA base (its adapters disabled)."""
    records = [{"prompt": p, "completion": r, "_row": i + 1} for i, (p, r) in enumerate(zip(prompts, responses))]
    examples = tokenize_records(tokenizer, records, ExampleSettings("sft", max_length))
    return example_log_ratios(policy, reference, examples, kl_packing(pad_token_id(tokenizer)))


def example_log_ratios(policy, reference, examples, packing: Packing) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) per tokenised single-response example (e.g. the exact tokens a rollout
    sampled), both scored as training scores (train/reference.score_examples, in `packing`, at its precision: a
    bf16 run's reference holds bf16 weights); reference None: the policy's LoRA base (its adapters disabled)."""
    def summed(model):
        return score_examples(model, examples, packing)[0][:, 0]

    policy_logps = summed(policy)
    with adapters_disabled(policy) if reference is None else contextlib.nullcontext():
        reference_logps = summed(reference if reference is not None else policy)
    return (policy_logps - reference_logps).tolist()


def kl_summary(log_ratios: list[float]) -> dict:
    """Mean log-ratio (the KL estimate), its standard error, and the sample count."""
    n = len(log_ratios)
    mean = sum(log_ratios) / n
    var = sum((x - mean) ** 2 for x in log_ratios) / (n - 1) if n > 1 else 0.0
    return {"kl": mean, "kl_sem": math.sqrt(var / n), "samples": n}

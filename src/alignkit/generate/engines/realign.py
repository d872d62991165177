"""Decoding-time realignment (DeRa, arXiv 2402.02992) inside HF generate: a logits processor that runs the
reference model on the same tokens (its own KV cache) and replaces the policy's next-token logits by
lambda z_policy + (1 - lambda) z_reference. The fast engine mixes the same way in its own loop (engines/fast.py)."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LogitsProcessor


def mix_logits(policy_logits: torch.Tensor, reference_logits: torch.Tensor, lam: float) -> torch.Tensor:
    """DeRa's realigned logits, lambda h_policy + (1 - lambda) h_reference (the paper's Eq. on logits; log-probs
    give the same softmax, since each differs from its logits by a per-row constant)."""
    return lam * policy_logits.float() + (1 - lam) * reference_logits.float()


class ReferenceMix(LogitsProcessor):
    """The reference's logits for the rows HF generate decodes, mixed into the policy's. prompt_mask: the
    left-padded prompts' attention mask [rows, P], one row per sample (HF's num_return_sequences order)."""

    def __init__(self, reference, lam: float, prompt_mask: torch.Tensor):
        self.reference, self.lam, self.prompt_mask = reference, float(lam), prompt_mask
        self.cache, self.seen = None, 0

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        rows, length = input_ids.shape
        mask = self.prompt_mask.to(input_ids.device)
        mask = torch.cat([mask, mask.new_ones(rows, length - mask.shape[1])], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.cache is None:
            self.cache = DynamicCache()
        out = self.reference(input_ids=input_ids[:, self.seen:], attention_mask=mask,
                             position_ids=positions[:, self.seen:], cache=self.cache, use_cache=True)
        self.seen = length
        return mix_logits(scores, out.logits[:, -1], self.lam)

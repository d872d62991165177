"""The reference engine: HF generate on the training model itself (its weights are the policy's, so
update_weights has nothing to copy). Each token's log-prob is read from the final processed scores, after
temperature, top-k and top-p, which this engine applies itself so that they run before the recorder."""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from alignkit.generate.engines.base import Generation, stop_token_ids
from alignkit.generate.engines.realign import ReferenceMix
from alignkit.models.inference import eval_mode, left_pad


class _LogprobRecorder(LogitsProcessor):
    """Keeps the log-softmax of the last step's scores; at the next step (or at the end) gathers the log-prob of
    the token that was sampled from them. One [rows, vocab] tensor alive at a time."""

    def __init__(self):
        self.previous, self.steps = None, []

    def __call__(self, input_ids, scores):
        self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, tokens):
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, tokens[:, None].to(self.previous.device))[:, 0].cpu())
            self.previous = None

    def finish(self, last_tokens) -> torch.Tensor:
        self._take(last_tokens)
        return torch.stack(self.steps, 1) if self.steps else torch.zeros(len(last_tokens), 0)


class HFEngine:
    name = "hf"
    exact_logprobs = True  # it samples from the training model itself

    def __init__(self, model, tokenizer, realign=None):
        """realign: (reference model, lambda): sample from softmax(lambda z_policy + (1 - lambda) z_reference)
        (DeRa, generate/realign.py); the reference runs beside generate with its own KV cache."""
        self.model, self.tokenizer, self.realign = model, tokenizer, realign
        self.exact_logprobs = realign is None  # realigned: the mixed distribution's log-probs, not the trainer's

    def update_weights(self, model) -> None:
        self.model = model  # the same module: nothing to copy

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling, num_samples: int = 1,
                 seed: int = 0) -> Generation:
        """num_samples samples per prompt; each generate call of sampling.batch_size prompts is seeded by
        seed + its first prompt's index, so the same prompts give the same samples; the global RNG is left
        as it was."""
        model, tokenizer = self.model, self.tokenizer
        end_ids = stop_token_ids(tokenizer, sampling.stop_strings)
        device = next(model.parameters()).device
        do_sample = sampling.temperature > 0
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (end_ids or [0])[0]
        out = Generation(list(prompt_ids), [], [], [], [], [])
        with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, len(prompt_ids), sampling.batch_size):
                chunk = prompt_ids[start:start + sampling.batch_size]
                input_ids, mask, _ = left_pad(chunk, pad_id, device)
                recorder = _LogprobRecorder()
                # the mix first, then the warpers, so the recorder sees the distribution actually sampled from
                processors = [] if self.realign is None else [
                    ReferenceMix(*self.realign, mask.repeat_interleave(num_samples, 0))]
                if do_sample:
                    processors += [TemperatureLogitsWarper(sampling.temperature)] if sampling.temperature != 1 else []
                    processors += [TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []
                    processors += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else []
                processors.append(recorder)
                torch.manual_seed(seed + start)
                generated = model.generate(
                    input_ids=input_ids, attention_mask=mask, do_sample=do_sample,
                    max_new_tokens=sampling.max_new_tokens, num_return_sequences=num_samples,
                    temperature=1.0 if do_sample else None, top_p=1.0 if do_sample else None, top_k=0 if do_sample else None,
                    logits_processor=LogitsProcessorList(processors), pad_token_id=pad_id, eos_token_id=end_ids or None)
                new = generated[:, input_ids.shape[1]:]
                logps = recorder.finish(new[:, -1]) if new.shape[1] else torch.zeros(len(new), 0)
                out.add_rows(tokenizer, new.tolist(), logps.tolist(), num_samples, end_ids, sampling.stop_strings)
        return out

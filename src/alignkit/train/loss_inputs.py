"""From a packed micro-batch to a loss's LossInputs: the policy's log-probs, the reference's values, the record fields
(labels, scores, margins, other objectives' rewards), and what some methods need beyond them — KTO's mismatched
pairs (an extra response column of the same packed rows), SparsePO's token KL and masks (a live reference model).
Also the state a loss carries between training batches (BCO's reward shift)."""

from __future__ import annotations

import torch

from alignkit.data.pack import PackedBatch
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError, DataError
from alignkit.losses import LossInputs
from alignkit.losses.base import needs
from alignkit.losses.registry import LossSpec, uses_kl_pairs, uses_ref_model
from alignkit.losses.tokenlevel import activation_token_weights
from alignkit.models.logprobs import ResponseLogProbs, response_logprobs
from alignkit.models.token_kl import logprobs_and_token_kl, pad_tokens, reference_forward
from alignkit.train.cross_teacher import logprobs_and_groups
from alignkit.train.distributed import Dist, gather_objects
from alignkit.train.reference import Reference
from alignkit.train.teacher import logprobs_and_divergence


def mean_trained_lengths(examples: list[TokenizedExample], indices) -> torch.Tensor:
    """[k] mean loss-carrying token count of each response column over examples[indices] (LossInputs'
    step_mean_lengths, for token-means); a column counts the examples that have it (list data may hold different k)."""
    lengths = [examples[i].trained_lengths for i in indices]
    totals, counts = torch.zeros(max(map(len, lengths))), torch.zeros(max(map(len, lengths)))
    for row in lengths:
        totals[:len(row)] += torch.tensor(row, dtype=torch.float32)
        counts[:len(row)] += 1
    return totals / counts.clamp(min=1)


def logprob_inputs(model, batch: PackedBatch, method, ref: Reference | None, cached_teacher=None) -> LossInputs:
    """The policy's (and reference's) log-probs of the batch, split into the loss's fields (method: train/method.Method;
    cached_teacher: the batch's teacher top-k read from a teacher cache, instead of running the teacher, or its
    examples' teacher tokenisations, a list of CrossTokenized, for a teacher with its own tokenizer)."""
    spec, opts, chunk_size = method.spec, method.opts, method.chunk_size
    live_ref = ref is not None and ref.model is not None and uses_ref_model(spec, opts)
    divergence = groups = None
    if isinstance(cached_teacher, list):  # ULD: the teacher runs on its own tokens; distances per aligned group
        out, *groups = logprobs_and_groups(model, batch, method, cached_teacher)
    elif cached_teacher is not None or method.teacher is not None and "teacher" in needs(opts):  # GKD: the teacher
        teachers = cached_teacher if cached_teacher is not None else (method.teacher, method.teacher_reference)
        out, divergence = logprobs_and_divergence(model, batch, teachers, opts, chunk_size, method.temperature)
    elif live_ref:  # SparsePO: the reference runs on the same rows; the KL comes out of the policy's chunked pass
        if method.temperature != 1:  # offline only: nothing was sampled at a temperature
            raise ConfigError("temperature", f"loss '{spec.name}' with a live reference scores at temperature 1")
        ref_forward = reference_forward(ref.model, batch)
        out, token_kl = logprobs_and_token_kl(model, batch, ref_forward, chunk_size)
    else:
        out = response_logprobs(model, batch, chunk_size, method.temperature)
    seq_logps = out.seq_logps.float()
    kl_pairs = uses_kl_pairs(spec, opts)
    if kl_pairs:  # the last column is the mismatched completion (Method.pack)
        inputs = LossInputs(logps=seq_logps[:, :-1], lengths=out.lengths[:, :-1], kl_logps=seq_logps[:, -1])
    else:
        inputs = LossInputs(logps=seq_logps, lengths=out.lengths)
    if ref is not None:
        ref_seq, ref_tokens = ref.for_batch(batch)
        inputs.ref_logps = ref_seq.to(seq_logps.device)
        if kl_pairs:
            inputs.ref_kl_logps = ref.kl_for(batch).to(seq_logps.device)
        if spec.needs_token_logps:
            ref_out = ResponseLogProbs(ref_tokens.to(out.token_logps.device), ref_seq, out.lengths)
            inputs.ref_token_logps, _ = ref_out.padded(batch)
    if spec.needs_token_logps:
        inputs.token_logps, inputs.token_mask = out.padded(batch)
    if divergence is not None:
        inputs.token_divergence = pad_tokens(divergence, batch)
    if groups is not None:
        inputs.group_divergence, inputs.group_mask = groups
    if out.values is not None:  # a policy with a value head (PPO): V(s_t) from the same forward
        inputs.values = pad_tokens(out.values, batch)
    if spec.needs_ref_model:
        if live_ref and "token_kl" in needs(opts):
            inputs.token_kl = pad_tokens(token_kl, batch)
        if "activations" in needs(opts):
            activations = pad_tokens(ref_forward.activations, batch)
            inputs.token_weights = activation_token_weights(activations, inputs.token_mask.to(activations.device))
        else:
            inputs.token_weights = inputs.token_mask.to(inputs.token_logps.dtype)
    return inputs


def add_record_fields(inputs: LossInputs, examples: list[TokenizedExample]) -> None:
    """Fields the data carries to the loss (each example's `extras`): labels, scores, margins, other rewards."""
    if "label" in examples[0].extras:
        inputs.labels = torch.tensor([float(e.extras["label"]) for e in examples])
    if "scores" in examples[0].extras:
        inputs.scores = torch.tensor([e.extras["scores"] for e in examples], dtype=torch.float32)
    if any("margin" in e.extras for e in examples):
        inputs.margins = torch.tensor([float(e.extras.get("margin", 0.0)) for e in examples])
    if "other_rewards" in examples[0].extras:  # data.load checks that every pair has them, as many each
        inputs.other_rewards = torch.tensor(
            [[e.extras["other_rewards"]["chosen"], e.extras["other_rewards"]["rejected"]] for e in examples],
            dtype=torch.float32)


def check_record_fields(spec: LossSpec, examples: list[TokenizedExample]) -> None:
    """Every example carries one of the fields the loss needs beyond its data shape (LossSpec.record_fields)."""
    if not spec.record_fields:
        return
    for example in examples:
        if not any(name in example.extras for name in spec.record_fields):
            names = " or ".join(f"'{name}'" for name in spec.record_fields)
            raise DataError(example.source, example.row, spec.record_fields[0],
                            f"missing: loss '{spec.name}' needs {names} on every record",
                            hint="add the field (see docs/losses.md), or choose a loss for this data shape")


class CarriedState:
    """The state a stateful loss (LossSpec.state; BCO's running mean) carries from one training batch to the next.

    Micro-batches of a step see the state left by the ones before; the step's result is kept only if the
    optimizer step is taken (a skipped, non-finite step leaves it as it was). With several processes each rank
    starts the step from the same state and the ranks' increments are merged at its end."""

    def __init__(self, spec: LossSpec):
        self.type = spec.state
        self.value = None  # after the last completed step
        self._pending = None  # within the current step

    def current(self):
        return self._pending if self._pending is not None else self.value

    def absorb(self, metrics: dict[str, torch.Tensor]) -> None:
        if self.type is not None:
            new = self.type.from_metrics(metrics)
            if new is not None:
                self._pending = new

    def end_step(self, applied: bool, ctx: Dist) -> None:
        pending, self._pending = self._pending, None
        if self.type is None:
            return
        ends = gather_objects(pending, ctx)  # every rank calls this (a collective under torchrun)
        if applied and any(end is not None for end in ends):
            self.value = pending if len(ends) == 1 else self.type.merge(self.value, ends)

    def checkpoint(self) -> dict:
        return {} if self.value is None else {"loss_state": self.value.to_dict()}

    def restore(self, saved: dict) -> None:
        if self.type is not None and saved.get("loss_state") is not None:
            self.value = self.type.from_dict(saved["loss_state"])


def check_method_setup(spec: LossSpec, opts, cfg, ctx: Dist) -> None:
    """What the loop cannot do for a method with these settings, said before anything runs."""
    if ctx.enabled and cfg.distributed == "fsdp" and cfg.lora is not None:
        raise ConfigError("distributed", "fsdp with lora is not supported; use distributed: ddp (the adapters are "
                                         "small, and the frozen base fits where one replica fits)")
    if cfg.ref_update is not None:
        if not spec.needs_reference:
            raise ConfigError("ref_update", f"loss '{spec.name}' has no reference model to update")
        if cfg.lora is not None:
            raise ConfigError("ref_update", "cannot be combined with lora (the reference is the frozen base model)")
        if ctx.enabled and cfg.distributed == "fsdp":
            raise ConfigError("ref_update", "needs an unsharded reference; use distributed: ddp")
    if uses_ref_model(spec, opts) and ctx.enabled:
        raise ConfigError("distributed", f"loss '{spec.name}' with a live reference model (token KL or activation "
                                         "masks) runs in one process for now")

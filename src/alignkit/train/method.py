"""The method a run trains: a loss of the registry with its options, and how its forward turns a packed micro-batch
into per-example losses (the policy's and reference's log-probs, the record fields, an online rollout's extras)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.pack import PackedBatch, with_mismatched_completions
from alignkit.data.tokenize import TokenizedExample
from alignkit.losses import LossInputs, get_loss, options_of
from alignkit.losses.base import LossOutput, needs
from alignkit.losses.registry import LossSpec, uses_kl_pairs, uses_ref_model
from alignkit.losses.sft import SFTOptions, sft_loss
from alignkit.models.reward import sequence_rewards
from alignkit.train.cross_teacher import CROSS
from alignkit.train.loss_inputs import add_record_fields, logprob_inputs
from alignkit.train.packing import Packing
from alignkit.train.reference import Reference
from alignkit.train.teacher_cache import TOPK, cached_topk


@dataclass(frozen=True)
class Method:
    """spec: the loss's registry entry; opts: its options; chunk_size: of the vocabulary projection; sft_weight: an
    NLL term on the first response (RPO-style), added to every example's loss; max_length: tokens of prompt + one
    response (KTO's mismatched completions are cut to it); temperature: the policy's logits are divided by it (online:
    the sampling temperature, so the learner scores the distribution that sampled); teacher: a frozen teacher model
    (distillation: GKD's divergence is taken against it in every forward; teacher_reference: ADPA's second model)."""

    spec: LossSpec
    opts: object
    chunk_size: int = 1024
    sft_weight: float = 0.0
    max_length: int | None = None
    temperature: float = 1.0
    teacher: object = None
    teacher_reference: object = None  # ADPA: the teacher's reference, for its advantage
    teacher_tokenizer: object = None  # ULD: the tokenizer of the teacher's tokenisation of each example
    teacher_topk: bool = False  # the examples carry the teacher's cached top-k (train/teacher_cache.py)

    @classmethod
    def from_config(cls, cfg) -> Method:
        """The offline method of a TrainConfig: cfg.loss with cfg.loss_options."""
        spec = get_loss(cfg.loss)
        return cls(spec, options_of(spec, cfg), cfg.chunk_size, cfg.sft_weight, cfg.max_length)

    @property
    def kl_pairs(self) -> bool:
        return uses_kl_pairs(self.spec, self.opts)

    @property
    def live_reference(self) -> bool:
        return uses_ref_model(self.spec, self.opts)

    def teacher_data(self, data, indices: list[int]):
        """What the examples data[indices] carry for the teacher (data: a list of examples or an online Experience):
        its cached top-k (offline, or a mixed run's dataset round), or its own tokenisation (ULD); None where the
        teacher, if any, runs as it is."""
        examples = getattr(data, "examples", data)
        if self.teacher_topk or self.teacher is not None and all(TOPK in examples[i].extras for i in indices):
            return cached_topk([examples[i] for i in indices], self.opts.tail)
        if "cross_tokenizer" in needs(self.opts):
            return [examples[i].extras[CROSS] for i in indices]
        return None

    def pack(self, examples: list[TokenizedExample], indices: list[int], packing: Packing) -> PackedBatch:
        """examples[indices] packed; for KTO each example also gets the next one's completion as a last response."""
        chosen = [examples[i] for i in indices]
        if self.kl_pairs:
            chosen = with_mismatched_completions(chosen, self.max_length)
        return packing.pack(chosen, indices)

    def forward(self, model, batch: PackedBatch, data, ref: Reference | None = None,
                step_mean_lengths: torch.Tensor | None = None, loss_state=None) -> LossOutput:
        """Per-example losses and metrics of one packed micro-batch. data: the examples the batch's indices point
        into, or an online Experience (online/experience.py: its examples and what the rollout adds per example);
        step_mean_lengths: see LossInputs; loss_state: what a stateful loss carried over from the training batches
        before (LossSpec.state)."""
        spec = self.spec
        if spec.output == "rewards":  # a reward model: one scalar per response instead of log-probs
            predicted = sequence_rewards(model, batch).float()
            inputs = LossInputs(logps=None, lengths=batch.seq_lengths.to(predicted.device), predicted_rewards=predicted)
        else:  # policy and reference log-probs (and KTO's mismatched pairs, SparsePO's token KL and masks)
            cached = self.teacher_data(data, batch.example_indices)
            inputs = logprob_inputs(model, batch, self, ref, cached)
        inputs.step_mean_lengths = step_mean_lengths
        inputs.loss_state = loss_state
        if hasattr(data, "fill"):  # an online experience: rollout rewards, behaviour log-probs, advantages
            data.fill(inputs, batch)
        else:
            add_record_fields(inputs, [data[i] for i in batch.example_indices])
        losses, metrics = spec.fn(inputs, self.opts)
        return self._with_extras(inputs, losses, dict(metrics))

    def _with_extras(self, inputs: LossInputs, losses: torch.Tensor, metrics: dict) -> LossOutput:
        """The engine/trainer gap, the log-probs users watch, and the NLL term."""
        if inputs.engine_token_logps is not None and inputs.token_logps is not None:
            metrics.update(engine_gap(inputs))
        if inputs.logps is not None:
            metrics["logps/chosen"] = inputs.logps[:, 0].detach()
            if inputs.logps.shape[1] > 1:
                metrics["logps/rejected"] = inputs.logps[:, 1].detach()
        if self.sft_weight > 0:
            nll, _ = sft_loss(inputs, SFTOptions())
            losses = losses + self.sft_weight * nll
            metrics["nll"] = nll.detach()
        return losses, metrics


def engine_gap(inputs) -> dict[str, torch.Tensor]:
    """Per example: the sum and count of |log pi_engine - log pi_trainer| over its sampled tokens, and the largest."""
    gap = (inputs.token_logps.detach() - inputs.engine_token_logps.to(inputs.token_logps.device)).abs()
    gap = torch.where(inputs.token_mask, gap, torch.zeros_like(gap)).flatten(1)
    return {"engine_gap/sum": gap.sum(1), "engine_gap/tokens": inputs.token_mask.flatten(1).sum(1).float(),
            "engine_gap/max": gap.max(1).values}

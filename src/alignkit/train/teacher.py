"""The policy's response log-probs and its per-token divergence to a frozen teacher from one forward of each
(GKD, DCKD, ADPA: losses/distill.py): the policy's hidden states go through its head twice per chunk, once for the
sampled tokens' log-probs and once against the teacher's distribution, never as whole [tokens x vocab] logits."""

from __future__ import annotations

import torch

from alignkit.data.pack import PackedBatch
from alignkit.losses.divergence import (
    AdvantageTeacher,
    DenseTeacher,
    DistillSettings,
    TopKTeacher,
    chunked_divergence,
    teacher_topk,
)
from alignkit.models.logprobs import ResponseLogProbs, response_logprobs
from alignkit.models.teacher import teacher_hidden


def teacher_target(teachers: tuple, batch: PackedBatch, opts, chunk_size: int):
    """What the policy is compared with on `batch`: the teacher's hidden states and head (full vocabulary), its
    top-k log-probs at the distillation temperature (opts.top_k > 0), or, with a second model (ADPA), the teacher
    and its reference. teachers: (teacher, its reference or None), or the batch's cached top-k (a TopKTeacher, used
    as it is); opts: the loss's options."""
    if isinstance(teachers, TopKTeacher):
        return teachers
    dense = DenseTeacher(*teacher_hidden(teachers[0], batch))
    if teachers[1] is not None:
        return AdvantageTeacher(dense, DenseTeacher(*teacher_hidden(teachers[1], batch)))
    if not getattr(opts, "top_k", 0):
        return dense
    top = teacher_topk(dense, opts.top_k, opts.temperature, chunk_size)
    return TopKTeacher(top.logps, top.token_ids, opts.tail)


def logprobs_and_divergence(model, batch: PackedBatch, teachers: tuple, opts, chunk_size: int = 1024,
                            temperature: float = 1.0) -> tuple[ResponseLogProbs, torch.Tensor]:
    """(the policy's response log-probs at `temperature`, as response_logprobs; the divergence [N] to the teacher at
    each response token: the generalized JSD with (beta, temperature) = opts.divergence(), or ADPA's expected
    advantage where teachers holds a reference), both differentiable through the policy. The teacher runs first,
    without gradients; the divergence is taken inside the policy's forward (response_logprobs), so under DDP or
    FSDP2 its gradient is reduced with the log-probs' in the same backward."""
    target = teacher_target(teachers, batch, opts, chunk_size)
    beta, divergence_temperature = opts.divergence()
    settings = DistillSettings(beta, divergence_temperature, chunk_size)

    def divergence(selected: torch.Tensor, head) -> torch.Tensor:
        return chunked_divergence(selected, head.weight, head.bias, target, settings)

    out = response_logprobs(model, batch, chunk_size, temperature, divergence)
    return out, out.divergence

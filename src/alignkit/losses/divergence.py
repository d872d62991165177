"""Token-level divergences between a student and a teacher over the vocabulary (distillation, losses/distill.py).

generalized_jsd is the formula on [n, V] log-probabilities; ChunkedDistillation walks the response tokens chunk by
chunk, projecting the student's and the teacher's hidden states through their heads one chunk at a time, so
[tokens x vocab] logits never exist whole for either model, in the forward or the backward (which recomputes each
chunk). The teacher may instead be given as its top-k log-probs per token plus a tail bucket (a served or cached
teacher)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def kl_rows(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row, from log-probabilities [..., V] -> [...]."""
    return (p_logps.exp() * (p_logps - q_logps)).sum(-1)


def generalized_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's generalized JSD per row (arXiv 2306.13649 eq. 1, as TRL's generalized_jsd_loss):
    JSD_b = b KL(p_T || M) + (1 - b) KL(p_S || M), M = b p_T + (1 - b) p_S; b = 0 is the forward KL(p_T || p_S),
    b = 1 the reverse KL(p_S || p_T) (the end points are those KLs, not the vanishing limits of the mixture form).
    student_logps, teacher_logps: [..., V] log-probabilities over the same support."""
    if beta == 0:
        return kl_rows(teacher_logps, student_logps)
    if beta == 1:
        return kl_rows(student_logps, teacher_logps)
    mixture = torch.logaddexp(student_logps + math.log1p(-beta), teacher_logps + math.log(beta))
    return beta * kl_rows(teacher_logps, mixture) + (1 - beta) * kl_rows(student_logps, mixture)


def with_tail_bucket(logps: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probs of k tokens -> [..., k + 1] with log(1 - sum p) appended: the mass outside the k, so top-k
    log-probs make a distribution (TRL's server teacher; its clamp keeps the tail at least 1 - exp(-1e-7))."""
    covered = torch.logsumexp(logps, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logps, torch.log(-torch.expm1(covered))], dim=-1)


@dataclass(frozen=True)
class DenseTeacher:
    """The teacher at each of N response positions as its last hidden states [N, H_T] and LM head: its logits are
    recomputed per chunk (H_T may differ from the student's; the vocabulary may not)."""

    hidden: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class TopKTeacher:
    """The teacher at each of N response positions as its k most likely tokens: log-probs [N, k] (at the
    distillation temperature) and token ids [N, k]; tail: append the mass outside them as one more outcome."""

    logps: torch.Tensor
    token_ids: torch.Tensor
    tail: bool = True


@dataclass(frozen=True)
class AdvantageTeacher:
    """An aligned teacher and its reference, both dense (ADPA): at each position the student is scored on
    sum_a p_S(a) (log pi_T(a) - log pi_Tref(a)), the teacher's advantage of every token under the student."""

    teacher: DenseTeacher
    reference: DenseTeacher


@dataclass(frozen=True)
class DistillSettings:
    beta: float = 1.0  # 0: forward KL(teacher || student), 1: reverse KL(student || teacher)
    temperature: float = 1.0  # both models' logits are divided by it
    chunk_size: int = 1024  # response tokens per chunk

    def __post_init__(self):
        if not 0 <= self.beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def head_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               temperature: float) -> torch.Tensor:
    """log softmax((h W^T + b) / T) of a chunk, the matmul in the head's dtype, the softmax in at least fp32."""
    logits = hidden.to(weight.dtype) @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)


def expected_advantage(student_logps: torch.Tensor, teacher_logps: torch.Tensor,
                       reference_logps: torch.Tensor) -> torch.Tensor:
    """-sum_a p_S(a) (log pi_T(a) - log pi_Tref(a)) per row: ADPA's per-token loss (arXiv 2502.17927), the negative
    of the teacher's advantage expected under the student's distribution."""
    return -(student_logps.exp() * (teacher_logps - reference_logps)).sum(-1)


def chunk_divergence(hidden, weight, bias, teacher, rows: slice, settings: DistillSettings) -> torch.Tensor:
    """The divergence at the chunk `rows` of the response tokens (hidden: the chunk's student hidden states)."""
    student = head_logps(hidden, weight, bias, settings.temperature)
    if isinstance(teacher, AdvantageTeacher):
        aligned, reference = (head_logps(t.hidden[rows], t.head_weight, t.head_bias, settings.temperature)
                              for t in (teacher.teacher, teacher.reference))
        return expected_advantage(student, aligned.to(student.dtype), reference.to(student.dtype))
    if isinstance(teacher, DenseTeacher):
        bias_t = teacher.head_bias
        target = head_logps(teacher.hidden[rows], teacher.head_weight, bias_t, settings.temperature)
        return generalized_jsd(student, target.to(student.dtype), settings.beta)
    ids = teacher.token_ids[rows].to(student.device)
    student = student.gather(1, ids)
    target = teacher.logps[rows].to(student.device, student.dtype)
    if teacher.tail:
        student, target = with_tail_bucket(student), with_tail_bucket(target)
    else:  # renormalised over the k tokens
        student = student - torch.logsumexp(student, -1, keepdim=True)
        target = target - torch.logsumexp(target, -1, keepdim=True)
    return generalized_jsd(student, target, settings.beta)


class ChunkedDistillation(torch.autograd.Function):
    """The per-token divergence [N] between the student (hidden [N, H], head weight, bias: these take gradients)
    and a DenseTeacher, TopKTeacher or AdvantageTeacher (no gradients), chunk by chunk over the N tokens. The backward recomputes each
    chunk's logits and differentiates it alone, so one chunk's [chunk, V] buffers are alive at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, settings: DistillSettings):
        out = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32),
                          device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], settings.chunk_size):
                rows = slice(start, start + settings.chunk_size)
                out[rows] = chunk_divergence(hidden[rows], weight, bias, teacher, rows, settings)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.teacher, ctx.settings = teacher, settings
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias = ctx.saved_tensors
        teacher, settings = ctx.teacher, ctx.settings
        wants = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if wants[0] else None
        sums = [None, None]  # the head's weight and bias gradients, summed over chunks in at least fp32
        leaves = [weight.detach().requires_grad_(wants[1]),
                  None if bias is None else bias.detach().requires_grad_(wants[2])]
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], settings.chunk_size):
                rows = slice(start, start + settings.chunk_size)
                h = hidden[rows].detach().requires_grad_(wants[0])
                with torch.enable_grad():
                    divergence = chunk_divergence(h, leaves[0], leaves[1], teacher, rows, settings)
                wrt = [t for t, want in zip((h, *leaves), wants) if want and t is not None]
                grads = iter(torch.autograd.grad(divergence, wrt, grad_out[rows].to(divergence.dtype)))
                if wants[0]:
                    grad_hidden[rows] = next(grads)
                for i, leaf in enumerate(leaves):
                    if wants[i + 1] and leaf is not None:
                        part = next(grads)
                        part = part.to(torch.promote_types(part.dtype, torch.float32))
                        sums[i] = part if sums[i] is None else sums[i].add_(part)
        out = [None if s is None else s.to(t.dtype) for s, t in zip(sums, (weight, bias))]
        if wants[1] and out[0] is None:  # no tokens: a zero gradient, not None
            out[0] = torch.zeros_like(weight)
        return grad_hidden, out[0], out[1], None, None


def chunked_divergence(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       teacher: DenseTeacher | TopKTeacher | AdvantageTeacher,
                       settings: DistillSettings) -> torch.Tensor:
    """Per response token [N]: the generalized JSD of the student's head on `hidden` to `teacher` (dense or top-k),
    or ADPA's expected advantage (an AdvantageTeacher; beta unused)."""
    return ChunkedDistillation.apply(hidden, weight, bias, teacher, settings)


@torch.no_grad()
def teacher_topk(teacher: DenseTeacher, k: int, temperature: float = 1.0,
                 chunk_size: int = 1024) -> TopKTeacher:
    """The dense teacher's k most likely tokens and their log-probs at `temperature`, chunk by chunk (what a top-k
    cache holds)."""
    n, vocab = teacher.hidden.shape[0], teacher.head_weight.shape[0]
    if not 0 < k <= vocab:
        raise ValueError(f"top-k must be in [1, {vocab}] (the vocabulary), got {k}")
    logps = torch.empty(n, k, dtype=torch.float32, device=teacher.hidden.device)
    ids = torch.empty(n, k, dtype=torch.long, device=teacher.hidden.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = head_logps(teacher.hidden[rows], teacher.head_weight, teacher.head_bias, temperature)
        top = chunk.topk(k, dim=-1)
        logps[rows], ids[rows] = top.values.float(), top.indices
    return TopKTeacher(logps, ids)

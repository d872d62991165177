"""Universal Logit Distillation across tokenizers (ULD, arXiv 2402.12030; TRL's GOLD with use_extended_uld and the
"bayesian" merge): the student's and the teacher's distributions over their own vocabularies, each sorted, compared
by L1 at every aligned group of tokens (data/crosstok.py spells out the alignment).

At a group of tokens g = (x_1, ..., x_m) the merged distribution is the chain rule's joint of the group's prefix and
its last position: q(a) = p(a | s_m) * prod_{j < m} p(x_j | s_j), each p(x_j | s_j) floored at 1e-8 as in TRL. The
per-group distance is sum_r |sort(q_S)_r - sort(q_T)_r|, the shorter vocabulary padded with zeros, and a sequence's
loss the mean over its groups."""

from __future__ import annotations

import torch
from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput
from alignkit.losses.options import LossOptions

TOKEN_PROB_FLOOR = 1e-8  # TRL's clamp on the scalar probabilities of a group's earlier tokens


def merge_groups(logps: torch.Tensor, groups: list[list[int]], token_ids: torch.Tensor) -> torch.Tensor:
    """[G, V] merged probabilities: at each group, the distribution at its last position times the probabilities of
    its earlier tokens. logps: [n, V] log-probs where row i predicts token_ids[i]."""
    probs = logps.exp()
    last = torch.tensor([group[-1] for group in groups], device=logps.device)
    earlier = [(g, i) for g, group in enumerate(groups) for i in group[:-1]]
    if not earlier:
        return probs[last]
    rows = torch.tensor([i for _, i in earlier], device=logps.device)
    scalar = probs[rows, token_ids.to(logps.device)[rows]].clamp_min(TOKEN_PROB_FLOOR)
    owner = torch.tensor([g for g, _ in earlier], device=logps.device)
    log_scale = torch.zeros(len(groups), dtype=probs.dtype, device=probs.device).index_add(0, owner, scalar.log())
    return probs[last] * log_scale.exp()[:, None]


def sorted_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[G]: sum_r |sort(student)_r - sort(teacher)_r| over each row, sorted descending, zero-padded to one width."""
    width = max(student.shape[-1], teacher.shape[-1])
    student = torch.nn.functional.pad(student.sort(-1, descending=True).values, (0, width - student.shape[-1]))
    teacher = torch.nn.functional.pad(teacher.sort(-1, descending=True).values, (0, width - teacher.shape[-1]))
    return (student - teacher.to(student.dtype)).abs().sum(-1)


def group_distances(student_logps: torch.Tensor, teacher_logps: torch.Tensor, groups: tuple,
                    token_ids: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[G] ULD distance of one sequence at each aligned group. student_logps [n_S, V_S], teacher_logps [n_T, V_T]: row
    i predicts token i of each side's response; groups: (student groups, teacher groups); token_ids: (student's
    response ids [n_S], teacher's [n_T])."""
    student = merge_groups(student_logps, groups[0], token_ids[0])
    teacher = merge_groups(teacher_logps, groups[1], token_ids[1])
    return sorted_l1(student, teacher)


class ULDOptions(LossOptions):
    """ULD across tokenizers: both models' logits at `temperature`, compared sorted at every aligned group."""

    temperature: float = Field(1.0, gt=0, description="both models' logits are divided by it")

    def needs(self) -> set[str]:
        return {"teacher", "cross_tokenizer"}


def uld_loss(inputs: LossInputs, opts: ULDOptions) -> LossOutput:
    """l = (1/|G|) sum_g sum_r |sort(q_S,g)_r - sort(q_T,g)_r| over the groups of each response, as TRL's ULDLoss
    (per sequence: sum over groups / their number; the loop means over examples), and an example's loss the mean over
    its responses that have groups (offline: its one completion; online: a prompt's k samples)."""
    if inputs.group_divergence is None or inputs.group_mask is None:
        raise ValueError("uld needs the per-group distances to a teacher (group_divergence); give a `teacher`")
    distance, mask = inputs.group_divergence, inputs.group_mask.to(inputs.group_divergence.dtype)
    per_response = (distance * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B, k]
    present = (mask.sum(-1) > 0).to(per_response.dtype)
    losses = (per_response * present).sum(-1) / present.sum(-1).clamp(min=1)
    return losses, {"distill/uld": losses.detach(), "distill/groups": mask.sum((-2, -1))}

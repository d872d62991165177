"""A teacher with its own tokenizer (`teacher_tokenizer: own`, loss uld): each example also in the teacher's
tokenisation, aligned to the student's (data/crosstok.py), and in every forward the ULD distance at each aligned group
(losses/uld.py). Unlike the shared-vocabulary divergences this path is not chunked: a sequence's [tokens x vocab]
probabilities exist for both models while its groups are compared (sorting needs every row whole)."""

from __future__ import annotations

import torch

from alignkit.data.crosstok import CrossTokenized, cross_tokenize
from alignkit.data.pack import PackedBatch, pack
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import DataError
from alignkit.losses.divergence import head_logps
from alignkit.losses.uld import group_distances
from alignkit.models.logprobs import ResponseLogProbs, response_logprobs
from alignkit.models.teacher import teacher_hidden

CROSS = "cross_tokenized"  # the key of each example's extras that holds its CrossTokenized


def with_teacher_tokens(examples: list[TokenizedExample], student_tokenizer,
                        teacher_tokenizer) -> list[TokenizedExample]:
    """The examples, each carrying its teacher tokenisation and alignment in extras[CROSS]. Chats (a loss mask per
    token) are refused: their template is the student's, which the teacher's tokens would not follow."""
    out = []
    for e in examples:
        if e.response_loss_masks is not None:
            raise DataError(e.source, e.row, "messages", "loss uld with teacher_tokenizer: own takes prompt and "
                            "completion records, not chats", hint="give prompt/completion text")
        crossed = cross_tokenize(e, student_tokenizer, teacher_tokenizer)
        out.append(TokenizedExample(e.prompt_ids, e.response_ids, e.source, e.row, {**e.extras, CROSS: crossed},
                                    e.response_loss_masks))
    return out


def per_sequence(values: torch.Tensor, token_seq: torch.Tensor, num_seq: int) -> list[torch.Tensor]:
    """Rows of `values` in packing order, split into one block per sequence (token_seq is grouped by sequence)."""
    return list(values.split(torch.bincount(token_seq, minlength=num_seq).tolist()))


@torch.no_grad()
def teacher_logps(teacher, crossed: list[CrossTokenized], temperature: float) -> tuple[list, list]:
    """Per sequence of the batch: the teacher's log-probs [n_T, V_T] at its response tokens and those tokens' ids."""
    batch = pack([c.teacher_example for c in crossed], max_tokens_per_row=None)
    hidden, weight, bias = teacher_hidden(teacher, batch)
    logps = head_logps(hidden, weight, bias, temperature)
    num_seq = batch.num_examples * batch.num_responses
    return (per_sequence(logps, batch.token_seq, num_seq),
            per_sequence(batch.token_targets.to(logps.device), batch.token_seq, num_seq))


def logprobs_and_groups(model, batch: PackedBatch, method,
                        crossed: list[CrossTokenized]) -> tuple[ResponseLogProbs, torch.Tensor, torch.Tensor]:
    """(the policy's response log-probs at method.temperature; the ULD distance [B, k, G] at each aligned group,
    with the policy's gradient; its mask [B, k, G]). method: train/method.Method (its teacher, options, chunk size);
    crossed: each batch example's CrossTokenized, in batch order. The teacher runs first, without gradients; the
    distances are taken inside the policy's forward (response_logprobs' divergence_fn), so under DDP or FSDP2 their
    gradient is reduced with the rest of the wrapped module's backward, once."""
    num_seq = batch.num_examples * batch.num_responses
    groups = [crossed[seq // batch.num_responses].groups[seq % batch.num_responses] for seq in range(num_seq)]
    teacher = teacher_logps(method.teacher, crossed, method.opts.temperature)

    def distances(selected: torch.Tensor, head) -> torch.Tensor:
        return group_distance_rows(selected, head, batch, teacher, groups, method.opts.temperature)

    out = response_logprobs(model, batch, method.chunk_size, method.temperature, distances)
    padded = out.divergence
    counts = torch.tensor([len(g[0]) for g in groups], device=padded.device)  # no groups: an empty response
    mask = torch.arange(padded.shape[-1], device=padded.device)[None] < counts[:, None]
    shape = (batch.num_examples, batch.num_responses, padded.shape[-1])
    return out, padded.view(shape), mask.view(shape)


def group_distance_rows(selected: torch.Tensor, head, batch: PackedBatch, teacher: tuple, groups: list,
                        temperature: float) -> torch.Tensor:
    """[B * k, G]: each sequence's ULD distance at its aligned groups, zero-padded to the most groups (at least 1).
    selected: the policy's hidden states at the response tokens' predicting positions, head: its output head;
    teacher: teacher_logps' (log-probs, token ids) per sequence; groups: each sequence's (student groups, teacher
    groups); temperature: the distillation temperature (both models' logits)."""
    device, num_seq = selected.device, len(groups)
    student = per_sequence(head_logps(selected, head.weight, head.bias, temperature), batch.token_seq, num_seq)
    student_ids = per_sequence(batch.token_targets.to(device), batch.token_seq, num_seq)
    teacher_out, teacher_ids = teacher
    distances = [group_distances(student[seq], teacher_out[seq].to(device), groups[seq],
                                 (student_ids[seq], teacher_ids[seq].to(device)))
                 if groups[seq][0] else student[seq].new_zeros(0)  # nothing both tokenisations spell
                 for seq in range(num_seq)]
    width = max([len(d) for d in distances] + [1])
    return torch.stack([torch.nn.functional.pad(d, (0, width - len(d))) for d in distances])

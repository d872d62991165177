"""The teacher of a distillation run: a second model, frozen, loaded once and checked against the student before
anything is written; and its last hidden states at the positions that predict response tokens (what the chunked
divergence projects through its head, losses/divergence.py)."""

from __future__ import annotations

import torch

from alignkit.data.pack import PackedBatch
from alignkit.errors import AlignkitError, ConfigError
from alignkit.models.attention import set_attention
from alignkit.models.inference import frozen_copy
from alignkit.models.logprobs import packed_hidden_states


def vocabulary_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_teacher(teacher, student, teacher_tokenizer=None, student_tokenizer=None, key: str = "teacher") -> None:
    """The teacher's vocabulary must be the student's: the same head rows and, where both tokenizers are known,
    the same token -> id map (a distribution over ids compares only if the ids mean the same tokens)."""
    rows_t, rows_s = vocabulary_size(teacher), vocabulary_size(student)
    if rows_t != rows_s:
        raise ConfigError(key, f"the teacher's vocabulary has {rows_t} tokens, the student's {rows_s}; distillation "
                               "compares distributions over one shared tokenizer: use a teacher of the student's "
                               "family, or loss uld with teacher_tokenizer: own")
    if teacher_tokenizer is not None and student_tokenizer is not None:
        vocab_t, vocab_s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        if vocab_t != vocab_s:
            differing = sorted(set(vocab_t.items()) ^ set(vocab_s.items()), key=lambda item: item[1])[:1]
            raise ConfigError(key, f"the teacher's tokenizer maps tokens to ids differently from the student's (e.g. "
                                   f"{differing[0][0]!r}); distillation needs one shared tokenizer, or loss uld with "
                                   "teacher_tokenizer: own")


def load_teacher(path: str, student, student_tokenizer=None, precision: str = "fp32", key: str = "teacher",
                 attention: str = "sdpa"):
    """The frozen, eval-mode teacher at `path` (an alias, directory or hub id), checked against the student; in a
    bf16 run its linear weights are bf16 (as the reference's: models/inference.frozen_copy), and it attends as the
    student does (the run's `attention`: packed_sdpa skips the dense mask). A path that does not load is a
    ConfigError naming `key`."""
    model, tokenizer = open_teacher(path, key)
    check_teacher(model, student, tokenizer, student_tokenizer, key)
    return frozen_teacher(model, precision, attention)


def load_own_teacher(path: str, precision: str = "fp32", attention: str = "sdpa"):
    """(the frozen teacher at `path`, its own tokenizer): a teacher of any vocabulary (loss uld,
    teacher_tokenizer: own), so nothing is checked against the student."""
    model, tokenizer = open_teacher(path)
    return frozen_teacher(model, precision, attention), tokenizer


def frozen_teacher(model, precision: str, attention: str):
    teacher = frozen_copy(model, precision)
    set_attention(teacher, attention)
    return teacher


def open_teacher(path: str, key: str = "teacher"):
    """(model, tokenizer) at `path`, unchecked and not yet frozen; a path that does not load is a ConfigError."""
    from alignkit.models.resolve import load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer(path)
    except Exception as err:  # noqa: BLE001 - any failure to load is the same user error: a bad path
        if isinstance(err, AlignkitError):  # resolve's own message says what to give
            raise ConfigError(key, f"the teacher does not load: {err}") from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(key, f"{path!r} does not load as a causal LM ({reason}); give a model alias, a local "
                               "model directory or a hub id") from None
    return model, tokenizer


@torch.no_grad()
def teacher_hidden(teacher, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden [N, H_T] at each response token's predicting position, head weight, head bias) of one no-grad
    forward of the teacher over the packed rows."""
    hidden = packed_hidden_states(teacher, batch)
    device = hidden.device
    selected = hidden[batch.token_rows.to(device), batch.token_pred_positions.to(device)]
    head = teacher.get_output_embeddings()
    return selected, head.weight.detach(), None if head.bias is None else head.bias.detach()

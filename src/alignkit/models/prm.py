"""Process reward models: HF AutoModelForTokenClassification with two labels (bad, good), as TRL's PRMTrainer
trained them; a step's logits are the head's output at the step's last token."""

from __future__ import annotations

import torch

from alignkit.errors import AlignkitError


def load_prm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a token-classification model with 2 labels. From a causal LM checkpoint the head is new
    (initialised by HF); from a saved PRM it is the trained one."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from alignkit.models.resolve import resolve_model

    model_dir = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AlignkitError(f"model '{name_or_path}': the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # fills padded batches only, where attention masks it
    model = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=2, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def token_logits(model, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """[B, T, 2] head outputs of right-padded sequences (a causal model's real tokens never see the padding)."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
    return model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits


def labelled_logits(model, sequences: list[list[int]], labels: list[list[int]], pad_id: int):
    """(step_logits [N, 2], step_labels [N], sequence of each step [N]) at every labelled token (label != -100),
    in order: sequence by sequence, step by step."""
    logits = token_logits(model, sequences, pad_id)
    width = logits.shape[1]
    padded = torch.full((len(labels), width), -100, dtype=torch.long)
    for i, row in enumerate(labels):
        padded[i, :len(row)] = torch.tensor(row)
    padded = padded.to(logits.device)
    rows, cols = (padded != -100).nonzero(as_tuple=True)
    return logits[rows, cols], padded[rows, cols], rows

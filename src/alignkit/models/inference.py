"""Running a model outside training: eval mode without gradients, frozen copies (references), a sharded parameter
gathered whole, and left-padded batches of token ids."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model):
    """The model in eval mode under no_grad; its training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def frozen_copy(model, precision: str = "fp32"):
    """A frozen eval-mode copy of `model` (a reference). precision "bf16": its linear layers are stored in bf16
    (embeddings, norms and a head tied to the embedding stay as they are). Under bf16 autocast a linear layer
    rounds its fp32 weight to bf16 anyway, so the copy gives the same bits there, with half the memory for its
    matmul weights and no cast per forward; it is then meant to run under autocast only."""
    copied = copy.deepcopy(model).eval()
    copied.requires_grad_(False)
    if precision == "bf16":
        embeddings = {id(m.weight) for m in copied.modules() if isinstance(m, torch.nn.Embedding)}
        for module in copied.modules():
            if isinstance(module, torch.nn.Linear) and id(module.weight) not in embeddings:
                module.to(torch.bfloat16)
    return copied


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter in full: an FSDP2 shard (a DTensor) is gathered from every rank, a collective that every rank
    calls in the same order (the weight push and a moving reference read a sharded policy this way, one parameter
    at a time, so no second whole copy of the model is ever gathered); any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of left-padded rows; positions start at 0 at each row's start."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            input_ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)

"""A student cut from its teacher, as users compress a model: keep some decoder layers (default every other one),
copy their weights, keep the embeddings, final norm and LM head. Used by the distillation benchmarks."""

from __future__ import annotations

import re

import torch


def drop_layers(teacher, keep_every: int = 2, keep: list[int] | None = None):
    """A new model of the teacher's class with the decoder layers `keep` (default 0, keep_every, 2 * keep_every, ...),
    their weights copied from the teacher; everything outside the layers is copied as is. The teacher is unchanged."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    total = config.num_hidden_layers
    keep = list(range(0, total, keep_every)) if keep is None else list(keep)
    if not keep or any(i < 0 or i >= total for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep: layer indices must be distinct and within 0..{total - 1}, got {keep}")
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (sliding/full) follow the layers
        config.layer_types = [config.layer_types[i] for i in keep]
    new_index = {old: new for new, old in enumerate(keep)}
    layer_key = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
    state = {}
    for key, value in teacher.state_dict().items():
        match = layer_key.match(key)
        if match is None:
            state[key] = value.clone()
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = value.clone()
    student = teacher.__class__(config).to(next(teacher.parameters()).dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    # tied LM heads are absent from a state dict that ties them; anything else missing is a bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"drop_layers: missing {missing}, unexpected {unexpected}")
    student.generation_config = teacher.generation_config
    return student.eval() if not teacher.training else student


@torch.no_grad()
def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())

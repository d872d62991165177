"""NEFTune (Jain et al., arXiv 2310.05914): uniform noise on the input embeddings while training.

e' = e + alpha / sqrt(L d) * u,  u ~ Uniform(-1, 1) per coordinate, L = sequence length, d = embedding width.
A forward hook on the embedding layer adds it, for one forward and only in training mode, so evaluation and
generation never see noise. Rows are packed, so L is each token's own sequence length (prompt + its response),
not the padded batch length HF/TRL use; on an unpadded single sequence the two agree.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from alignkit.data.pack import PackedBatch


def sequence_lengths(batch: PackedBatch) -> torch.Tensor:
    """[R, T] length of the sequence each token belongs to: |P| + |R_i| on response i, |P| + max_i |R_i| on the
    prompt (shared by all its responses), 0 on padding."""
    k = batch.num_responses
    valid = batch.example_ids >= 0
    key = torch.where(valid, batch.example_ids * (k + 1) + batch.segment_ids, 0)
    counts = torch.bincount(key[valid], minlength=batch.num_examples * (k + 1)).view(batch.num_examples, k + 1)
    prompt, responses = counts[:, :1], counts[:, 1:]
    per_segment = torch.cat([prompt + responses.max(dim=1, keepdim=True).values, prompt + responses], dim=1)
    return torch.where(valid, per_segment.flatten()[key], 0)


@contextmanager
def neftune(model, batch: PackedBatch, alpha: float):
    """Within the block, the model's input-embedding layer adds NEFTune noise for `batch` (alpha <= 0: no-op)."""
    if alpha <= 0:
        yield
        return
    embedding = model.get_input_embeddings()
    lengths = sequence_lengths(batch).float()
    scale = torch.where(lengths > 0, alpha / torch.sqrt(lengths.clamp(min=1) * embedding.weight.shape[1]), 0.0)

    def add_noise(module, args, output):
        if not module.training:
            return None
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * scale.to(device=output.device, dtype=output.dtype)[..., None]

    handle = embedding.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()

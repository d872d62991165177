"""The attention mask a packed batch hands to the model, in the form its attention implementation wants.

sdpa / eager: the dense additive [R, 1, T, T] mask (built once per batch, shared by every layer).
flex_attention: a FlexAttention BlockMask built from the same rule; blocks where no query may see any key
(other examples in the row, a sibling response) are skipped rather than computed and masked, so a long row
of many examples costs about what its examples cost separately. Meant for GPUs, where HF compiles the kernel.
"""

from __future__ import annotations

import torch

from alignkit.data.pack import PackedBatch

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def attention_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def flex_block_mask(batch: PackedBatch, device: torch.device | str, block_size: int = 128):
    """BlockMask of the packer's rule: query i sees key j iff same example, j <= i, and j is in the prompt or
    in i's own response (padding sees earlier padding only, so no row is empty)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = batch.input_ids.shape
    return create_block_mask(packed_mask_mod(batch, device), B=rows, H=None, Q_LEN=length, KV_LEN=length,
                             device=device, BLOCK_SIZE=block_size)


def packed_mask_mod(batch: PackedBatch, device: torch.device | str):
    """FlexAttention mask_mod of data.pack.block_mask's rule (the same rule, written on index tensors)."""
    example = batch.example_ids.to(device)
    segment = batch.segment_ids.to(device)

    def allowed(b, h, q, kv):
        same_example = example[b, q] == example[b, kv]
        visible = (segment[b, kv] == 0) | (segment[b, kv] == segment[b, q]) | (example[b, q] < 0)
        return same_example & visible & (kv <= q)

    return allowed


def packed_attention_mask(model, batch: PackedBatch, device: torch.device | str):
    if attention_implementation(model) == "flex_attention":
        return flex_block_mask(batch, device)
    dtype = next(model.parameters()).dtype
    return batch.attention_mask(dtype).to(device)


def set_attention(model, implementation: str) -> None:
    """Switch a loaded model's attention implementation (a no-op when it already uses it)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention '{implementation}': expected one of {ATTENTION_IMPLEMENTATIONS}")
    if attention_implementation(model) != implementation:
        model.set_attn_implementation(implementation)

"""The attention a packed batch runs with, and the mask in the form that attention wants.

packed_sdpa (default): per example span of each row (a CPU "varlen" attention), and within it per segment, so
  no [L, L] tensor exists: the prompt runs causally through SDPA with no mask (the flash kernel, which saves
  its output and log-sum-exp, not the probabilities), then all the responses' queries attend to the example's
  keys at once under an [N, P + N] mask (the whole prompt, and their own response causally). Queries, keys and
  values are views of the projections. Long responses (k conversations of a few hundred tokens) run in chunks of
  consecutive responses, each against [prompt; the chunk's own keys] (the prompt's keys copied: a small copy), so
  a response does not pay for scores against its siblings that the mask throws away. Attention costs what the
  examples cost separately, however many share a row, so rows can be long and need no padding. Without the spans (generation, plain HF
  calls) it is HF's sdpa.
sdpa / eager: the dense additive [R, 1, T, T] mask over whole rows (built once per batch, shared by every
  layer); every row pays T^2, so keep rows short.
flex_attention: a FlexAttention BlockMask built from the same rule; blocks where no query may see any key are
  skipped. Meant for GPUs, where HF compiles the kernel (torch has no CPU backward for it).
"""

from __future__ import annotations

import torch

from alignkit.data.pack import PackedBatch

ATTENTION_IMPLEMENTATIONS = ("packed_sdpa", "sdpa", "eager", "flex_attention")
RESPONSE_CHUNK = 128  # response tokens per attention call: fewer calls below it, fewer masked-out scores above
SPANS_KWARG = "alignkit_spans"


def packed_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """HF attention function: per example span of each row (from `packed_attention_kwargs`, a keyword HF forwards
    to every attention call), the prompt causally, then each response against [prompt; itself]; padding positions
    output zeros."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = kwargs.pop(SPANS_KWARG, None)
    if spans is None:
        if attention_mask is not None and attention_mask.dim() == 4 and not any(attention_mask.stride()):
            raise RuntimeError("packed_sdpa: this model's attention layers were not given the example spans "
                               "(they do not pass keyword arguments on); use attention: sdpa")
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0

    def attend(q, k, v, mask):  # [1, H, n, D]; GQA without repeating the keys (HF repeats them under a mask)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=kwargs.get("scaling"),
            enable_gqa=groups > 1)

    rows = []
    length = query.shape[2]
    for r, row_spans in enumerate(spans):
        pieces = []
        for start, prompt_end, end, chunks in row_spans:
            q, k, v = (t[r:r + 1, :, start:end] for t in (query, key, value))  # views: nothing is copied
            prompt = prompt_end - start
            pieces.append(attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], None))
            for lo, hi, mask in chunks:  # responses lo..hi of the span against [prompt; themselves], under `mask`
                if lo == prompt and hi == end - start:
                    keys, values = k, v
                else:
                    keys = torch.cat([k[:, :, :prompt], k[:, :, lo:hi]], 2)
                    values = torch.cat([v[:, :, :prompt], v[:, :, lo:hi]], 2)
                pieces.append(attend(q[:, :, lo:hi], keys, values, mask))
        used = row_spans[-1][2] if row_spans else 0
        if used < length:
            pieces.append(query.new_zeros(1, query.shape[1], length - used, query.shape[3]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def responses_mask(prompt: int, lengths: list[int], device) -> torch.Tensor:
    """[1, 1, N, prompt + N] bool for the N = sum(lengths) response tokens of one example: each sees the whole
    prompt and its own response's tokens up to itself, never a sibling's (n x L, never L x L)."""
    n = sum(lengths)
    mask = torch.zeros(n, prompt + n, dtype=torch.bool, device=device)
    mask[:, :prompt] = True
    first = 0
    for size in lengths:
        mask[first:first + size, prompt + first:prompt + first + size] = torch.ones(size, size, dtype=torch.bool,
                                                                                 device=device).tril()
        first += size
    return mask[None, None]


def response_chunks(prompt: int, lengths: list[int], device) -> list[tuple[int, int, torch.Tensor]]:
    """(first column, end column, mask) within an example's span of each chunk of consecutive responses: a chunk
    closes once it holds RESPONSE_CHUNK tokens."""
    chunks, first, sizes = [], prompt, []
    for i, size in enumerate(lengths):
        sizes.append(size)
        if sum(sizes) >= RESPONSE_CHUNK or i == len(lengths) - 1:
            chunks.append((first, first + sum(sizes), responses_mask(prompt, sizes, device)))
            first, sizes = first + sum(sizes), []
    return chunks


def example_spans(batch: PackedBatch) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) columns of each example (the packer writes examples contiguously)."""
    spans = []
    for row in batch.example_ids.tolist():
        row_spans, start = [], 0
        for col in range(1, len(row) + 1):
            if col == len(row) or row[col] != row[start]:
                if row[start] >= 0:
                    row_spans.append((start, col))
                start = col
        spans.append(row_spans)
    return spans


def register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("packed_sdpa", packed_sdpa_forward)
    AttentionMaskInterface.register("packed_sdpa", sdpa_mask)  # generation's 2-D masks: built as for sdpa


def loadable_attention(implementation: str) -> str:
    """The name from_pretrained gets (packed_sdpa is switched on after loading, by set_attention)."""
    return "sdpa" if implementation == "packed_sdpa" else implementation


def default_row_tokens(cfg_max_tokens_per_row: int | None, implementation: str, max_tokens_per_batch: int) -> int | None:
    """Rows of one micro-batch: long rows are free where attention skips other examples (packed_sdpa, flex);
    under a dense mask (None) the packer keeps rows to the longest example."""
    if cfg_max_tokens_per_row is not None:
        return cfg_max_tokens_per_row
    return max_tokens_per_batch if implementation in ("packed_sdpa", "flex_attention") else None


def packed_attention_kwargs(model, batch: PackedBatch) -> dict:
    """packed_sdpa: per row, per example, (start, prompt end, end, the responses' mask), in columns."""
    if attention_implementation(model) != "packed_sdpa":
        return {}
    device = next(model.parameters()).device
    spans = []
    for r, row in enumerate(example_spans(batch)):
        segments = batch.segment_ids[r].tolist()
        row_spans = []
        for start, end in row:
            runs = []  # [segment, length] of each run of one segment
            for col in range(start, end):
                if runs and segments[col] == runs[-1][0]:
                    runs[-1][1] += 1
                else:
                    runs.append([segments[col], 1])
            if runs[0][0] != 0 or any(seg == 0 for seg, _ in runs[1:]):
                raise ValueError("packed_sdpa: an example span must be its prompt followed by its responses")
            prompt = runs[0][1]
            row_spans.append((start, start + prompt, end, response_chunks(prompt, [n for _, n in runs[1:]], device)))
        spans.append(row_spans)
    return {SPANS_KWARG: spans}


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
    implementation = attention_implementation(model)
    if implementation == "flex_attention":
        return flex_block_mask(batch, device)
    dtype = next(model.parameters()).dtype
    if implementation == "packed_sdpa":
        # The spans carry their own masks (packed_attention_kwargs); HF only needs a 4-D mask to take it as
        # prepared. A zero-stride placeholder, never the dense [R, 1, T, T]: O(sum L^2) memory, not O(T^2).
        rows, length = batch.input_ids.shape
        return torch.zeros((), dtype=dtype, device=device).expand(rows, 1, length, length)
    return batch.attention_mask(dtype).to(device)


def set_attention(model, implementation: str) -> None:
    """Switch a loaded model's attention implementation (a no-op when it already uses it)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention '{implementation}': expected one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "packed_sdpa":
        register_packed_sdpa()
    if attention_implementation(model) != implementation:
        model.set_attn_implementation(implementation)

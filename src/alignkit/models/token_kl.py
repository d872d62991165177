"""Per-token KL(pi_ref || pi_theta) over the full vocabulary at every response position, and the reference's
activations there (SparsePO's KL term and masks), from one PackedBatch and a live reference model.

The reference runs once without gradients; its last hidden states at the predicting positions are kept (not its
logits), and both models' logits are recomputed chunk by chunk over tokens, in the forward and in the backward,
so neither [tokens x vocab] matrix exists whole (as in models/logprobs.py). The policy's token log-probs come out
of the same chunked pass, so the KL costs one more head projection per chunk, not another policy forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.pack import PackedBatch
from alignkit.models.logprobs import (
    ChunkSettings,
    HeadGrads,
    ResponseLogProbs,
    _chunk_logits,
    _compute_dtype,
    _softmax_,
    packed_decoder_outputs,
    packed_hidden_states,
)


@dataclass
class ReferenceForward:
    hidden: torch.Tensor  # [N, H] the reference's last hidden state at each response token's predicting position
    activations: torch.Tensor  # [N, L] each decoder layer's output there, averaged over the hidden dimension
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None


@torch.no_grad()
def reference_forward(ref_model, batch: PackedBatch) -> ReferenceForward:
    """One no-grad forward of the reference over the packed batch. Activations are read at the position whose
    logits predict the token (the SparsePO code shifts them the same way, activations[:, :-1] with labels[:, 1:])."""
    device = next(ref_model.parameters()).device
    out = packed_decoder_outputs(ref_model, batch, output_hidden_states=True)
    rows, cols = batch.token_rows.to(device), batch.token_pred_positions.to(device)
    layers = out.hidden_states[1:]  # the embeddings are not a layer's activation
    activations = torch.stack([h[rows, cols].float().mean(-1) for h in layers], dim=-1)
    head = ref_model.get_output_embeddings()
    return ReferenceForward(out[0][rows, cols], activations, head.weight.detach(),
                            None if head.bias is None else head.bias.detach())


class ChunkedLogpsAndKL(torch.autograd.Function):
    """(log pi(target), KL(pi_ref || pi)) per token, chunk by chunk; gradients flow to the policy only.

    d/dlogits: log pi(target) gives onehot - p, KL gives p - p_ref, so with upstream g_lp, g_kl the chunk's
    gradient is g_lp onehot - (g_lp - g_kl) p - g_kl p_ref. The policy's (hidden, weight, bias) take gradients;
    `against`, what they are scored against, takes none: (targets, the reference's hidden states, head weight, head
    bias)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, against: tuple, settings: ChunkSettings):
        targets, ref_hidden, ref_weight, ref_bias = against
        chunk_size, compute_dtype = settings.chunk_size, settings.compute_dtype
        n = hidden.shape[0]
        token_logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        token_kl = torch.empty(n, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                end = start + chunk_size
                logps = torch.log_softmax(_chunk_logits(hidden[start:end], weight, bias, compute_dtype), dim=1)
                ref_logps = torch.log_softmax(_chunk_logits(ref_hidden[start:end], ref_weight, ref_bias,
                                                            compute_dtype), dim=1)
                token_logps[start:end] = logps.gather(1, targets[start:end, None]).squeeze(1)
                token_kl[start:end] = (ref_logps.exp() * (ref_logps - logps)).sum(1)
                del logps, ref_logps
        ctx.save_for_backward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias)
        ctx.settings = settings
        return token_logps, token_kl

    @staticmethod
    def backward(ctx, grad_logps, grad_kl):
        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias = ctx.saved_tensors
        chunk_size, compute_dtype = ctx.settings.chunk_size, ctx.settings.compute_dtype
        grads = HeadGrads(ctx, hidden, weight, bias, compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                end = start + chunk_size
                h = hidden[start:end]
                g_lp, g_kl = grad_logps[start:end].float(), grad_kl[start:end].float()
                grad_logits = _softmax_(_chunk_logits(h, weight, bias, compute_dtype)).mul_(-(g_lp - g_kl)[:, None])
                ref_probs = _softmax_(_chunk_logits(ref_hidden[start:end], ref_weight, ref_bias, compute_dtype))
                grad_logits.sub_(ref_probs.mul_(g_kl[:, None]))
                del ref_probs
                grad_logits[torch.arange(len(g_lp)), targets[start:end]] += g_lp
                grads.add(grad_logits, h, slice(start, end))
                del grad_logits
        return *grads.result(), None, None


def logprobs_and_token_kl(model, batch: PackedBatch, ref: ReferenceForward,
                          chunk_size: int = 1024) -> tuple[ResponseLogProbs, torch.Tensor]:
    """The policy's response log-probs (as response_logprobs) and KL(pi_ref || pi_theta) [N] at every response
    token, differentiable through the policy."""
    hidden = packed_hidden_states(model, batch)
    device = hidden.device
    selected = hidden[batch.token_rows.to(device), batch.token_pred_positions.to(device)]
    head = model.get_output_embeddings()
    against = (batch.token_targets.to(device), ref.hidden.to(device), ref.head_weight.to(device),
               None if ref.head_bias is None else ref.head_bias.to(device))
    token_logps, token_kl = ChunkedLogpsAndKL.apply(selected, head.weight, head.bias, against,
                                                    ChunkSettings(chunk_size, _compute_dtype(selected)))
    num_seq = batch.num_examples * batch.num_responses
    seq_logps = torch.zeros(num_seq, dtype=token_logps.dtype, device=device).index_add(
        0, batch.token_seq.to(device), token_logps)
    shape = (batch.num_examples, batch.num_responses)
    return ResponseLogProbs(token_logps, seq_logps.view(shape), batch.seq_lengths.to(device)), token_kl


def pad_tokens(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Per-token values [N, ...] in PackedBatch order as [B, k, T_max, ...], zero where a sequence is shorter."""
    num_seq = batch.num_examples * batch.num_responses
    counts = torch.bincount(batch.token_seq, minlength=num_seq)
    longest = int(counts.max()) if len(counts) else 0
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(len(batch.token_seq)) - starts[batch.token_seq]
    out = values.new_zeros((num_seq, longest, *values.shape[1:])).index_put(
        (batch.token_seq.to(values.device), offsets.to(values.device)), values)
    return out.view(batch.num_examples, batch.num_responses, longest, *values.shape[1:])

"""Log-probabilities of response tokens from a PackedBatch.

The decoder runs once over the packed rows; only the hidden states that predict response tokens are
projected to the vocabulary, in chunks of tokens, so the [tokens x vocab] logits are never materialised
whole, neither in the forward nor in the backward pass (the backward recomputes each chunk's logits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.pack import PackedBatch
from alignkit.models.attention import packed_attention_kwargs, packed_attention_mask
from alignkit.models.value_head import PolicyWithValueHead


@dataclass
class ResponseLogProbs:
    token_logps: torch.Tensor  # [N] one per response token, in PackedBatch.token_* order
    seq_logps: torch.Tensor  # [B, k] summed over each response's tokens
    lengths: torch.Tensor  # [B, k] token counts
    values: torch.Tensor | None = None  # [N] a value head's V(s_t) per response token, in the same order
    divergence: torch.Tensor | None = None  # the caller's term of the same forward: [N] per token (train/teacher.py)
    # or [B * k, G] per aligned group (train/cross_teacher.py)

    def padded(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs as [B, k, T_max] (0 where masked) and the bool mask."""
        num_seq = batch.num_examples * batch.num_responses
        counts = torch.bincount(batch.token_seq, minlength=num_seq)
        T = int(counts.max()) if len(counts) else 0
        starts = torch.cumsum(counts, 0) - counts
        # token_seq is grouped by sequence in packing order, so position-in-sequence is an offset from its start.
        offsets = torch.arange(len(batch.token_seq)) - starts[batch.token_seq]
        values = self.token_logps.new_zeros(num_seq, T)
        mask = torch.zeros(num_seq, T, dtype=torch.bool)
        values = values.index_put((batch.token_seq, offsets), self.token_logps)
        mask[batch.token_seq, offsets] = True
        shape = (batch.num_examples, batch.num_responses, T)
        return values.view(shape), mask.view(shape)


def _compute_dtype(reference: torch.Tensor) -> torch.dtype:
    device_type = reference.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return reference.dtype


# Up to this many bytes of response-token probabilities are kept from forward to backward, so the backward
# does not recompute the vocabulary projection (one matmul of three); larger batches recompute chunk by chunk.
KEEP_PROBS_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ChunkSettings:
    """How a chunked head function walks the tokens."""

    chunk_size: int  # tokens per chunk
    compute_dtype: torch.dtype  # of the head's matmuls (the autocast dtype, else the hidden states')
    keep_bytes: int = 0  # softmax bytes the forward may keep for the backward (0: the backward recomputes)
    temperature: float = 1.0  # the logits are divided by it (online: the sampling temperature, as TRL does)

    def __post_init__(self):
        if self.temperature <= 0:  # greedy decoding has no log-probs to score: the policy is a point mass
            raise ValueError(f"log-probs at temperature {self.temperature}: it must be > 0")


class HeadGrads:
    """A chunked head function's gradients, filled chunk by chunk: grad_hidden row by row, the weight and bias
    gradients summed in fp32 (the first chunk's product starts each sum). Shared by every chunked head function."""

    def __init__(self, ctx, hidden, weight, bias, compute_dtype):
        self.needs_weight = ctx.needs_input_grad[1]
        self.needs_bias = bias is not None and ctx.needs_input_grad[2]
        self.weight, self.bias, self.compute_dtype = weight, bias, compute_dtype
        self.hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        self.weight_sum = self.bias_sum = None

    def add(self, grad_logits, h, rows: slice) -> None:
        """Chain one chunk's logit gradient through the head."""
        grad_logits = grad_logits.to(self.compute_dtype)
        if self.hidden is not None:
            self.hidden[rows] = (grad_logits @ self.weight.to(self.compute_dtype)).to(self.hidden.dtype)
        if self.needs_weight:
            part = (grad_logits.T @ h.to(self.compute_dtype)).float()
            self.weight_sum = part if self.weight_sum is None else self.weight_sum.add_(part)
        if self.needs_bias:
            part = grad_logits.float().sum(0)
            self.bias_sum = part if self.bias_sum is None else self.bias_sum.add_(part)

    def result(self, zero_if_no_tokens: bool = False) -> tuple:
        """(grad hidden, grad weight, grad bias), the sums in the parameters' dtypes. zero_if_no_tokens: a zero
        gradient, not None, for a weight or bias that needs one when there were no chunks."""
        if zero_if_no_tokens and self.needs_weight and self.weight_sum is None:
            self.weight_sum = torch.zeros_like(self.weight, dtype=torch.float32)
        if zero_if_no_tokens and self.needs_bias and self.bias_sum is None:
            self.bias_sum = torch.zeros_like(self.bias, dtype=torch.float32)
        grad_weight = None if self.weight_sum is None else self.weight_sum.to(self.weight.dtype)
        grad_bias = None if self.bias_sum is None else self.bias_sum.to(self.bias.dtype)
        return self.hidden, grad_weight, grad_bias


class ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target], computed chunk by chunk over tokens; the backward reuses the forward's
    softmax when all of it fits in settings.keep_bytes, else recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, settings: ChunkSettings):
        chunk_size, compute_dtype, temperature = settings.chunk_size, settings.compute_dtype, settings.temperature
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        keep = any(ctx.needs_input_grad[:3]) and hidden.shape[0] * weight.shape[0] * 4 <= settings.keep_bytes
        ctx.probs = [] if keep else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                logits = _chunk_logits(hidden[start:start + chunk_size], weight, bias, compute_dtype, temperature)
                target_logits = logits.gather(1, targets[start:start + chunk_size, None]).squeeze(1)
                maxes, sums = _shifted_exp_(logits)
                out[start:start + chunk_size] = target_logits - sums.log() - maxes.squeeze(1)
                if keep:
                    ctx.probs.append(logits.div_(sums[:, None]))
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.settings = settings
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        settings = ctx.settings
        chunk_size, compute_dtype, temperature = settings.chunk_size, settings.compute_dtype, settings.temperature
        kept, ctx.probs = ctx.probs, None  # consumed in place below; a second backward recomputes
        grads = HeadGrads(ctx, hidden, weight, bias, compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for i, start in enumerate(range(0, hidden.shape[0], chunk_size)):
                h = hidden[start:start + chunk_size]
                g = grad_out[start:start + chunk_size].float()
                if temperature != 1:  # the chain rule through logits / T
                    g = g / temperature
                # d/dlogits of (logit[target] - logsumexp) = onehot - softmax, built in place in the softmax
                # buffer: one [chunk, vocab] buffer alive instead of three.
                probs = kept[i] if kept is not None else _softmax_(_chunk_logits(h, weight, bias, compute_dtype,
                                                                                  temperature))
                grad_logits = probs.mul_(-g[:, None])
                grad_logits[torch.arange(len(g)), targets[start:start + chunk_size]] += g
                grads.add(grad_logits, h, slice(start, start + chunk_size))
                del grad_logits, probs
                if kept is not None:
                    kept[i] = None
        return *grads.result(zero_if_no_tokens=True), None, None


def _chunk_logits(h, weight, bias, compute_dtype, temperature: float = 1.0):
    logits = h.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits.add_(bias.to(compute_dtype))
    logits = logits.float()
    # T = 1 skips the division, so untempered runs keep their numbers bit for bit
    return logits.div_(temperature) if temperature != 1 else logits


def _shifted_exp_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits <- exp(logits - row max), in place (one [chunk, vocab] buffer); returns (row max [n, 1], row sums
    [n]), so logsumexp = log(sums) + max and softmax = logits / sums."""
    maxes = logits.amax(1, keepdim=True)
    return maxes, logits.sub_(maxes).exp_().sum(1)


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """softmax over dim 1, in place."""
    _, sums = _shifted_exp_(logits)
    return logits.div_(sums[:, None])


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        chunk_size: int = 1024, keep_bytes: int | None = None) -> torch.Tensor:
    keep_bytes = KEEP_PROBS_BYTES if keep_bytes is None else keep_bytes
    return ChunkedTokenLogps.apply(hidden, weight, bias, targets,
                                   ChunkSettings(chunk_size, _compute_dtype(hidden), keep_bytes))


def backbone(model):
    """The decoder without its LM head (works through a peft wrapper: LoRA layers live inside it)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def packed_decoder_outputs(model, batch: PackedBatch, **options):
    """The decoder's outputs over the packed rows (positions restart per response; the packer's mask in the
    form the model's attention wants). `options` go to the decoder, e.g. output_hidden_states=True."""
    device = next(model.parameters()).device
    return backbone(model)(
        input_ids=batch.input_ids.to(device),
        position_ids=batch.position_ids.to(device),
        attention_mask=packed_attention_mask(model, batch, device),
        **packed_attention_kwargs(model, batch),
        use_cache=False,
        **options,
    )


def packed_hidden_states(model, batch: PackedBatch) -> torch.Tensor:
    return packed_decoder_outputs(model, batch)[0]


class PackedForward(torch.nn.Module):
    """response_logprobs as a module's forward, so DDP and FSDP2 see (and hook) every training forward, a
    distillation divergence included (it is taken inside, so its gradient is reduced with the rest).
    The output is a tuple (token_logps, seq_logps, lengths, values, divergence) so their hooks find the tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, chunk_size: int = 1024, temperature: float = 1.0, divergence_fn=None):
        out = response_logprobs(self.model, batch, chunk_size, temperature, divergence_fn)
        # clone: FSDP2 hooks must not see a view
        return out.token_logps, out.seq_logps.clone(), out.lengths, out.values, out.divergence


def _wraps_packed_forward(model) -> bool:
    return isinstance(model, PackedForward) or isinstance(getattr(model, "module", None), PackedForward)


def response_logprobs(model, batch: PackedBatch, chunk_size: int = 1024, temperature: float = 1.0,
                      divergence_fn=None) -> ResponseLogProbs:
    """Per-token and per-sequence log-probs of every response token in the batch (prompt tokens get none), of the
    policy at `temperature` (its logits divided by it). `model` is a causal LM, a peft model, a PolicyWithValueHead
    (values from the same hidden states), or a PackedForward around one of them (bare, DDP-wrapped or FSDP2-sharded).
    divergence_fn(hidden [N, H], head) -> a tensor: a term of the same hidden states and output head (a distillation
    divergence: per token, train/teacher.py, or per aligned group, train/cross_teacher.py), returned as .divergence."""
    if _wraps_packed_forward(model):
        return ResponseLogProbs(*model(batch, chunk_size, temperature, divergence_fn))
    value_head = model.value_head if isinstance(model, PolicyWithValueHead) else None
    model = model.policy if value_head is not None else model
    hidden = packed_hidden_states(model, batch)
    device = hidden.device
    rows, cols = batch.token_rows.to(device), batch.token_pred_positions.to(device)
    selected = hidden[rows, cols]
    head = model.get_output_embeddings()
    settings = ChunkSettings(chunk_size, _compute_dtype(selected), KEEP_PROBS_BYTES, temperature)
    token_logps = ChunkedTokenLogps.apply(selected, head.weight, head.bias, batch.token_targets.to(device), settings)
    num_seq = batch.num_examples * batch.num_responses
    seq_logps = torch.zeros(num_seq, dtype=token_logps.dtype, device=device).index_add(
        0, batch.token_seq.to(device), token_logps)
    shape = (batch.num_examples, batch.num_responses)
    values = value_head(selected) if value_head is not None else None
    divergence = divergence_fn(selected, head) if divergence_fn is not None else None
    return ResponseLogProbs(token_logps, seq_logps.view(shape), batch.seq_lengths.to(device), values, divergence)

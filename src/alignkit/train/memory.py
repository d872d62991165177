"""The memory planner (`max_memory_gb`): how many tokens one forward/backward may carry so that the weights,
their gradients, AdamW's two moments and the activations autograd keeps for backward fit a budget; and each
step's micro-batches cut to that size. The step keeps its examples (and so its gradient): only the number of
forward/backward passes changes.

Activations are measured, not modelled: one probe forward of a synthetic prompt-and-two-responses example counts
the bytes of every tensor kept for backward (each storage once), per token. Under packed_sdpa that is linear in
tokens (no [L, L] tensor), so a per-token rate holds for any length."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

import torch

from alignkit.data.pack import fill_in_order, pack
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError

log = logging.getLogger("alignkit.train")
MMAP_THRESHOLD = 4 << 20  # smaller blocks stay in the heap: short sequences' many small tensors reuse it fast
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


@functools.cache
def _glibc():
    """The C library if it is glibc (mallopt and malloc_trim), else None (not Linux, or musl). Looked up once:
    find_library runs ldconfig in a subprocess, and the trim is called every online round."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Allocations from 4 MiB up are mmapped for the rest of the process, so a freed activation goes back to the
    OS at once: glibc raises its threshold to each freed mmapped block's size, after which freed activations stay
    in its heap. It costs page faults on every large block, hence on only where a run asked for less memory
    (train/step.release_memory); measurements in docs/long_context.md ("What the process holds beyond the
    tensors"). Returns whether the setting took (glibc only; elsewhere the C library's own policy stays)."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim_freed_memory() -> bool:
    """Hand the free pages of glibc's heap back to the OS now (malloc_trim): what a phase freed in the heap (a
    learner's activations, the engine's old weights) then no longer counts against the next phase's peak. Returns
    whether it ran (glibc only)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return libc is not None


HEADROOM = 1.25  # backward's transient activation gradients and the vocabulary chunk, over what is kept


def static_bytes(model, moment_bytes: int = 4) -> int:
    """Weights (all), plus a gradient and AdamW's exp_avg and exp_avg_sq per trainable parameter (moment_bytes each:
    4 in fp32, 2 with adam_moments: bf16)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return weights + sum(p.numel() * (p.element_size() + 2 * moment_bytes) for p in trainable)


class SavedBytes:
    """A saved-tensors hook counting the bytes autograd keeps, each storage once, leaving out `exclude` (the
    weights): `with SavedBytes(model.parameters()) as saved: ...; saved.bytes`."""

    def __init__(self, exclude=()):
        self.bytes = 0
        self._seen = {self._key(t) for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(tensor):
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()

    def _pack(self, tensor):
        key = self._key(tensor)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def activation_bytes_per_token(model, forward, vocab_size: int, probe_tokens: int = 512) -> float:
    """Bytes kept for backward per token, from one probe forward: forward(batch) -> a scalar loss."""
    generator = torch.Generator().manual_seed(0)
    response = probe_tokens // 8

    def ids(n):
        return torch.randint(3, vocab_size, (n,), generator=generator).tolist()

    batch = pack([TokenizedExample(ids(probe_tokens - 2 * response), [ids(response), ids(response)])],
                 max_tokens_per_row=probe_tokens)
    with SavedBytes(model.parameters()) as saved:
        loss = forward(batch)
    del loss
    return saved.bytes / batch.num_tokens


def micro_batch_tokens(max_memory_gb: float, model, per_token: float, moment_bytes: int = 4) -> int:
    """Tokens one forward/backward may carry under the budget."""
    budget, fixed = max_memory_gb * 1e9, static_bytes(model, moment_bytes)
    tokens = int((budget - fixed) / (HEADROOM * per_token))
    if tokens < 1:
        raise ConfigError("max_memory_gb", f"{max_memory_gb} GB: the weights, gradients and optimizer state alone "
                                           f"need {fixed / 1e9:.2f} GB; raise it, or use lora")
    return tokens


def split_to_budget(steps: list[list[list[int]]], examples: list[TokenizedExample], max_tokens: int):
    """Each step's micro-batches cut, in order, into pieces of at most max_tokens tokens (an example over the
    budget alone is a ConfigError naming it)."""
    for step in steps:
        for micro in step:
            for i in micro:
                if examples[i].num_tokens > max_tokens:
                    e = examples[i]
                    raise ConfigError("max_memory_gb", f"{e.source} row {e.row}: {e.num_tokens} tokens, over the "
                                                       f"{max_tokens} one forward/backward may carry in the budget; "
                                                       "raise it, or gradient_checkpointing: true")
    return [[piece for micro in step for piece in fill_in_order(micro, [examples[i].num_tokens for i in micro],
                                                                  max_tokens)] for step in steps]

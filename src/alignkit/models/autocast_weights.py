"""Autocast without keeping its weight copies for backward: bf16 training saves half a model less.

Under autocast every linear layer multiplies by a bf16 copy of its fp32 weight, and autograd keeps that copy until
the layer's backward has run: all of them are alive at the end of the forward, a bf16 model's worth of memory
(0.27 GB for SmolLM2-135M) on top of the activations. Those copies are a pure function of the weights, which do
not change before the optimizer step, so `recast_weights()` keeps a reference to the parameter instead and casts
it again when backward needs it (and autocast's own cache, which would hold every copy to the end of the
forward, is off: `lean_autocast`). The cast rounds the same way every time, so the backward sees the same bits and
the gradients are identical (tests/test_autocast_weights.py); the price is one cast per weight in backward."""

from __future__ import annotations

import contextlib

import torch

_VIEW_NODES = ("TBackward0", "TransposeBackward0", "PermuteBackward0")


class _Recast:
    """What is saved instead of a weight copy: the parameter, the dtype it was cast to, and the view taken of it."""

    __slots__ = ("param", "dtype", "transposed")

    def __init__(self, param, dtype, transposed):
        self.param, self.dtype, self.transposed = param, dtype, transposed

    def tensor(self) -> torch.Tensor:
        cast = self.param.detach().to(self.dtype)
        return cast.t() if self.transposed else cast


def cast_of_parameter(tensor: torch.Tensor) -> _Recast | None:
    """If `tensor` is a lower-precision cast of a trainable parameter (autocast's weight copy, or its transpose),
    the recipe to make it again; else None. Read from the autograd graph: the cast's grad_fn is a ToCopyBackward0
    whose only input is the parameter's AccumulateGrad (a transpose adds a TBackward0 in front)."""
    node, transposed = tensor.grad_fn, False
    if node is None or not tensor.dtype.is_floating_point:
        return None
    if type(node).__name__ in _VIEW_NODES and tensor.dim() == 2:
        if type(node).__name__ == "PermuteBackward0" or tensor.stride() != (1, tensor.shape[0]):
            return None  # only the plain 2-D transpose F.linear takes
        node, transposed = node.next_functions[0][0], True
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return None
    source = node.next_functions[0][0]
    param = getattr(source, "variable", None)  # AccumulateGrad of a leaf
    if not isinstance(param, torch.nn.Parameter) or param.dtype == tensor.dtype:
        return None
    expected = param.shape[::-1] if transposed else param.shape
    if tuple(tensor.shape) != tuple(expected) or not (tensor.is_contiguous() or transposed):
        return None
    return _Recast(param, tensor.dtype, transposed)


def _pack(tensor: torch.Tensor):
    recast = cast_of_parameter(tensor)
    return tensor if recast is None else recast


def _unpack(saved):
    return saved.tensor() if isinstance(saved, _Recast) else saved


def recast_weights() -> torch.autograd.graph.saved_tensors_hooks:
    """Context for a forward pass under autocast: weight copies are not kept for backward, but cast again there.
    Everything else autograd saves is kept as it is."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


@contextlib.contextmanager
def lean_autocast(device_type: str, dtype: torch.dtype = torch.bfloat16):
    """Autocast for a training forward, keeping no weight copy: neither in autocast's cache (each linear layer's
    weight is used once per forward, so the cache saves no cast; it would hold every copy until the forward ends)
    nor for backward (recast_weights)."""
    with torch.autocast(device_type, dtype=dtype, cache_enabled=False), recast_weights():
        yield

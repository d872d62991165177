"""Tensors autograd would keep for backward that are made again instead, bit for bit, when backward needs them.

- **Autocast's weight copies.** Under autocast every linear layer multiplies by a bf16 copy of its fp32 weight, and
  autograd keeps that copy until the layer's backward has run: a bf16 model's worth of memory (docs/long_context.md)
  on top of the activations. The weights do not change before the optimizer step, so a reference to
  the parameter is kept and the cast is done again; autocast's own cache, which would hold every copy to the end of
  the forward, is off (each linear weight is used once per forward, so the cache saves no cast).
- **SwiGLU's product** under `selective_recompute`: silu(gate) * up is the down projection's input, which its
  backward needs; gate and up are kept anyway (models/fused._SwiGLU), so the product is recomputed from them (one
  [tokens, intermediate] tensor per layer less).

Both are deterministic elementwise work on kept tensors, so the backward sees the same bits and the gradients are
identical (tests/test_saved_tensors.py)."""

from __future__ import annotations

import contextlib

import torch

_TRANSPOSE_NODES = ("TBackward0", "TransposeBackward0")
_VIEW_NODES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


class _Recast:
    """Saved instead of a weight copy: the parameter, the dtype it was cast to, and whether it was transposed."""

    __slots__ = ("param", "dtype", "transposed")

    def __init__(self, param, dtype, transposed):
        self.param, self.dtype, self.transposed = param, dtype, transposed

    def tensor(self) -> torch.Tensor:
        cast = self.param.detach().to(self.dtype)
        return cast.t() if self.transposed else cast


class _Recompute:
    """Saved instead of a custom function's output: the function's node (whose own saved tensors make the output
    again through its `recompute`) and the view of the output that was saved."""

    __slots__ = ("node", "shape")

    def __init__(self, node, shape):
        self.node, self.shape = node, shape

    def tensor(self) -> torch.Tensor:
        return self.node.recompute(self.node).view(self.shape)


def cast_of_parameter(tensor: torch.Tensor) -> _Recast | None:
    """If `tensor` is a lower-precision cast of a trainable parameter (autocast's weight copy, or its transpose),
    the recipe to make it again; else None. Read from the autograd graph: the cast's grad_fn is a ToCopyBackward0
    whose input is the parameter's AccumulateGrad (a transpose adds a TBackward0 in front)."""
    node, transposed = tensor.grad_fn, False
    if node is None or not tensor.dtype.is_floating_point:
        return None
    if type(node).__name__ in _TRANSPOSE_NODES:
        if tensor.dim() != 2 or tensor.stride() != (1, tensor.shape[0]):
            return None  # only the plain 2-D transpose F.linear takes
        node, transposed = node.next_functions[0][0], True
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return None
    param = getattr(node.next_functions[0][0], "variable", None)  # AccumulateGrad of a leaf
    if not isinstance(param, torch.nn.Parameter) or param.dtype == tensor.dtype:
        return None
    expected = param.shape[::-1] if transposed else param.shape
    if tuple(tensor.shape) != tuple(expected) or not (tensor.is_contiguous() or transposed):
        return None
    return _Recast(param, tensor.dtype, transposed)


def output_of_recomputable(tensor: torch.Tensor) -> _Recompute | None:
    """If `tensor` is the output (or a contiguous reshape of it) of a custom autograd function that can make its
    output again (its ctx carries `recompute(ctx)` and `output_numel`), the recipe; else None."""
    node = tensor.grad_fn
    if node is not None and type(node).__name__ in _VIEW_NODES:
        node = node.next_functions[0][0]
    if node is None or getattr(node, "recompute", None) is None:
        return None
    if not tensor.is_contiguous() or tensor.numel() != node.output_numel:
        return None
    return _Recompute(node, tuple(tensor.shape))


def _pack(tensor: torch.Tensor):
    return cast_of_parameter(tensor) or output_of_recomputable(tensor) or tensor


def _unpack(saved):
    return saved.tensor() if isinstance(saved, _Recast | _Recompute) else saved


def recomputed_saves() -> torch.autograd.graph.saved_tensors_hooks:
    """Context for a training forward: weight copies and recomputable outputs are made again in backward instead of
    kept. Everything else autograd saves is kept as it is."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


@contextlib.contextmanager
def training_forward(device_type: str, bf16: bool):
    """The context of a training forward: bf16 autocast (without its weight cache) where asked, and
    recomputed_saves."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False), recomputed_saves():
        yield

"""Selective recomputation (`selective_recompute: true`): RMSNorm and SwiGLU as autograd functions that keep only
their inputs and recompute the cheap elementwise work in backward, while every matmul output stays saved (the
middle ground between keeping all activations and gradient checkpointing, which redoes the matmuls too).

Per decoder layer and token this drops, in fp32: RMSNorm's float copy, squared input and normalised output (two
norms per layer), and SwiGLU's SiLU output; the training forward's saved-tensor hooks (models/saved_tensors) also
make SwiGLU's product, the down projection's input, again from gate and up. The forward values are the HF modules'
own formulas."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    """y = w * (x / sqrt(mean(x^2) + eps)), in fp32 then cast back, as HF's Llama/Qwen2/Mistral RMSNorm."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rms_forward(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(x.requires_grad)
            w_ = weight.detach().requires_grad_(weight.requires_grad)
            y = _rms_forward(x_, w_, ctx.eps)
            inputs = [t for t in (x_, w_) if t.requires_grad]
            grads = iter(torch.autograd.grad(y, inputs, grad))
        return (next(grads) if x.requires_grad else None, next(grads) if weight.requires_grad else None, None)


def _rms_forward(x, weight, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u, keeping g and u (the matmul outputs) and recomputing silu(g) in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        # the down projection's backward needs this output: models/saved_tensors makes it again from gate and up
        ctx.recompute, ctx.output_numel = _swiglu_output, gate.numel()
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_gate = grad * up * (sig * (1 + gate * (1 - sig)))
        return grad_gate, grad * silu


def _swiglu_output(ctx) -> torch.Tensor:
    gate, up = ctx.saved_tensors
    return F.silu(gate) * up


def _norm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    probe = torch.linspace(-4, 4, 17)
    return isinstance(act, torch.nn.Module) and torch.allclose(act(probe), F.silu(probe))


def apply_selective_recompute(model) -> int:
    """Swap in the recomputing forwards on every RMSNorm (a `variance_epsilon` and a `weight`) and every SiLU
    gated MLP (gate_proj, up_proj, down_proj, act_fn SiLU) of the model. Returns how many modules changed;
    other architectures (GPT-2's LayerNorm and GELU MLP) are left as they are."""
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            module.forward = types.MethodType(_norm_forward, module)
            changed += 1
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
                _is_silu(module.act_fn):
            module.forward = types.MethodType(_mlp_forward, module)
            changed += 1
    return changed

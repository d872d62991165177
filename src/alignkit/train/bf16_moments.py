"""AdamW with its two moments kept in bf16 (`adam_moments: bf16`): half the optimizer state's memory, as DeepSeek-V3
trains (arXiv 2412.19437, §3.3.3, "Low-Precision Optimizer States"). The update itself is torch's own fused
AdamW in fp32: each parameter is taken in chunks, its moments widened to fp32 for the chunk, updated with the
weights, and rounded back (to nearest). AdamW is elementwise, so chunking changes nothing, and only one chunk's
fp32 moments exist at a time. Under FSDP2 each rank updates its own shards (DTensor's local tensors) the same way."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam

CHUNK = 1 << 20  # elements per chunk (8 MB of fp32 moments); a multiple of any vector width, so bit-exact
MOMENTS = ("exp_avg", "exp_avg_sq")


class Bf16MomentsAdamW(torch.optim.AdamW):
    """torch.optim.AdamW's groups, options and checkpoints, with bf16 exp_avg / exp_avg_sq. Parameters stay in their
    own dtype (fp32 master weights); amsgrad is not offered."""

    def __init__(self, params, **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("Bf16MomentsAdamW has no amsgrad")
        super().__init__(params, **{k: v for k, v in kwargs.items() if k not in ("fused", "foreach")})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)  # fused CUDA: on the device
            for key in MOMENTS:
                state[key] = torch.zeros_like(param, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        tensors = [_local(t) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
        if not all(t.is_contiguous() for t in tensors):
            raise ValueError("Bf16MomentsAdamW needs contiguous parameters, gradients and moments")
        flat = [t.view(-1) for t in tensors]
        fused = param.device.type in ("cpu", "cuda")
        beta1, beta2 = group["betas"]
        for start in range(0, flat[0].numel(), CHUNK):
            weights, grad, exp_avg, exp_avg_sq = (t[start:start + CHUNK] for t in flat)
            wide = exp_avg.float(), exp_avg_sq.float()
            # the kernel counts the step itself: each chunk starts from the steps done so far
            adam([weights], [grad], [wide[0]], [wide[1]], [], [state["step"].clone()], fused=fused or None,
                 foreach=False, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
                 lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
            exp_avg.copy_(wide[0])
            exp_avg_sq.copy_(wide[1])
        state["step"] += 1

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts a loaded state to its parameter's dtype; the moments go back to bf16 (exactly: they were)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in MOMENTS:
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2) tensor's own shard, which in-place updates reach; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

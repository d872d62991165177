"""The moving reference: a frozen copy of the policy that follows it. One mechanism for three methods:

- TR-DPO (arXiv 2404.09656; TRL's SyncRefModelCallback): after every `every` optimizer steps the reference becomes
  alpha * policy + (1 - alpha) * reference (soft; mixed in parameter space), or a copy of the policy (hard). The
  reference log-probs the loop cached are then stale: the caller recomputes them.
- Online `ref_update_every`: at the start of every `every`-th round the reference becomes a copy of the policy,
  keeping the one it replaces (`last`) where APO's extrapolation or CREAM's judge compare consecutive rounds.
- APO between offline rounds (train/apo.py): the reference follows each round's trained policy, and the next
  policy is extrapolated from it and the previous one (`extrapolated`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model

from alignkit.errors import AlignkitError
from alignkit.models.inference import frozen_copy, whole

# In a checkpoint, in sub-folders: its top-level *.safetensors are all loaded as the policy.
REFERENCE_FILE, PREVIOUS_FILE = "reference/model.safetensors", "previous_reference/model.safetensors"


class MovingReference:
    """model: the starting policy, copied frozen (precision bf16: linear weights in bf16, models/inference.frozen_copy);
    every: updates (optimizer steps, rounds) between moves, 0: never; alpha: the policy's share in a move (1: a copy);
    keep_previous: also keep the reference a move replaces."""

    def __init__(self, model, every: int, alpha: float = 1.0, keep_previous: bool = False, precision: str = "fp32"):
        self.reference = frozen_copy(model, precision)
        self.previous = frozen_copy(model, precision) if keep_previous else None
        self.every, self.alpha, self.has_previous = every, alpha, False

    def due(self, count: int) -> bool:
        """Whether the reference moves after `count` updates (count >= 1)."""
        return bool(self.every) and count > 0 and count % self.every == 0

    def follow(self, count: int, policy) -> bool:
        """Move towards `policy` if due after `count` updates; whether it moved."""
        moved = self.due(count)
        if moved:
            self.update(policy)
        return moved

    @torch.no_grad()
    def update(self, policy) -> None:
        """theta_ref <- alpha * theta + (1 - alpha) * theta_ref for every parameter, the old reference kept first."""
        if self.previous is not None:
            _mix(self.previous, self.reference, 1.0)
            self.has_previous = True
        _mix(self.reference, policy, self.alpha)

    @property
    def last(self):
        """The reference the last move replaced, once there is one."""
        return self.previous if self.has_previous else None

    def extrapolated(self, alpha: float) -> dict[str, torch.Tensor]:
        """theta + alpha (theta - theta_last) of the reference over the one it replaced (APO's momentum)."""
        return extrapolated_weights(self.reference.state_dict(), self.previous.state_dict(), alpha)

    def checkpoint_models(self) -> dict:
        """What a checkpoint holds besides the policy: a reference that moves (a fixed one is rebuilt on resume)."""
        if not self.every:
            return {}
        return {REFERENCE_FILE: self.reference, **({PREVIOUS_FILE: self.previous} if self.previous is not None else {})}

    def restore(self, path: Path, has_previous: bool = False) -> None:
        """Load the references saved in checkpoint `path`."""
        for name, module in self.checkpoint_models().items():
            if not (path / name).exists():
                raise AlignkitError(f"{path / name} is missing: this checkpoint was not saved by a run whose reference "
                                    "moves; resume with the settings it was saved with, or use a new output_dir")
            load_model(module, str(path / name))
        self.has_previous = has_previous


@torch.no_grad()
def _mix(target, source, alpha: float) -> None:
    params = dict(target.named_parameters())
    for name, param in source.named_parameters():
        param = whole(param.detach())  # an FSDP2-sharded policy, gathered a parameter at a time
        if alpha >= 1.0:
            params[name].copy_(param)
        else:
            params[name].mul_(1 - alpha).add_(param.to(params[name].dtype), alpha=alpha)


def update_reference(reference, policy, alpha: float) -> None:
    """theta_ref <- alpha * theta + (1 - alpha) * theta_ref for every parameter; alpha = 1 copies the policy."""
    _mix(reference, policy, alpha)


def extrapolated_weights(current: dict[str, torch.Tensor], previous: dict[str, torch.Tensor],
                         alpha: float) -> dict[str, torch.Tensor]:
    """theta + alpha (theta - theta_prev) for every floating-point tensor; any other entry (integer buffers) as
    in `current`."""
    out = {}
    for name, value in current.items():
        if value.is_floating_point():
            out[name] = value + alpha * (value - previous[name].to(value.dtype))
        else:
            out[name] = value.clone()
    return out


def offline_reference(model, cfg, live: bool) -> MovingReference | None:
    """The offline loop's reference model, only where a method needs one: TR-DPO's (cfg.ref_update) or a live one
    (live: SparsePO's per-token distributions). A plain copy in the model's own precision."""
    if cfg.ref_update is None and not live:
        return None
    if cfg.ref_update is None:
        return MovingReference(model, every=0)
    alpha = 1.0 if cfg.ref_update.mode == "hard" else cfg.ref_update.alpha
    return MovingReference(model, cfg.ref_update.every, alpha)

"""A live reference model: a frozen copy of the starting policy, made only when a method needs one — SparsePO's
per-token reference distributions and activations, or TR-DPO's reference updates (`ref_update`).

TR-DPO (arXiv 2404.09656; TRL's SyncRefModelCallback): after every `every` optimizer steps the reference weights
become alpha * policy + (1 - alpha) * reference (soft; mixed in parameter space), or a copy of the policy (hard).
The reference log-probs the loop cached for the run are then stale: the caller recomputes them."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import load_model

from alignkit.errors import AlignkitError
from alignkit.losses.registry import uses_ref_model

# In a checkpoint, beside (not among) the policy's *.safetensors, which are all loaded as the policy.
REFERENCE_FILE = "reference/model.safetensors"


def reference_model(model, spec, opts, cfg):
    """A frozen copy of `model` (eval mode, no gradients) where the method needs one; None otherwise."""
    if cfg.ref_update is None and not uses_ref_model(spec, opts):
        return None
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def update_reference(reference, policy, alpha: float) -> None:
    """theta_ref <- alpha * theta + (1 - alpha) * theta_ref for every parameter; alpha = 1 copies the policy."""
    ref_params = dict(reference.named_parameters())
    for name, param in policy.named_parameters():
        target = ref_params[name]
        if alpha >= 1.0:
            target.copy_(param.detach())
        else:
            target.mul_(1 - alpha).add_(param.detach().to(target.dtype), alpha=alpha)


def reference_due(cfg, step: int) -> bool:
    """Whether the reference is updated after optimizer step `step` (1-based)."""
    return cfg.ref_update is not None and step % cfg.ref_update.every == 0


def update_alpha(cfg) -> float:
    return 1.0 if cfg.ref_update.mode == "hard" else cfg.ref_update.alpha


def checkpoint_models(reference, cfg) -> dict:
    """What a checkpoint must hold besides the policy: the moving reference of TR-DPO (a frozen one is rebuilt
    from the starting model)."""
    return {REFERENCE_FILE: reference} if cfg.ref_update is not None and reference is not None else {}


def restore_reference(reference, resumed, cfg) -> bool:
    """Load the moving reference saved with `resumed`; True when it was (the reference values must be rescored)."""
    if resumed is None or not checkpoint_models(reference, cfg):
        return False
    path = resumed.path / REFERENCE_FILE
    if not path.exists():
        raise AlignkitError(f"{path} is missing: this checkpoint was not saved by a ref_update run; resume with the "
                            "settings it was saved with, or use a new output_dir")
    load_model(reference, path)
    return True

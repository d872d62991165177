"""Reward shaping on a response's token count."""

from __future__ import annotations

import torch


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476 eq. 13), added to the reward: 0 up to max_length - cache
    tokens, then ((max_length - cache) - |y|) / cache * factor, reaching -factor at max_length; -factor beyond
    (TRL's get_soft_overlong_punishment; verl's DAPO reward manager)."""
    if not 0 < cache <= max_length:
        raise ValueError(f"overlong cache must be in [1, max_length {max_length}], got {cache}")
    lengths = lengths.to(torch.float32)
    free = max_length - cache
    ramp = (free - lengths) / cache
    return torch.where(lengths <= free, torch.zeros_like(ramp), torch.where(lengths <= max_length, ramp,
                                                                             -torch.ones_like(ramp))) * factor

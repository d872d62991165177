"""Numerical guards: a step whose loss or gradient norm is NaN or infinite never updates the weights.

on_nonfinite: abort stops the run with a message; skip drops the step (gradients zeroed, no optimizer
update; the schedule still advances) and aborts once more than max_skipped_steps steps were dropped."""

from __future__ import annotations

import logging
import math

from alignkit.config import OptimConfig
from alignkit.errors import AlignkitError

log = logging.getLogger("alignkit.train")


def nonfinite_reason(step_loss: float, grad_norm: float) -> str | None:
    """What is not finite in a step ('loss is nan', 'gradient norm is inf'), or None if all is well."""
    if not math.isfinite(step_loss):
        return f"loss is {step_loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    return None


def skip_or_abort(reason: str, step: int, skipped: int, cfg: OptimConfig) -> int:
    """Raise AlignkitError (on_nonfinite: abort, or too many skips); else log the skip and return the new count."""
    if cfg.on_nonfinite == "abort":
        raise AlignkitError(f"step {step}: {reason}; lower learning_rate or check the data "
                            "(or set on_nonfinite: skip to drop such steps)")
    skipped += 1
    if skipped > cfg.max_skipped_steps:
        raise AlignkitError(f"step {step}: {reason}; {skipped} steps skipped for non-finite values, more than "
                            f"max_skipped_steps ({cfg.max_skipped_steps}); lower learning_rate or check the data")
    log.warning("step %d: %s; step skipped, weights unchanged (%d skipped so far, at most %d)", step, reason,
                skipped, cfg.max_skipped_steps)
    return skipped

"""Losses: pure functions of log-probabilities, one file per family, and the registry naming them."""

from alignkit.losses.base import LossInputs
from alignkit.losses.registry import LOSSES, LossSpec, build_options, get_loss

__all__ = ["LOSSES", "LossInputs", "LossSpec", "build_options", "get_loss"]

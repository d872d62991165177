"""Losses: pure functions of log-probabilities, one file per family, and the registry naming them.

Importing the registry imports every family module (pairwise, reference_free, unpaired, listwise, tokenlevel,
negatives), so every method is registered once `alignkit.losses` is imported.
"""

from alignkit.losses.base import LossInputs, RunningMean, sft_nll
from alignkit.losses.registry import LOSSES, LossSpec, build_options, get_loss

__all__ = ["LOSSES", "LossInputs", "LossSpec", "RunningMean", "build_options", "get_loss", "sft_nll"]

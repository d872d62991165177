"""Losses: pure functions of log-probabilities, one file per family, and the registry naming them.

Importing the registry imports every family module, so every method is registered once `alignkit.losses` is
imported; losses/options.py builds and checks each loss's options.
"""

from alignkit.losses.base import LossInputs, RunningMean, sft_nll
from alignkit.losses.options import options_of
from alignkit.losses.registry import LOSSES, LossSpec, build_options, get_loss, loss_option_names

__all__ = ["LOSSES", "LossInputs", "LossSpec", "RunningMean", "build_options", "get_loss", "loss_option_names",
           "options_of", "sft_nll"]

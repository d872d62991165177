"""Test-wide settings. Hypothesis runs derandomized, so CI sees the same examples every run (a failure found
once is found again); run with HYPOTHESIS_PROFILE=explore to search new random examples locally."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

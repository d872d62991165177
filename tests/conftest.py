"""Test-wide settings and shared fixtures. Hypothesis runs derandomized, so CI sees the same examples every run (a
failure found once is found again); run with HYPOTHESIS_PROFILE=explore to search new random examples locally."""

import os

import pytest
from hypothesis import settings

from synthetic_task import single_thread, trained_task

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models of the synthetic task on one torch thread: a second only adds synchronisation."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def task(one_thread):
    """A tiny Llama briefly SFT'd on the synthetic review task (tests/synthetic_task.py), saved to task.model_dir."""
    return trained_task()


def import_trl(module: str):
    """A TRL module for a TRL-equality test. Skipped only where TRL cannot be expected: outside CI and without the
    dev extra (import-linter marks it); in CI (CI=true) or with the dev extra, a missing TRL fails the test, so the
    README's "tested against TRL" cannot rest on silent skips."""
    import importlib
    import importlib.util

    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("CI") == "true" or importlib.util.find_spec("importlinter") is not None:
            raise AssertionError(f"{module} is needed by this TRL-equality test (dev extra: trl==1.16.0): {err}") from None
        pytest.skip(f"TRL is not installed ({module})")

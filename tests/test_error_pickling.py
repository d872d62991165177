"""alignkit's named errors cross process boundaries as themselves: a ConfigError raised in a Ray learner actor, a
DataError in a worker, an EnvError in a Ray rollout worker are pickled to reach the caller (Ray and multiprocessing
both pickle exceptions), and an exception whose __init__ takes more than the message does not unpickle by default
(Ray then raises UnserializableException, and the CLI loses the name it prints without a traceback)."""

from __future__ import annotations

import importlib
import importlib.util
import pickle

import pytest

from alignkit.envs.base import EnvError
from alignkit.errors import AlignkitError, ConfigError, DataError

ERRORS = [
    ConfigError("ray.rollout_workers", "the cluster has no room for 2 bundles"),
    DataError("train.jsonl", 3, "prompt", "empty"),
    DataError("train.jsonl", None, None, "no records", hint=""),
    DataError("train.jsonl", 7, "chosen", "not a string", hint="fix it"),
    EnvError("Calculator", 2, "step returned a list", "return a Step"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("module", ["pickle", "cloudpickle"])  # cloudpickle: Ray's (installed with the ray extra)
def test_a_named_error_survives_pickling(error, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    back = pickle.loads(importlib.import_module(module).dumps(error))
    assert type(back) is type(error) and isinstance(back, AlignkitError)
    assert str(back) == str(error) and vars(back) == vars(error)

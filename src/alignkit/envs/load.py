"""From what a user gives (`environment:` in a config, or objects in Python) to one fresh environment per rollout:
- `module:attr`: a class or function making a native environment (envs/base.py's protocol) or a TRL
  environment_factory instance, a list of plain tool functions (TRL's `tools=[fn]`), or a dict of either by name;
- `skyrl:<id>`: a skyrl-gym environment;
- a dict {name: any of these}: each row picks its environment by its `environment` column, as TRL does."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from alignkit.envs.adapters import SkyRLEnvironment, ToolsEnvironment, TRLEnvironment
from alignkit.envs.base import DEFAULT_LIMITS, EnvError, Environment, Limits, with_row
from alignkit.errors import ConfigError

ROUTE_FIELD = "environment"


class EnvironmentFactory:
    """make(row, index) -> a fresh environment for one rollout of that row (index: the 1-based row, for errors)."""

    def __init__(self, name: str, make: Callable[[dict], object]):
        self.name, self._make = name, make

    def make(self, row: dict, index: int | None = None):
        try:
            return self._make(row)
        except EnvError as err:
            raise with_row(err, index) from err.__cause__
        except Exception as err:  # a constructor's own failure
            raise EnvError(self.name, index, f"constructing it raised {err!r}",
                           "fix the environment's constructor (it is called with no arguments)") from err

    def __repr__(self) -> str:
        return f"EnvironmentFactory({self.name})"


class RoutedFactory(EnvironmentFactory):
    """Several environments by name; each row names its own in its `environment` column."""

    def __init__(self, factories: dict[str, EnvironmentFactory]):  # noqa: D107 - no make function of its own
        self.name, self.factories = "{" + ", ".join(factories) + "}", factories

    def make(self, row: dict, index: int | None = None):
        name = row.get(ROUTE_FIELD)
        if name not in self.factories:
            what = "has no 'environment' field" if name is None else f"is routed to environment {name!r}"
            raise EnvError(self.name, index, f"the row {what}, which is not among the environments",
                           f"set the row's 'environment' to one of {', '.join(map(repr, self.factories))}")
        return self.factories[name].make(row, index)


def load_environment(spec, limits: Limits = DEFAULT_LIMITS) -> EnvironmentFactory:
    """The factory for an `environment:` value: a string (module:attr or skyrl:<id>), a dict by name (rows route by
    their `environment` column), a list of tool functions, or a class/function making one environment."""
    if isinstance(spec, EnvironmentFactory):
        return spec
    if isinstance(spec, str):
        return _from_string(spec, limits)
    if isinstance(spec, dict):
        if not spec:
            raise ConfigError("environment", "an empty mapping of environments")
        return RoutedFactory({str(name): load_environment(value, limits) for name, value in spec.items()})
    if isinstance(spec, list | tuple):
        functions = list(spec)
        ToolsEnvironment(functions, limits)  # schemas checked once, up front
        return EnvironmentFactory("tools", lambda row: ToolsEnvironment(functions, limits))
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        factory = EnvironmentFactory(name, lambda row: _wrap(spec(), limits, name))
        factory.make({})  # one probe instance, as TRL makes: its tools are described (or fail) before any rollout
        return factory
    raise ConfigError("environment", f"{spec!r} is not an environment: give module:attr, skyrl:<id>, a mapping of "
                                     f"those by name, a list of tool functions, or a class")


def _wrap(instance, limits: Limits, name: str):
    """A native environment as it is; anything else is read as a TRL environment_factory instance."""
    if isinstance(instance, Environment) and callable(getattr(instance, "step", None)):
        return instance
    return TRLEnvironment(instance, limits, name)


def _from_string(spec: str, limits: Limits) -> EnvironmentFactory:
    if spec.startswith("skyrl:"):
        env_id = spec.removeprefix("skyrl:")
        SkyRLEnvironment(env_id)  # an unknown id fails here, before any rollout
        return EnvironmentFactory(spec, lambda row: SkyRLEnvironment(env_id))
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError("environment", f"{spec!r}: expected module:attr (e.g. my_envs:Wordle) or skyrl:<id> "
                                         f"(e.g. skyrl:gsm8k_multi_turn)")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError("environment", f"cannot load {spec!r}: {err}; check the module is importable (on "
                                         f"PYTHONPATH) and defines {attr}") from None
    return load_environment(target, limits)

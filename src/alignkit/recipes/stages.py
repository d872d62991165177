"""What the main jobs share: their stages, announced as they start and timed (the summary's `timings_s`), and
the defaults of the command configs they nest."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from alignkit.errors import ConfigError
from alignkit.losses import loss_option_names
from alignkit.online.config import loss_name_of
from alignkit.train.memory import trim_freed_memory


class Stages:
    def __init__(self, console):
        self.console, self.seconds = console, {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        self.console.print(f"[bold]{name}[/] ...")
        value = fn()
        trim_freed_memory()  # what the stage freed (a sampling batch's KV cache) leaves the next stage's peak
        self.seconds[name] = time.perf_counter() - start
        return value


def with_recipe_defaults(values: Any, defaults: dict[str, Any], section: str, set_by_recipe: tuple[str, ...]) -> Any:
    """A recipe's nested command config (align's train:, rl's online:): the keys given laid over the recipe's
    defaults. Nested sections given are taken whole, as anywhere else, but loss_options are merged key by key (the
    recipe's own options, e.g. rl's engine_correction, stay unless named); keys the recipe sets itself are refused."""
    if not isinstance(values, dict):
        return values
    for key in set_by_recipe:
        if key in values:
            raise ConfigError(f"{section}.{key}", f"set by the recipe: give the recipe's own `{key}`")
    out = {**defaults, **values}
    if isinstance(values.get("loss_options"), dict):
        out["loss_options"] = {**defaults.get("loss_options", {}), **values["loss_options"]}
    return out


def online_option_names(defaults: dict[str, Any]) -> Callable[[dict], set[str]]:
    """For a recipe nesting `online:` with these defaults: the options of its method's loss (--kl_coef,
    --engine_ratio_max), which may be given at the top level."""
    def names(values: dict) -> set[str]:
        online = {**defaults, **(values.get("online") if isinstance(values.get("online"), dict) else {})}
        method = values.get("method", online["method"])
        return loss_option_names(loss_name_of(method, online.get("loss"), online.get("consistency", "none")))

    return names


def percent_ci(ci) -> str:
    """(mean, low, high) as a share: 12.0% [7.3%, 16.7%]."""
    return f"{ci[0]:.1%} [{ci[1]:.1%}, {ci[2]:.1%}]"


def points_ci(ci) -> str:
    """(mean, low, high) of a change in shares, in percentage points: +8.3 pts [+2.1, +14.6]."""
    return f"{100 * ci[0]:+.1f} pts [{100 * ci[1]:+.1f}, {100 * ci[2]:+.1f}]"

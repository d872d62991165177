"""One table names every method: its loss function, its options dataclass and the data shape it needs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignkit.errors import ConfigError
from alignkit.losses.dpo import DPOOptions, dpo_loss

# Data shapes: "pairs" (prompt, chosen, rejected), "unpaired" (prompt, completion, label),
# "lists" (prompt, responses[k], scores[k]), "sft" (prompt, completion).
DATA_SHAPES = ("pairs", "unpaired", "lists", "sft")


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable
    options: type
    data_shape: str
    needs_reference: bool
    paper: str
    needs_token_logps: bool = False


LOSSES: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> None:
    assert spec.data_shape in DATA_SHAPES, spec.data_shape
    LOSSES[spec.name] = spec


register(LossSpec("dpo", dpo_loss, DPOOptions, "pairs", True, "arXiv 2305.18290"))


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError("loss", f"unknown loss '{name}'; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def build_options(spec: LossSpec, values: dict[str, Any]) -> Any:
    """Options dataclass from a dict, with checks every loss shares (known keys, finite numbers, beta > 0)."""
    fields = {f.name: f for f in dataclasses.fields(spec.options)}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ConfigError(f"loss_options.{key}", f"unknown option for loss '{spec.name}'; known: {known}")
        default = fields[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"loss_options.{key}", f"must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"loss_options.{key}", f"must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"loss_options.{key}", f"must be a finite number, got {value}")
    opts = spec.options(**values)
    if getattr(opts, "beta", 1.0) <= 0:
        raise ConfigError("loss_options.beta", f"must be > 0, got {opts.beta}")
    eps = getattr(opts, "label_smoothing", 0.0)
    if not 0 <= eps < 0.5:
        raise ConfigError("loss_options.label_smoothing", f"must be in [0, 0.5), got {eps}")
    return opts

"""Loss options: one strict pydantic model per loss, built once from the config's `loss_options` by build_options.

A bad value is a ConfigError naming `loss_options.<key>`, worded like the rest of the config's errors."""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from alignkit.errors import ConfigError

log = logging.getLogger("alignkit.config")


class LossOptions(BaseModel):
    """Every loss's options. Strict: a bool is not a number, a number not text; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # Option names of earlier versions -> their names now (accepted, with one log line naming the new key).
    renamed: ClassVar[dict[str, str]] = {}

    def __init__(self, **values: Any) -> None:  # built from a config or in code: the same ConfigError either way
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise _option_error(err) from None

    def needs(self) -> set[str]:
        """What the loop must compute beyond log-probs (losses.base.needs); most losses need nothing more."""
        return set()

    @classmethod
    def refuse_ambiguous(cls, values: dict[str, Any]) -> None:
        """A hook for options whose old and new names collide (PPO's kl_coef): raise ConfigError to refuse."""


def _smoothing(value: float) -> float:
    if not 0 <= value < 0.5:
        raise ValueError(f"must be in [0, 0.5), got {value}")
    return value


# The KL weight of the preference losses; label smoothing, the probability that a preference label is flipped.
Beta = Annotated[float, Field(gt=0)]
LabelSmoothing = Annotated[float, AfterValidator(_smoothing)]


def option_names(options: type[BaseModel]) -> set[str]:
    """The keys an options model takes, old names included (so they route to loss_options from the top level)."""
    return set(options.model_fields) | set(getattr(options, "renamed", {}))


def build_options(spec, values: dict[str, Any]) -> Any:
    """The options model of `spec` (a LossSpec) from a config's loss_options dict: the one place they are built."""
    options = spec.options
    values = dict(values)
    refuse = getattr(options, "refuse_ambiguous", None)
    if refuse is not None:
        refuse(values)
    for old, new in getattr(options, "renamed", {}).items():
        if old in values:
            log.info("loss_options.%s is now loss_options.%s (the old name still works)", old, new)
            if new in values:
                raise ConfigError(f"loss_options.{old}", f"renamed to {new}, which is also given; keep one")
            values[new] = values.pop(old)
    known = list(getattr(options, "model_fields", {}))
    for key in values:
        if key not in known:
            raise ConfigError(f"loss_options.{key}", f"unknown option for loss '{spec.name}'; known: "
                                                     f"{', '.join(known) or 'none'}")
    return options(**values)


_TYPE_WORDS = {"string_type": "must be text", "bool_type": "must be true or false", "float_type": "must be a number",
               "int_type": "must be a whole number", "finite_number": "must be a finite number",
               "tuple_type": "must be a list of numbers"}
_BOUND_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _option_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    key = "loss_options." + ".".join(str(p) for p in first["loc"][:1]) if first["loc"] else "loss_options"
    kind, value, ctx = first["type"], first.get("input"), first.get("ctx") or {}
    if kind == "literal_error":
        if not isinstance(value, str):
            return ConfigError(key, f"must be text, got {value!r}")
        choices = ", ".join(c.strip("'") for c in ctx["expected"].replace(" or ", ", ").split(", "))
        return ConfigError(key, f"must be one of {choices}, got {value!r}")
    if kind in _TYPE_WORDS:
        return ConfigError(key, f"{_TYPE_WORDS[kind]}, got {value!r}")
    if kind in _BOUND_WORDS:
        bound = next(iter(ctx.values()))
        return ConfigError(key, f"must be {_BOUND_WORDS[kind]} {bound}, got {value!r}")
    return ConfigError(key, str(first["msg"]).removeprefix("Value error, "))


def options_of(spec, cfg) -> Any:
    """The options of a loaded config: those built when it was loaded (api.build_config), else built now."""
    built = getattr(cfg, "_loss_options", None)
    return built if isinstance(built, spec.options) else build_options(spec, cfg.loss_options)

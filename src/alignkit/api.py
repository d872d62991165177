"""The Python API: the same thing the CLI does, from a dict, a YAML file or keyword overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.config import TrainConfig, load_command_config, load_config_file
from alignkit.errors import ConfigError
from alignkit.losses import build_options, get_loss, loss_option_names


def build_config(method: str | None = None, config: str | Path | dict | None = None,
                 overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The one loader (config.load_command_config): config file (or dict) < overrides. `method` sets `loss`; a key
    naming one of the loss's options (e.g. beta) goes to loss_options, so `--beta 0.2` works as well as
    `--loss_options.beta 0.2`. The options are built here, once, at load (losses.options_of gives them to the loop)."""
    overrides = dict(overrides or {})
    raw = load_config_file(config) if isinstance(config, (str, Path)) else dict(config or {})
    if method is not None and not (method == "dpo" and "loss_type" in raw):  # TRL's DPO loss_type picks the loss
        overrides["loss"] = method
    cfg = load_command_config(TrainConfig, raw, overrides, lambda values: loss_option_names(values.get("loss", "dpo")))
    if get_loss(cfg.loss).data_shape == "rollouts":  # GRPO, RLOO, PPO train on the policy's own samples
        raise ConfigError("loss", f"'{cfg.loss}' is an online method: run `alignkit online --method {cfg.loss}`")
    cfg._loss_options = build_options(get_loss(cfg.loss), cfg.loss_options)
    if cfg.augment and "recovery" in cfg.augment:  # named before any model is loaded
        from alignkit.train.offline_data import check_recovery

        check_recovery(cfg, get_loss(cfg.loss).data_shape)
    return cfg


def train(method: str | None = None, config: str | Path | dict | None = None, **overrides):
    """alignkit.api.train("dpo", "cfg.yaml", beta=0.2) -> TrainResult."""
    from alignkit.train.loop import train as run

    return run(build_config(method, config, overrides))

"""Training configuration: plain values, validated at load with messages that name the key."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alignkit.errors import ConfigError


class LoraOptions(BaseModel):
    """LoRA adapters (peft) on the policy; the reference is the same model with the adapters disabled."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0.0, description="scale alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", min_length=1, description="module names to adapt, or all-linear (every linear but the head)")
    save: Literal["merged", "adapter"] = Field(
        "merged", description="final save: the merged model (an ordinary HF dir) or the adapter only")


class RefUpdateOptions(BaseModel):
    """TR-DPO (arXiv 2404.09656): the reference follows the policy during training."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    mode: Literal["soft", "hard"] = Field(
        "soft", description="soft: ref <- alpha * policy + (1 - alpha) * ref; hard: ref <- policy (alpha unused)")
    every: int = Field(512, gt=0, description="tau: optimizer steps between updates")
    alpha: float = Field(0.6, gt=0.0, le=1.0, description="weight of the policy in a soft update")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    # What to train and on what.
    model: str = Field(description="model alias (smollm2-135m-instruct), HF hub id or local directory")
    train_data: str | None = Field(None, description="JSONL / Parquet file of training records")
    eval_data: str | None = Field(None, description="held-out records; if absent, eval_fraction of train_data")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    output_dir: str = "runs/alignkit"
    loss: str = "dpo"
    loss_options: dict[str, Any] = Field(default_factory=dict, description="options of the loss, e.g. beta")
    sft_weight: float = Field(0.0, ge=0.0, description="weight of an NLL term on the first response (RPO-style)")
    # Data.
    on_bad_record: Literal["error", "skip"] = "error"
    max_length: int = Field(1024, gt=1, description="max tokens of prompt + one response")
    max_prompt_length: int | None = Field(None, gt=0, description="prompts keep their last this-many tokens")
    max_tokens_per_batch: int = Field(4096, gt=0, description="token budget of one micro-batch")
    max_tokens_per_row: int | None = Field(
        None, gt=0, description="packed row length (examples per row up to this); default: one row per micro-batch "
                                "(packed_sdpa, flex_attention), the micro-batch's longest example (sdpa, eager)")
    sft_include_prompt: bool = Field(False, description="SFT: train on prompt (and non-assistant) tokens too")
    # Optimisation.
    learning_rate: float = Field(5e-6, gt=0.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    grad_accum: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    chunk_size: int = Field(1024, gt=0, description="tokens per chunk of the vocabulary projection")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    attention: Literal["packed_sdpa", "sdpa", "eager", "flex_attention"] = Field(
        "packed_sdpa", description="attention over packed rows: packed_sdpa runs SDPA per example span (no cost for "
                                   "long rows); sdpa/eager use a dense block mask per row; flex_attention a "
                                   "block-sparse mask (GPU; compiled on first use)")
    lora: LoraOptions | None = Field(None, description="train LoRA adapters: {r, alpha, dropout, target_modules, save}")
    # Several processes (torchrun): how the model is spread; one process ignores it.
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: a replica per rank; fsdp: FSDP2 sharding")
    # Non-finite loss or gradients.
    on_nonfinite: Literal["abort", "skip"] = Field("abort", description="abort, or skip the step (no update)")
    max_skipped_steps: int = Field(10, ge=0, description="with on_nonfinite: skip, abort once more steps are skipped")
    neftune_alpha: float = Field(0.0, ge=0.0, description="NEFTune embedding noise while training (0: off; paper: 5)")
    # Reference model.
    ref_cache: bool = Field(True, description="cache reference log-probs on disk, keyed by model+data+settings")
    ref_update: RefUpdateOptions | None = Field(
        None, description="TR-DPO: update the reference every `every` steps, {mode: soft|hard, every, alpha}")
    # Bookkeeping.
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations (0: only at the end)")
    save_every: int = Field(0, ge=0, description="optimizer steps between checkpoints (0: only at the end)")
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    progress: bool = True

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, value):
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1)")
        return value


def _first_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    # Unions add the member's type to the location ("lora.target_modules.list[str]"); keys never hold "[".
    key = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and "[" in p)) or "<config>"
    if first["type"] == "extra_forbidden":
        return ConfigError(key, "unknown key (check the spelling; `alignkit <command> --help` lists the keys)")
    return ConfigError(key, f"{first['msg']} (got {first.get('input')!r})")


def _check_finite(values: dict[str, Any], prefix: str = "") -> None:
    for key, value in values.items():
        if not isinstance(key, str):  # YAML allows `1: x` or `null: x`; a key is a name
            raise ConfigError(prefix + repr(key), f"a key must be text, got {type(key).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(prefix + key, f"must be a finite number, got {value}")
        if isinstance(value, dict):
            _check_finite(value, prefix + key + ".")


def make_config(values: dict[str, Any], cls: type[BaseModel] = TrainConfig) -> BaseModel:
    try:
        _check_finite(values)
        return cls(**values)
    except ValidationError as err:
        raise _first_error(err) from None
    except RecursionError:  # a YAML alias that contains itself (`a: &a [*a]`)
        raise ConfigError("<config>", "a value refers to itself (YAML anchor inside its own alias)") from None


class _YAMLLoader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads 1e-4, with no dot, as a string; read it as the float everyone means."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_override(raw: str) -> Any:
    """A --key value from the command line, read as YAML (so 0.1 is a float, true a bool, [1, 2] a list)."""
    try:
        return yaml.load(raw, Loader=_YAMLLoader)
    except yaml.YAMLError:
        return raw


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.replace("-", "_").split(".")
    target = values
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ConfigError(dotted, "cannot set a sub-key of a non-mapping value")
    target[keys[-1]] = value


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("--config", f"cannot read {path}: {err}") from None
    try:
        values = yaml.load(text, Loader=_YAMLLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError("--config", f"{path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of keys to values")
    return values

"""Training configuration: plain values, validated at load with messages that name the key."""

from __future__ import annotations

import logging
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from alignkit import trl_keys
from alignkit.errors import ConfigError


class Strict(BaseModel):
    """Every config section: unknown keys and non-finite numbers are errors naming the key."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


class LoraOptions(Strict):
    """LoRA adapters (peft) on the policy; the reference is the same model with the adapters disabled."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0.0, description="scale alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", min_length=1, description="module names to adapt, or all-linear (every linear but the head)")
    save: Literal["merged", "adapter"] = Field(
        "merged", description="final save: the merged model (an ordinary HF dir) or the adapter only")


class RefUpdateOptions(Strict):
    """TR-DPO (arXiv 2404.09656): the reference follows the policy during training."""

    mode: Literal["soft", "hard"] = Field(
        "soft", description="soft: ref <- alpha * policy + (1 - alpha) * ref; hard: ref <- policy (alpha unused)")
    every: int = Field(512, gt=0, description="tau: optimizer steps between updates")
    alpha: float = Field(0.6, gt=0.0, le=1.0, description="weight of the policy in a soft update")


class DataSource(Strict):
    """Where records come from, beyond a plain path: a hub dataset (with its config and split), a save_to_disk
    folder or a folder / glob of files, optionally subsampled."""

    path: str = Field(description="a file, a folder (save_to_disk, or of .jsonl/.json/.parquet files), a glob, "
                                  "or a hub dataset id")
    name: str | None = Field(None, description="the hub dataset's config name")
    split: str | None = Field(None, description="the split (hub or save_to_disk DatasetDict), e.g. train_prefs")
    num_samples: int | None = Field(None, gt=0, description="keep this many records (the first, or a seeded sample)")
    shuffle_seed: int | None = Field(None, description="with num_samples: a seeded random sample, not the first")


class SamplingOptions(Strict):
    """The `sampling:` section of every command that samples (online, align, generate, decode, synth, eval). Its
    keys may also be given at the top level (`--temperature 0.7` = `--sampling.temperature 0.7`)."""

    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: off")
    batch_size: int = Field(16, gt=0, description="prompts per generate call (each with all its samples)")
    stop: list[str] | str = Field(default_factory=list, description="stop strings (a string or a list)")
    engine: Literal["auto", "hf", "fast", "vllm"] = Field(
        "auto", description="rollout engine: fast (lean decode loop, Llama-family), hf (HF generate) or vllm "
                            "(colocated, GPU); auto: fast where it runs (Llama-family on the CPU, LoRA adapters "
                            "merged in), else hf")
    engine_precision: Literal["fp32", "bf16"] = Field("fp32", description="the fast engine's weights")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class OptimConfig(Strict):
    """The keys of the shared optimizer step (train/step.py): every training command has them, offline and online."""

    output_dir: str = "runs/alignkit"
    learning_rate: float = Field(5e-6, gt=0.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="warmup over this share of the optimizer steps "
                                "(TRL's warmup_ratio); the larger of the two wins")
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_moments: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of AdamW's two moments: bf16 halves the optimizer state (DeepSeek-V3's low-precision "
                            "optimizer states), the update still computed in fp32")
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    max_tokens_per_batch: int = Field(4096, gt=0, description="token budget of one micro-batch")
    max_tokens_per_row: int | None = Field(
        None, gt=0, description="packed row length (examples per row up to this); default offline: one row per "
                                "micro-batch (packed_sdpa, flex_attention), the micro-batch's longest example (sdpa, "
                                "eager); online: the micro-batch's longest example")
    chunk_size: int = Field(1024, gt=0, description="tokens per chunk of the vocabulary projection")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    selective_recompute: bool = Field(False, description="keep matmul outputs, recompute RMSNorm and SwiGLU in "
                                                         "backward (between all activations and checkpointing)")
    release_memory: bool | None = Field(
        None, description="hand freed activations back to the OS at once (glibc: a fixed mmap threshold): a lower "
                          "peak RSS, paid in page faults (measured in docs/long_context.md); default: on with "
                          "gradient_checkpointing or max_memory_gb, off otherwise (glibc's default, which can keep GBs "
                          "of freed activations in its heap)")
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
    # Bookkeeping.
    save_every: int = Field(0, ge=0, description="steps (online: rounds) between checkpoints (0: only at the end)")
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    progress: bool = True
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="metric backends (jsonl is always written: resume reads it); wandb / mlflow are optional extras, "
                    "offline-friendly (WANDB_MODE=offline; mlflow's file store under output_dir unless "
                    "MLFLOW_TRACKING_URI is set)")
    run_name: str | None = Field(None, description="the run's name in wandb / mlflow (default: output_dir's name)")

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, value):
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1)")
        return value


class SelectiveFilter(Strict):
    """Selective DPO (arXiv 2502.09650): a pair's score is its loss under a model trained on the other folds."""

    drop: float = Field(0.2, ge=0.0, lt=1.0, description="share of pairs dropped, the highest scores (hardest) first")
    folds: int = Field(2, ge=2, description="the pairs are split into this many folds, one training run each")
    seed: int | None = Field(None, description="the seeded fold assignment (default: the run's seed)")
    epochs: int | None = Field(None, gt=0, description="each fold run's epochs (default: the run's epochs/max_steps)")


class PairFilters(Strict):
    """`filter:` pair filters of the data stage (train/pair_filter.py, train/selective.py), before steps are planned."""

    ches: dict[Literal["drop"], Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        None, description="{drop: 0.1}: the highest-CHES share dropped (arXiv 2410.08847)")
    selective: SelectiveFilter | None = Field(None, description="{drop: 0.2, folds: 2, seed, epochs}: Selective DPO "
                                              "(arXiv 2502.09650), the pairs hardest for fold-trained models dropped")


class TrainConfig(OptimConfig):
    # What to train and on what.
    model: str = Field(description="model alias (smollm2-135m-instruct), HF hub id or local directory")
    train_data: str | DataSource | None = Field(None, description="training records: a .jsonl/.json/.parquet file, a "
                                                "folder or glob of them, a save_to_disk folder, a hub id, or "
                                                "{path, name, split, num_samples, shuffle_seed}")
    eval_data: str | DataSource | None = Field(None, description="held-out records (the same kinds); if absent, "
                                               "eval_fraction of train_data")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    loss: str = "dpo"
    loss_options: dict[str, Any] = Field(default_factory=dict, description="options of the loss, e.g. beta")
    sft_weight: float = Field(0.0, ge=0.0, description="weight of an NLL term on the first response (RPO-style)")
    # Data.
    on_bad_record: Literal["error", "skip"] = "error"
    max_length: int = Field(1024, gt=1, description="max tokens of prompt + one response")
    max_prompt_length: int | None = Field(None, gt=0, description="prompts keep their last this-many tokens")
    sft_include_prompt: bool = Field(False, description="SFT: train on prompt (and non-assistant) tokens too")
    filter: PairFilters | None = Field(None, description="pair filters of the data stage: {ches: {drop: 0.1}}, "
                                                         "{selective: {drop: 0.2, folds: 2}}")
    augment: dict[Literal["recovery"], dict[str, Any]] | None = Field(
        None, description="SFT safety recovery examples (data/recovery.py): {recovery: {fraction: 0.5, "
                          "prefix_tokens: [1, 25], seed: 0}}")
    data_cache: bool = Field(True, description="cache tokenised examples on disk, keyed by files+tokenizer+settings")
    # Steps.
    grad_accum: int = Field(1, gt=0)
    max_memory_gb: float | None = Field(
        None, gt=0, description="split each micro-batch further so weights, gradients, optimizer state and the "
                                "activations kept for backward fit this budget (the step's examples and gradient "
                                "are unchanged)")
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    # Reference model.
    ref_cache: bool = Field(True, description="cache reference log-probs on disk, keyed by model+data+settings")
    ref_update: RefUpdateOptions | None = Field(
        None, description="TR-DPO: update the reference every `every` steps, {mode: soft|hard, every, alpha}")
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations (0: only at the end)")
    teacher: str | None = Field(None, description="distillation's teacher: an alias, directory or hub id")
    teacher_reference: str | None = Field(None, description="adpa: the teacher's reference (its SFT starting point)")
    teacher_tokenizer: Literal["shared", "own"] = Field("shared", description="own: its own tokenizer (loss uld)")
    teacher_cache: str | None = Field(None, description="a directory for the teacher's top-k (gkd, dckd)")
    _loss_options: Any = PrivateAttr(None)  # the loss's options model, built from loss_options (api.build_config)


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
    """values[a][b] = value for "a.b"; a mapping set over a mapping is merged into it (later keys win)."""
    keys = dotted.replace("-", "_").split(".")
    target = values
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ConfigError(dotted, "cannot set a sub-key of a non-mapping value")
    current = target.get(keys[-1])
    target[keys[-1]] = {**current, **value} if isinstance(current, dict) and isinstance(value, dict) else value


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


def _sections(cls: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The nested config sections of cls (fields whose type is a pydantic model, possibly Optional)."""
    out = {}
    for name, field in cls.model_fields.items():
        for candidate in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out[name] = candidate
    return out


# Keys of earlier versions, by command config: still accepted, read as their new name with one log line naming it
# (docs/glossary.md). Dotted keys of a section are renamed too (online.epochs in `alignkit rl`).
RENAMED: dict[str, dict[str, str]] = {
    "OnlineConfig": {"epochs": "num_iterations", "evaluate": "eval_before_after"},
    "DecodeConfig": {"n": "num_samples"},
    "SynthConfig": {"n": "num_prompts"},
    "AlignConfig": {"train_prompts": "num_train_prompts", "eval_prompts": "num_eval_prompts"},
    "RLConfig": {"train_prompts": "online.prompts"},
}
# Keys renamed long ago: named with their new place instead of "unknown key", and refused.
RETIRED = {"out": "output_dir", "generation_batch_size": "sampling.batch_size",
           "sample_batch_size": "sampling.batch_size"}
log = logging.getLogger("alignkit.config")


def _renamed(key: str, cls: type[BaseModel]) -> str:
    """key, or its new name if cls (or the section a dotted key names) renamed it, logged once per use."""
    head, _, rest = key.rpartition(".")
    section = _sections(cls).get(head) if head and "." not in head else (cls if not head else None)
    new = RENAMED.get(section.__name__, {}).get(rest) if section is not None else None
    if new is None:
        return key
    new = f"{head}.{new}" if head else new
    log.info("config key '%s' is now '%s' (the old name still works)", key, new)
    return new


def route_key(key: str, cls: type[BaseModel], option_names: set[str] = frozenset()) -> str:
    """Where a top-level key goes: a field of cls stays; one of the loss's options goes to loss_options; a key of
    exactly one nested section (sampling.temperature) goes there. Anything else stays (and is named as unknown)."""
    key = _renamed(key.replace("-", "_"), cls)
    if "." in key or key in cls.model_fields:
        return key
    if key in RETIRED:
        raise ConfigError(key, f"renamed: use {RETIRED[key]}")
    if key == "train_data" and "prompts" in cls.model_fields:  # named before a missing `prompts` is
        raise ConfigError(key, "online methods sample from prompts (--prompts p.jsonl, records with a prompt), not "
                               "from a training set")
    if key in option_names and "loss_options" in cls.model_fields:
        return f"loss_options.{key}"
    owners = [name for name, section in _sections(cls).items() if key in section.model_fields]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    holders = [name for name, section in _sections(cls).items() if "loss_options" in section.model_fields]
    if key in option_names and len(holders) == 1:  # a recipe's nested command config (rl's online:)
        return f"{holders[0]}.loss_options.{key}"
    return key


def load_command_config(cls: type[BaseModel], config: str | Path | dict | None = None,
                        overrides: dict[str, Any] | None = None,
                        option_names: typing.Callable[[dict], set[str]] | None = None) -> BaseModel:
    """The one loader of every command: a YAML file (or dict), then --key value overrides (dotted keys set nested
    sections), each key routed by route_key; option_names(raw values) names the loss options that may be given at
    the top level (so `--kl_coef 0.1` works for GRPO exactly as `--beta 0.1` for DPO)."""
    base = dict(load_config_file(config) if isinstance(config, (str, Path)) else (config or {}))
    overrides = {str(k).replace("-", "_"): v for k, v in (overrides or {}).items()}
    _check_finite(base)
    fields = set(cls.model_fields)
    names = option_names({**base, **overrides}) if option_names is not None else set()
    routable = fields | names | {k for section in _sections(cls).values() for k in section.model_fields}
    if trl_keys.is_trl_config({**base, **overrides}, routable):  # a TRL config, run as it is
        command = "online" if "prompts" in fields else "train"
        base, lines = trl_keys.translate(base, fields, command)
        overrides, more = trl_keys.translate(overrides, fields, command)
        logging.getLogger("alignkit.config").info("TRL keys mapped onto alignkit's (docs/from_trl.md):\n  %s",
                                                  "\n  ".join(lines + more))
        names = option_names({**base, **overrides}) if option_names is not None else set()  # TRL may set the loss
    values: dict[str, Any] = {}
    for source in (base, overrides):
        for key, value in source.items():
            dotted = route_key(key, cls, names) if isinstance(key, str) else key
            if isinstance(dotted, str) and isinstance(value, dict) and isinstance(values.get(dotted), dict):
                values[dotted] = {**values[dotted], **value}  # a section given twice: merged, later keys win
            elif isinstance(dotted, str):
                set_dotted(values, dotted, value)
            else:
                values[dotted] = value
    return make_config(values, cls)


def render_help(cls: type[BaseModel], usage: str, notes: list[str] = (),
                options: tuple[str, type[BaseModel]] | None = None) -> str:
    """`alignkit <command> --help`: the usage line, every key (nested sections as dotted keys) with its default
    and description, then notes; options: (title, model) of a method's options (a loss's), listed the same way."""
    shared = set(OptimConfig.model_fields) - set(vars(cls).get("__annotations__", {})) if issubclass(cls, OptimConfig) else set()
    lines = [usage]
    for title, names in (("keys:", [n for n in cls.model_fields if n not in shared]),
                         ("keys of the shared optimizer step (train/step.py):", [n for n in cls.model_fields if n in shared])):
        if not names:
            continue
        lines += ["", title]
        for name in names:
            field = cls.model_fields[name]
            lines.append(_help_line(name, field))
            section = _sections(cls).get(name)
            # a recipe's section shows the recipe's defaults (rl's online.learning_rate), not its class's
            instance = None if field.is_required() else field.get_default(call_default_factory=True)
            for sub_name, sub_field in (section.model_fields.items() if section else ()):
                lines.append(_help_line(f"{name}.{sub_name}", sub_field, instance))
    if options is not None:
        lines += ["", options[0], *(_help_line(n, f) for n, f in options[1].model_fields.items())]
    return "\n".join([*lines, *(["", *notes] if notes else [])])


def _help_line(name: str, field, section: BaseModel | None = None) -> str:
    if isinstance(section, BaseModel) or not field.is_required():
        value = getattr(section, name.rpartition(".")[2]) if isinstance(section, BaseModel) else \
            field.get_default(call_default_factory=True)
        default = type(value).__name__ if isinstance(value, BaseModel) else repr(value)
    else:
        default = "required"
    return f"  --{name:<26} {default:<16} {field.description or ''}".rstrip()

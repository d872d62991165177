"""TRL's config keys (its CLI YAMLs, TrainingArguments and script arguments) mapped onto alignkit's, so a TRL config
runs as it is: `alignkit dpo --config trl_dpo.yaml`. The mapping applied is printed once; a TRL key with no alignkit
meaning is named, with what to do instead, in one error. The table is docs/from_trl.md.

Batch sizes: TRL counts padded rows, alignkit a token budget. per_device_train_batch_size B becomes
max_tokens_per_batch = B x max_length (the most tokens B rows of TRL's can hold; default max_length 1024), and
gradient_accumulation_steps becomes grad_accum: an optimizer step covers at least the examples TRL's would."""

from __future__ import annotations

from typing import Any

from alignkit.errors import ConfigError

# TRL DPO loss_type -> alignkit loss; GRPO loss_type -> the grpo loss's aggregation (or the cispo method).
DPO_LOSS_TYPES = {"sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge", "robust": "robust_dpo", "bco_pair": "bco_pair",
                  "nca_pair": "nca_pair", "exo_pair": "exo_pair", "apo_zero": None, "sppo_hard": None}
GRPO_AGGREGATIONS = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
                     "dr_grpo": "const-norm"}
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}

# Keys that only steer TRL / transformers machinery alignkit does not have, with what to do instead.
NO_MEANING = {
    "fp16": "alignkit trains in fp32 or bf16: set bf16: true (precision: bf16)",
    "tf32": "remove it (set torch.backends.cuda.matmul.allow_tf32 in your own launcher if you need it)",
    "per_device_eval_batch_size": "remove it: evaluation uses the training token budget (max_tokens_per_batch)",
    "eval_strategy": "use eval_every (optimizer steps between evaluations)",
    "evaluation_strategy": "use eval_every (optimizer steps between evaluations)",
    "save_strategy": "use save_every (steps between checkpoints)",
    "logging_strategy": "use log_every",
    "push_to_hub": "push final/ yourself (it is an ordinary HF directory with a model card)",
    "hub_model_id": "push final/ yourself (it is an ordinary HF directory with a model card)",
    "dataloader_num_workers": "remove it: records are tokenised once, before training",
    "use_vllm": "set sampling.engine: vllm (online)",
    "deepspeed": "use torchrun with distributed: ddp or fsdp (docs/distributed.md)",
    "fsdp": "set distributed: fsdp and launch with torchrun",
    "precompute_ref_log_probs": "remove it: reference log-probs are always computed once and cached (ref_cache)",
    "padding_free": "remove it: alignkit's batches are always padding-free",
    "remove_unused_columns": "remove it: unknown record fields are kept and ignored",
    "torch_dtype": "remove it: the model loads in its own dtype; set bf16 for autocast",
    "dtype": "remove it: the model loads in its own dtype; set bf16 for autocast",
    "num_processes": "launch with torchrun --nproc_per_node N (docs/distributed.md)",
    "accelerate_config": "launch with torchrun; ZeRO/FSDP sharding is distributed: fsdp (docs/distributed.md)",
}

# TRL's named reward functions (trl.rewards) -> alignkit reward specs.
TRL_REWARDS = {"accuracy_reward": "accuracy"}


def is_trl_config(values: dict, fields: set[str]) -> bool:
    return any(k in TRL_KEYS or k in NO_MEANING for k in values if k not in fields)


def translate(values: dict[str, Any], fields: set[str], command: str = "train") -> tuple[dict[str, Any], list[str]]:
    """(alignkit values, lines of the mapping applied). fields: the command config's own keys (kept as they are).
    command: "train" (offline) or "online"."""
    unknown = {k: NO_MEANING[k] for k in values if k in NO_MEANING and k not in fields and values[k] not in
               (False, None, "no", "none")}
    if unknown:
        raise ConfigError(", ".join(unknown), "TRL key(s) with no alignkit meaning: " + "; ".join(
            f"{k}: {v}" for k, v in unknown.items()))
    def translated(key, value):  # TRL's own meaning; shared names too where TRL spells them its way
        spelled = key == "report_to" and isinstance(value, str) or key == "max_steps" and value == -1
        return key in TRL_KEYS and (key not in fields or spelled)

    out: dict[str, Any] = {k: v for k, v in values.items() if not translated(k, v) and k not in NO_MEANING}
    lines = []
    max_length = values.get("max_length") or 1024
    for key, value in values.items():
        if not translated(key, value):
            continue
        for target, mapped in TRL_KEYS[key](value, values, command, max_length):
            if "." in target:  # a key of a section: loss_options.beta, sampling.max_new_tokens
                section, sub = target.split(".", 1)
                current = out.get(section)
                out[section] = {**(current if isinstance(current, dict) else {}), sub: mapped}
            else:
                out[target] = mapped
            lines.append(f"{key}: {value!r} -> {target}: {mapped!r}")
    return out, lines


def _same(name):
    return lambda value, values, command, max_length: [(name, value)]


def _dataset(value, values, command, max_length):
    source = {"path": value, **({"name": values["dataset_config"]} if values.get("dataset_config") else {})}
    train = {**source, **({"split": values.get("dataset_train_split", "train")})}
    target = "prompts" if command == "online" else "train_data"
    out = [(target, train)]
    if values.get("dataset_test_split") and command != "online":
        out.append(("eval_data", {**source, "split": values["dataset_test_split"]}))
    return out


def _batch(value, values, command, max_length):
    return [("max_tokens_per_batch", int(value) * int(max_length))]


def _epochs(value, values, command, max_length):
    if float(value) != int(float(value)):
        raise ConfigError("num_train_epochs", f"alignkit trains whole epochs, got {value}; use max_steps for a "
                                              "fraction of an epoch")
    return [("epochs", int(float(value)))]


def _max_steps(value, values, command, max_length):
    return [] if value in (None, -1) else [("max_steps" if command != "online" else "rounds", value)]


def _schedule(value, values, command, max_length):
    if value not in SCHEDULES:
        raise ConfigError("lr_scheduler_type", f"{value!r} has no alignkit schedule; use one of {', '.join(SCHEDULES)}")
    return [("lr_schedule", SCHEDULES[value])]


def _beta(value, values, command, max_length):
    return [("loss_options.kl_coef" if command == "online" else "loss_options.beta", value)]


def _loss_type(value, values, command, max_length):
    if command == "online":
        if value == "cispo":
            return [("method", "cispo")]
        if value not in GRPO_AGGREGATIONS:
            raise ConfigError("loss_type", f"GRPO loss_type {value!r} has no alignkit equivalent; use one of "
                                           f"{', '.join([*GRPO_AGGREGATIONS, 'cispo'])}")
        return [("loss_options.loss_aggregation", GRPO_AGGREGATIONS[value])]
    names = [v.strip() for v in value] if isinstance(value, list) else [value]
    if len(names) != 1 or DPO_LOSS_TYPES.get(names[0]) is None:
        raise ConfigError("loss_type", f"DPO loss_type {value!r} has no alignkit loss; known: "
                                       f"{', '.join(k for k, v in DPO_LOSS_TYPES.items() if v)} (or set loss:)")
    return [("loss", DPO_LOSS_TYPES[names[0]])]


def _bf16(value, values, command, max_length):
    return [("precision", "bf16" if value else "fp32")]


def _peft(value, values, command, max_length):
    if not value:
        return []
    lora = {"r": values.get("lora_r", 16), "alpha": values.get("lora_alpha", 32)}
    if "lora_dropout" in values:
        lora["dropout"] = values["lora_dropout"]
    if values.get("lora_target_modules"):
        lora["target_modules"] = values["lora_target_modules"]
    return [("lora", lora)]


def _report_to(value, values, command, max_length):
    names = [value] if isinstance(value, str) else list(value or [])
    if names in (["none"], []):
        return [("report_to", ["jsonl"])]
    if names == ["all"]:
        names = ["tensorboard", "wandb", "mlflow"]
    return [("report_to", ["jsonl", *[n for n in names if n != "jsonl"]])]


def _betas(value, values, command, max_length):
    return [("adam_betas", (values.get("adam_beta1", 0.9), values.get("adam_beta2", 0.999)))]


def _beta2(value, values, command, max_length):  # alone it sets adam_betas too; with adam_beta1, that rule does
    return [] if "adam_beta1" in values else _betas(value, values, command, max_length)


TRL_ADAMW = ("adamw_torch", "adamw_torch_fused")  # TRL's `optim` values that are alignkit's own optimizer


def _optim(value, values, command, max_length):
    if value in TRL_ADAMW:
        return []  # alignkit steps with torch's AdamW (its fused kernel) always
    raise ConfigError("optim", f"{value!r}: alignkit trains with torch's AdamW only ({', '.join(TRL_ADAMW)}); "
                               "remove the key, and set adam_moments: bf16 for half the optimizer state")


def _skip(value, values, command, max_length):  # read by another key's rule
    return []


def _reward_funcs(value, values, command, max_length):
    names = [value] if isinstance(value, str) else list(value)
    if len(names) != 1 or names[0] not in TRL_REWARDS:
        raise ConfigError("reward_funcs", f"{value!r}: alignkit maps TRL's {', '.join(TRL_REWARDS)}; for any other "
                          "reward (or a sum of several) set reward: module:attr, a Reward or f(prompt, response)")
    return [("reward", TRL_REWARDS[names[0]])]


def _num_generations(value, values, command, max_length):
    return [("num_samples", value)]


TRL_KEYS = {
    "model_name_or_path": _same("model"), "dataset_name": _dataset, "dataset_config": _skip,
    "dataset_train_split": _skip, "dataset_test_split": _skip, "per_device_train_batch_size": _batch,
    "gradient_accumulation_steps": _same("grad_accum"), "num_train_epochs": _epochs, "max_steps": _max_steps,
    "learning_rate": _same("learning_rate"), "lr_scheduler_type": _schedule, "warmup_ratio": _same("warmup_ratio"),
    "warmup_steps": _same("warmup_steps"), "weight_decay": _same("weight_decay"),
    "max_grad_norm": _same("max_grad_norm"), "adam_beta1": _betas, "adam_beta2": _beta2, "beta": _beta,
    "loss_type": _loss_type, "max_length": _same("max_length"), "max_prompt_length": _same("max_prompt_length"),
    "bf16": _bf16, "gradient_checkpointing": _same("gradient_checkpointing"), "logging_steps": _same("log_every"),
    "save_steps": _same("save_every"), "save_total_limit": _same("keep_last"), "output_dir": _same("output_dir"),
    "seed": _same("seed"), "use_peft": _peft, "lora_r": _skip, "lora_alpha": _skip, "lora_dropout": _skip,
    "lora_target_modules": _skip, "report_to": _report_to, "run_name": _same("run_name"),
    "num_generations": _num_generations, "reward_funcs": _reward_funcs, "max_completion_length": _same("sampling.max_new_tokens"),
    "temperature": _same("sampling.temperature"), "top_p": _same("sampling.top_p"), "top_k": _same("sampling.top_k"),
    "epsilon": _same("loss_options.epsilon"), "epsilon_high": _same("loss_options.epsilon_high"),
    "num_iterations": _same("num_iterations"), "scale_rewards": _same("loss_options.scale_rewards"),
    "mask_truncated_completions": _same("mask_truncated"), "label_smoothing": _same("loss_options.label_smoothing"),
    "optim": _optim,
}

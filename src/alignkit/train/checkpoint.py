"""Checkpoints: HF-format weights (safetensors; the adapter only under LoRA) + optimizer, scheduler and the
RNG states of every rank (torch, CUDA, Python, NumPy), written atomically.

A checkpoint directory is built under a temporary name and renamed into place, and trainer_state.json is
written last, so a run killed while saving never leaves a directory that looks complete. Loading walks back
from the newest checkpoint and skips (with a message) any that fails to load; nothing is unpickled but
plain tensors and containers (torch.load(weights_only=True)), and weights are read from safetensors only."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_model

from alignkit.errors import AlignkitError, ConfigError
from alignkit.models.lora import is_peft, load_adapter_weights
from alignkit.train.distributed import (
    Dist,
    barrier,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    load_optimizer_state,
)

log = logging.getLogger("alignkit.train")
STATE_FILE = "trainer_state.json"
TRAINER_FILE = "trainer.pt"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    """This process's random number generators, as tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class CheckpointParts:
    """What a checkpoint holds: the model (HF format) and tokenizer, the optimizer and schedule, and `state`, the
    values of trainer_state.json. model_state / optimizer_state: the full states gathered where the live ones are
    sharded (FSDP2); rng_states: one per rank (default: this process's); extra_models: file name -> module saved
    with safetensors beside the policy (a moving reference, PPO's value head; any other object: torch.save)."""

    model: object
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: dict
    model_state: dict | None = None
    optimizer_state: dict | None = None
    rng_states: list[dict] | None = None
    extra_models: dict | None = None


def save_checkpoint(output_dir, step: int, parts: CheckpointParts, keep_last: int) -> Path:
    """Write checkpoint `step`, keeping the newest keep_last."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    extra = {"state_dict": parts.model_state} if parts.model_state is not None else {}
    parts.model.save_pretrained(tmp, safe_serialization=True, **extra)
    if parts.tokenizer is not None:
        parts.tokenizer.save_pretrained(tmp)
    optimizer_state = parts.optimizer.state_dict() if parts.optimizer_state is None else parts.optimizer_state
    torch.save({"optimizer": optimizer_state, "scheduler": parts.scheduler.state_dict(),
                "rng": parts.rng_states or [rng_state()]}, tmp / TRAINER_FILE)
    for name, module in (parts.extra_models or {}).items():  # in a sub-folder: the policy's weights are *.safetensors
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(module, torch.nn.Module):
            save_model(module, str(tmp / name))
        else:  # run state that is not a module (async rollouts sampled ahead)
            torch.save(module, tmp / name)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **parts.state}))  # last: the directory is complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Resumed:
    path: Path
    state: dict  # trainer_state.json: step, skipped_steps
    optimizer: dict
    scheduler: dict
    rng: list[dict]  # one per rank of the run that saved it

    @property
    def step(self) -> int:
        return self.state["step"]

    def rng_for(self, rank: int) -> dict:
        return self.rng[rank] if rank < len(self.rng) else self.rng[0]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError("no safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def _load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    if is_peft(model):
        load_adapter_weights(model, weights)
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied weights are saved once; anything else missing means a broken checkpoint.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or any(k not in tied and not k.endswith("lm_head.weight") for k in missing):
        raise ValueError(f"weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


# Keys a resumed run may change: they do not change what is trained (the rest must equal the saved config). ray:
# Ray workers draw what one process draws.
RESUMABLE_KEYS = frozenset({"output_dir", "progress", "log_every", "save_every", "keep_last", "eval_every", "report_to",
                            "run_name", "max_memory_gb", "release_memory", "teacher_cache",
                            "env_workers", "ray"})


def changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "",
                 defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted keys whose values differ between two dumped configs, except RESUMABLE_KEYS. A key the saved config
    lacks counts as its default (`defaults`, dumped like the configs): a run saved before the key existed ran with
    the behaviour its default keeps."""
    defaults = defaults or {}
    out = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in RESUMABLE_KEYS:
            continue
        a, b = saved.get(key, defaults.get(key)), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            nested = defaults.get(key)
            out += changed_keys(a, b, prefix + key + ".", nested if isinstance(nested, dict) else None)
        elif _normalised(a) != _normalised(b):
            out.append(prefix + key)
    return out


def _normalised(value):
    return [_normalised(v) for v in value] if isinstance(value, (list, tuple)) else value


def config_defaults(cls) -> dict[str, Any]:
    """The dumped default of each field of a pydantic config class that has one (nested sections as dicts)."""
    out = {}
    for name, field in cls.model_fields.items():
        if field.is_required():
            continue
        value = field.get_default(call_default_factory=True)
        out[name] = json.loads(json.dumps(value.model_dump() if hasattr(value, "model_dump") else value))
    return out


def check_resume(output_dir, cfg) -> None:
    """A run that will resume from output_dir's checkpoints must be the run that saved them: keys that change what
    is trained (data, seed, batch plan, loss, ...) must equal the saved config.json (RESUMABLE_KEYS may
    differ). Called before anything is written, so the saved config is the old run's."""
    saved_path = Path(output_dir) / "config.json"
    if not any(checkpoint_root(output_dir).glob("step-*")) or not saved_path.exists():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError:
        raise ConfigError("output_dir", f"{saved_path} is not readable JSON; cannot check that this run may resume "
                                        "from its checkpoints (use a new output_dir)") from None
    changed = changed_keys(saved, json.loads(json.dumps(cfg.model_dump())), defaults=config_defaults(type(cfg)))
    if changed:
        raise ConfigError(changed[0], f"differs from the run saved in {output_dir} (changed: {', '.join(changed)}); "
                                      "resuming would not continue that run: restore the saved values "
                                      "(config.json there) or use a new output_dir")


def write_config(output_dir, cfg) -> None:
    """config.json of the run, written atomically: another rank may be reading it (check_resume) meanwhile."""
    path = Path(output_dir) / "config.json"
    tmp = path.with_name(f".config.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cfg.model_dump(), indent=2))
    os.replace(tmp, path)


def remove_partial_saves(output_dir) -> None:
    """Delete the temporary directories of saves that were killed before their rename."""
    for tmp in sorted(checkpoint_root(output_dir).glob(".tmp-step-*")):
        log.warning("removing %s: a checkpoint save that did not finish (the run was stopped while saving)", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def load_latest_checkpoint(output_dir, model) -> Resumed | None:
    """The newest readable checkpoint, with its weights loaded into `model` (the rest is returned to restore
    once the optimizer exists); None when there is none. An unreadable checkpoint (truncated weights, no
    trainer_state.json, a damaged trainer.pt) is skipped with a warning and the previous one is tried."""
    root = checkpoint_root(output_dir)
    for path in sorted(root.glob("step-*"), reverse=True):
        try:
            state = json.loads((path / STATE_FILE).read_text())
            if not isinstance(state.get("step"), int):
                raise ValueError(f"{STATE_FILE} has no step")
            trainer = torch.load(path / TRAINER_FILE, weights_only=True)
            resumed = Resumed(path, state, trainer["optimizer"], trainer["scheduler"], trainer["rng"])
            _load_weights(model, _weights(path))
        except Exception as err:  # noqa: BLE001 - any failure means: fall back to the previous checkpoint
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, err)
            continue
        log.info("resumed from %s (step %d)", path, resumed.step)
        return resumed
    return None


def save_from_ranks(output_dir, step: int, parts: CheckpointParts, train_model, ctx: Dist, keep_last: int) -> None:
    """Every rank calls this: the states are gathered (RNG of each rank; weights and optimizer under FSDP2), rank 0
    writes the checkpoint, and all wait for it. train_model: the module the step calls (DDP / FSDP2 around the
    model)."""
    parts.model_state = full_model_state(parts.model, train_model)
    parts.optimizer_state = full_optimizer_state(parts.model, parts.optimizer, train_model)
    parts.rng_states = gather_objects(rng_state(), ctx)
    if ctx.is_main:
        save_checkpoint(output_dir, step, parts, keep_last)
    barrier(ctx)


def restore_training_state(resumed: Resumed | None, model, optimizer, scheduler, train_model, ctx: Dist) -> tuple[int, int]:
    """Load the optimizer, scheduler and this rank's RNG state of `resumed`; returns (first step to run,
    steps skipped so far). Every rank must have found the same checkpoint."""
    found = gather_objects(resumed.step if resumed else 0, ctx)
    if len(set(found)) > 1:
        raise AlignkitError(f"ranks found different checkpoints (steps {found}); output_dir must be one directory "
                            "that every rank sees (a shared filesystem)")
    if resumed is None:
        return 0, 0
    try:
        load_optimizer_state(model, optimizer, train_model, resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
    except (KeyError, ValueError, RuntimeError) as err:
        raise AlignkitError(f"{resumed.path}: its optimizer state does not fit this run ({err}); resume with the "
                            "settings it was saved with (model, lora, distributed), or use a new output_dir") from None
    set_rng_state(resumed.rng_for(ctx.rank))
    return resumed.step, int(resumed.state.get("skipped_steps", 0))

"""Checkpoints: HF-format weights (safetensors) + optimizer/scheduler/RNG state, written atomically.

A checkpoint directory is built under a temporary name and renamed into place, so a run killed while
saving never leaves a directory that looks complete. Loading walks back from the newest checkpoint and
skips (with a message) any that fails to load."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

log = logging.getLogger("alignkit.train")
STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError("no safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def load_latest_checkpoint(output_dir, model, optimizer, scheduler) -> dict | None:
    """Restore the newest loadable checkpoint into model/optimizer/scheduler; returns its state or None."""
    root = checkpoint_root(output_dir)
    for path in sorted(root.glob("step-*"), reverse=True):
        try:
            state = json.loads((path / STATE_FILE).read_text())
            trainer = torch.load(path / "trainer.pt", weights_only=True)
            weights = _weights(path)
            missing, unexpected = model.load_state_dict(weights, strict=False)
            # Tied weights are saved once; anything else missing means a broken checkpoint.
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            if unexpected or any(k not in tied and not k.endswith("lm_head.weight") for k in missing):
                raise ValueError(f"weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
            optimizer.load_state_dict(trainer["optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            torch.set_rng_state(trainer["torch_rng"])
        except Exception as err:  # noqa: BLE001 - any failure means: fall back to the previous checkpoint
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, err)
            continue
        log.info("resumed from %s (step %d)", path, state["step"])
        return state
    return None

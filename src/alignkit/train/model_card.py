"""What every saved model says about itself: README.md (a model card a person reads on the hub) and
training_state.json (the same facts for a program): base model, data sources, method and loss options, final
metrics, alignkit version."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path


def _version() -> str:
    try:
        return metadata.version("alignkit")
    except metadata.PackageNotFoundError:
        return "unknown"


def _source(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value.model_dump(exclude_none=True) if hasattr(
        value, "model_dump") else value)


def training_state(cfg, metrics: dict, steps: int) -> dict:
    """cfg: TrainConfig or OnlineConfig; metrics: the last logged (or the run's summary)."""
    data = {k: _source(getattr(cfg, k, None)) for k in ("train_data", "eval_data", "prompts", "eval_prompts")}
    method = getattr(cfg, "method", None) or getattr(cfg, "loss", None)
    return {"alignkit_version": _version(), "base_model": cfg.model, "method": method,
            "loss": getattr(cfg, "loss_name", None) or getattr(cfg, "loss", None),
            "loss_options": dict(getattr(cfg, "loss_options", {}) or {}),
            "data": {k: v for k, v in data.items() if v is not None}, "steps": steps,
            "lora": cfg.lora.model_dump() if getattr(cfg, "lora", None) is not None else None,
            "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None},
            "config": cfg.model_dump(mode="json")}


def write_model_card(path: Path, state: dict) -> None:
    """README.md (hub front matter + tables) and training_state.json into a saved model's directory."""
    path = Path(path)
    (path / "training_state.json").write_text(json.dumps(state, indent=2))
    rows = "\n".join(f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
                     for k, v in state["final_metrics"].items())
    options = "\n".join(f"| `{k}` | `{v}` |" for k, v in state["loss_options"].items()) or "| (defaults) | |"
    data = "\n".join(f"- {k}: `{v}`" for k, v in state["data"].items()) or "- (in memory)"
    base = state["base_model"]
    text = f"""---
base_model: {base}
library_name: transformers
tags: [alignkit, {state['method']}]
---

# {path.parent.name}: {base} trained with alignkit ({state['method']})

- base model: `{base}`
- method: `{state['method']}`, loss `{state['loss']}`, {state['steps']} optimizer steps{', LoRA' if state['lora'] else ''}
- alignkit {state['alignkit_version']}

## Data
{data}

## Loss options
| option | value |
|---|---|
{options}

## Final metrics
| metric | value |
|---|---|
{rows}

The whole configuration is in `training_state.json` (`config`).
"""
    (path / "README.md").write_text(text)

"""Metric backends beyond metrics.jsonl: TensorBoard, Weights & Biases, MLflow. Each gets the same metric names and
steps; wandb and mlflow also get the whole config as parameters and the run name. wandb / mlflow are imported only
when asked for, and a missing package is a ConfigError naming the extra to install."""

from __future__ import annotations

import os
from pathlib import Path

from alignkit.errors import ConfigError


def _missing(name: str, package: str) -> ConfigError:
    return ConfigError("report_to", f"'{name}' needs the {package} package: pip install {package}")


def _backend(name: str, package: str):
    """The backend's module, imported only when asked for; missing, a ConfigError naming what to install."""
    try:
        return __import__(name)  # (through builtins.__import__, as an `import` statement)
    except ImportError:
        raise _missing(name, package) from None


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config as flat parameters."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class TensorBoard:
    def __init__(self, output_dir: Path, run_name: str, config: dict, required: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if required:
                raise _missing("tensorboard", "tensorboard") from None
            self.writer = None
            return
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandB:
    def __init__(self, output_dir: Path, run_name: str, config: dict, required: bool = True):
        wandb = _backend("wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "alignkit"), name=run_name, config=config,
                              dir=str(output_dir), reinit="finish_previous")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, output_dir: Path, run_name: str, config: dict, required: bool = True):
        self.mlflow = mlflow = _backend("mlflow", "mlflow-skinny")
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store: no server, nothing to install
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "alignkit"))
        self.run = mlflow.start_run(run_name=run_name)
        params = {k: str(v)[:500] for k, v in flatten(config).items()}  # mlflow caps a parameter's length
        mlflow.log_params(params)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=self.run.info.run_id)

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(output_dir: Path, report_to: list[str], run_name: str | None, config: dict) -> list:
    """The backends report_to names (jsonl is the caller's own). TensorBoard in the default list is skipped when
    torch's tensorboard is missing; named alone, or wandb / mlflow, a missing package is an error."""
    name = run_name or Path(output_dir).resolve().name
    default = report_to == ["jsonl", "tensorboard"]
    return [BACKENDS[b](Path(output_dir), name, config, not default) for b in report_to if b in BACKENDS]

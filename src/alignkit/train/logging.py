"""Metrics out: a JSONL file (always), the trackers of report_to (TensorBoard, wandb, mlflow), a progress bar."""

from __future__ import annotations

import json
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


class MetricsLog:
    """metrics.jsonl (always), the trackers of cfg.report_to (train/trackers.py) with the same names and steps, and
    a progress bar. cfg: the run's config (report_to, run_name, and its values as the trackers' parameters)."""

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int, progress: bool = True, cfg=None):
        from alignkit.train.trackers import open_trackers

        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        report_to = getattr(cfg, "report_to", ["jsonl", "tensorboard"])
        config = cfg.model_dump(mode="json") if cfg is not None else {}
        self.trackers = open_trackers(Path(output_dir), report_to, getattr(cfg, "run_name", None), config)
        self.file = self.path.open("a", encoding="utf-8")
        self.bar = None
        if progress:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(step, numbers)
        if self.bar is not None and "loss" in metrics:
            info = f"loss {metrics['loss']:.4f}  {metrics.get('tokens_per_s', 0):.0f} tok/s"
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        for tracker in self.trackers:
            tracker.close()
        self.file.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

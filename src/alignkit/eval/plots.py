"""Training curves as a PNG, from a run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(runs: dict[str, list[dict]], keys: list[str], path: str | Path, title: str = "") -> Path:
    """One panel per metric key; one line per run (name -> metric rows with a 'step')."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_reward_histograms(rewards: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """Overlaid reward histograms, one per model (name -> rewards), with the mean in the legend."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    values = [v for series in rewards.values() for v in series]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 20
    for name, series in rewards.items():
        mean = sum(series) / len(series) if series else float("nan")
        ax.hist(series, bins=bins, alpha=0.55, label=f"{name} (mean {mean:+.3f})")
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_table(rows: list[list[str]], path: str | Path, title: str = "") -> Path:
    """A table (first row = header) drawn as a PNG: e.g. win rates raw / swapped / calibrated."""
    fig, ax = plt.subplots(figsize=(1.9 * len(rows[0]), 0.45 * len(rows) + 0.8))
    ax.axis("off")
    table = ax.table(cellText=rows[1:], colLabels=rows[0], loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.4)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_realign_sweep(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """DeRa's sweep: mean reward against KL to the reference, one point per lambda (labelled)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["kl"] for r in rows], [r["mean_reward"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"λ={r['lambda']:g}", (r["kl"], r["mean_reward"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("KL to the reference (nats per answer)")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)

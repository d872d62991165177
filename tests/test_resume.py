"""Exact resume after a hard kill: `alignkit train` is SIGKILLed at a random step (checkpoints every step, a
model with dropout so the RNG state matters), resumed, and ends with the loss trajectory and weights of an
uninterrupted run. Damaged checkpoints (no trainer_state.json, truncated safetensors, a pickle payload in
trainer.pt, a leftover temporary directory) are detected and the previous one is used, with a message."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train import checkpoint
from alignkit.train.logging import read_metrics
from alignkit.train.run import truncate_metrics

TOKENIZER = build_word_tokenizer(VOCABULARY)
STEPS = 16


def tiny_llama(dropout: float = 0.0):
    model = build_tiny_model("llama", len(TOKENIZER), seed=0, hidden=32, layers=2, heads=4)
    model.config.attention_dropout = dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    return model


def write_config(root: Path, name: str, save_every: int = 1) -> str:
    values = dict(model=str(root / "model"), train_data=str(root / "pairs.jsonl"), output_dir=str(root / name),
                  loss="dpo", learning_rate=2e-3, ref_cache=False, max_length=64, max_tokens_per_row=512,
                  max_tokens_per_batch=80, max_steps=STEPS, save_every=save_every, keep_last=2, progress=False)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(values))
    return str(root / f"{name}.yaml")


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def logged_steps(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}"))


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    model = tiny_llama(dropout=0.1)  # training draws random numbers: resuming must restore the RNG too
    model.save_pretrained(tmp_path / "model")
    TOKENIZER.save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(4 * STEPS, seed=11))  # 4 pairs a step

    kill_after = random.randint(3, 9)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same kernels as this process
    job = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "train", "--config", write_config(tmp_path, "killed")],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while logged_steps(metrics) < kill_after and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    job.send_signal(signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL, f"the run ended before the kill (step {kill_after}):\n{stderr[-3000:]}"
    killed_at = logged_steps(metrics)
    assert kill_after <= killed_at < STEPS and not (tmp_path / "killed" / "final").exists()

    assert main(["train", "--config", str(tmp_path / "killed.yaml")]) == 0  # resumes
    assert main(["train", "--config", write_config(tmp_path, "straight", save_every=0)]) == 0  # never stopped

    resumed, straight = read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), f"killed after step {killed_at}"
    assert without_timing(resumed) == without_timing(straight), f"killed after step {killed_at}"
    final, expected = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("killed", "straight"))
    assert sorted(final) == sorted(expected)
    assert all(torch.equal(final[k], expected[k]) for k in expected), f"killed after step {killed_at}"
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp*"))


# ---- damaged checkpoints ----


def save_three(root: Path):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    weights = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model.model.norm.weight.fill_(float(step))  # tells the checkpoints apart
        parts = checkpoint.CheckpointParts(model, TOKENIZER, optimizer, scheduler, {"skipped_steps": step})
        checkpoint.save_checkpoint(root, step, parts, 5)
        weights[step] = model.model.norm.weight.clone()
    return model


def resume_step(root: Path) -> int:
    model = tiny_llama()
    resumed = checkpoint.load_latest_checkpoint(root, model)
    if resumed is None:
        return 0
    assert float(model.model.norm.weight[0].detach()) == resumed.step  # its weights were loaded
    return resumed.step


class RunsCode:
    """Unpickling this would create `marker`: what a malicious trainer.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_damaged_checkpoints_fall_back_to_the_previous_one(tmp_path, caplog):
    save_three(tmp_path)
    steps = tmp_path / "checkpoints"
    assert sorted(p.name for p in steps.iterdir()) == ["step-00000001", "step-00000002", "step-00000003"]
    assert resume_step(tmp_path) == 3

    caplog.set_level(logging.INFO, logger="alignkit.train")
    (steps / "step-00000003" / "trainer_state.json").unlink()  # killed before the last file was written
    assert resume_step(tmp_path) == 2
    assert "step-00000003 is unreadable" in caplog.text and "trying the previous one" in caplog.text

    weights = steps / "step-00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])  # truncated
    assert resume_step(tmp_path) == 1
    assert "step-00000002 is unreadable" in caplog.text

    marker = tmp_path / "pwned"
    torch.save({"optimizer": RunsCode(marker)}, steps / "step-00000001" / "trainer.pt")
    assert resume_step(tmp_path) == 0  # nothing usable left: start from scratch
    assert not marker.exists()  # weights_only: the payload was refused, not run
    assert "step-00000001 is unreadable" in caplog.text


def test_leftover_temporary_directory_is_removed_with_a_message(tmp_path, caplog):
    save_three(tmp_path)
    partial = tmp_path / "checkpoints" / ".tmp-step-00000004-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    caplog.set_level(logging.WARNING, logger="alignkit.train")
    checkpoint.remove_partial_saves(tmp_path)
    assert not partial.exists() and ".tmp-step-00000004-999" in caplog.text and "did not finish" in caplog.text
    assert resume_step(tmp_path) == 3


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    checkpoint.save_checkpoint(tmp_path, 1, checkpoint.CheckpointParts(model, None, optimizer, scheduler, {}), 1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    resumed = checkpoint.load_latest_checkpoint(tmp_path, tiny_llama())
    checkpoint.set_rng_state(resumed.rng_for(0))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert len(resumed.rng) == 1 and resumed.rng_for(3) is resumed.rng[0]  # another world size: rank 0's


def test_a_metrics_line_cut_by_the_kill_is_dropped_on_resume(tmp_path):
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    truncate_metrics(tmp_path, 2)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}]

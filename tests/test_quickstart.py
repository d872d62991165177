"""`alignkit quickstart`'s own claim (README): DPO takes the held-out preference accuracy from 50% to >= 90% and
raises the sampled answers' reward over the SFT model's. Run at a smaller size than the command's default; the
claim checked is the same."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from alignkit.recipes.quickstart import QuickstartSize, run_quickstart
from alignkit.train.logging import read_metrics


@pytest.mark.slow
def test_quickstart_claim_holds_at_a_smaller_size(tmp_path, one_thread):
    size = QuickstartSize(sft_examples=800, train_pairs=1000, eval_pairs=100, eval_prompts=64, sft_epochs=2)
    summary = run_quickstart(tmp_path, size, progress=False, console=Console(file=open(tmp_path / "log.txt", "w")))
    assert summary["heldout_pref_accuracy_before"] == 0.5
    assert summary["heldout_pref_accuracy_after"] >= 0.9, summary
    assert summary["sample_reward_dpo"] > summary["sample_reward_sft"] + 0.05, summary
    evals = [r for r in read_metrics(tmp_path / "dpo") if "eval/rewards/accuracy" in r]
    assert summary["heldout_pref_accuracy_after"] == evals[-1]["eval/rewards/accuracy"]
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name in ("train_curves.png", "eval_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

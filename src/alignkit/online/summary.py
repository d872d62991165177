"""What an online run reports beyond its metrics: rollouts.jsonl (what each round trained on), the KL of the final
policy to the starting one on its own samples, and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.data.tokenize import TokenizedExample
from alignkit.eval.kl import example_log_ratios, kl_packing, kl_summary
from alignkit.online.rollout import Rollout
from alignkit.train.packing import Packing


def append_rollouts(out_dir: Path, round_number: int, rollout: Rollout) -> None:
    """rollouts.jsonl: each round's prompts, sampled texts and rewards (what was trained on, for reading back)."""
    with (out_dir / "rollouts.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": round_number, "prompts": rollout.prompts, "texts": rollout.texts,
                            "rewards": rollout.rewards.tolist()}) + "\n")


def sample_kl(policy, reference, rollout: Rollout, packing: Packing) -> dict:
    """The KL estimate mean_y log pi(y)/pi_ref(y) on exactly the sampled tokens (unbiased at temperature 1;
    reference None: the policy's LoRA base), with the run's pad id and precision (a bf16 run's reference holds bf16
    weights) in eval/kl.kl_packing's rows."""
    singles = [TokenizedExample(e.prompt_ids, [ids], response_loss_masks=None if e.response_loss_masks is None
                                else [e.response_loss_masks[i]])  # multi-turn: the sampled tokens only
               for e in rollout.examples for i, ids in enumerate(e.response_ids)]
    packing = kl_packing(packing.pad_token_id, packing.precision)
    summary = kl_summary(example_log_ratios(policy, reference, singles, packing))
    return {"kl": summary["kl"], "kl_sem": summary["kl_sem"]}


def summarize(cfg, before: dict, after: dict, rows: list[dict]) -> dict:
    """summary.json: the held-out reward before and after, the KL to the start, and where the time went."""
    def total(key):
        return sum(r.get(key, 0.0) for r in rows)

    seconds = total("time/generate_s") + total("time/reward_s") + total("time/score_s") + total("time/learner_s")
    samples = len(rows) * cfg.prompts_per_round * cfg.num_samples
    return {
        "method": cfg.method, "rounds": cfg.rounds, "samples": samples,
        "reward_start": before["reward"], "reward_final": after["reward"], "reward_gain": after["reward"] - before["reward"] if cfg.eval_before_after else None,
        "kl_to_start": after.get("kl"), "kl_to_start_sem": after.get("kl_sem"),
        "seconds": seconds, "samples_per_s": samples / seconds if seconds else None,
        "cpu_seconds": total("time/cpu_s"),  # process CPU time (all threads): steadier than wall time when shared
        "time_split": {key: total(f"time/{key}_s") / seconds if seconds else None
                       for key in ("generate", "reward", "score", "learner")},
    }

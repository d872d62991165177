"""Online RL with an FSDP2-sharded learner (`distributed: fsdp`): two gloo processes equal one in every logged number,
the rollouts and the final weights; a sharded run that crashes resumes from its checkpoint to the uninterrupted run,
bit for bit; what a sharded online run refuses is named."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.data.load import write_jsonl_atomic
from alignkit.errors import ConfigError
from alignkit.models.tiny import build_tiny_model
from alignkit.online import online_config
from alignkit.online.run import check_online_setup
from alignkit.online.sharding import check_sharded_engine
from alignkit.train.distributed import Dist
from alignkit.train.logging import read_metrics
from synthetic_task import prompts

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("time/", "samples_per_s", "tokens_per_s")

# Runs each config in turn in the same two processes; CONFIG@N raises inside round N's learner on every rank (a crash
# between checkpoints) and the next config resumes it. Records whether each run's learner was sharded.
WORKER = '''
import json, sys
import torch.distributed as dist
from alignkit.cli import main
from alignkit.online import run as online_run

class Crash(Exception):
    pass

def crashing(at_round, real):
    def learn(self, experience, round_index):
        if round_index + 1 == at_round:
            raise Crash
        return real(self, experience, round_index)
    return learn

sharded, real_is_sharded = [], online_run.is_sharded
online_run.is_sharded = lambda m: sharded.append(real_is_sharded(m)) or sharded[-1]
dist.init_process_group("gloo")
for spec in sys.argv[2:]:
    config, _, crash = spec.partition("@")
    if not crash:
        if main(["online", "--config", config]) != 0:
            raise SystemExit(f"{config} failed")
        continue
    real = online_run.OnlineRun.learn
    online_run.OnlineRun.learn = crashing(int(crash), real)
    try:
        main(["online", "--config", config])
        raise SystemExit("the crash did not happen")
    except Crash:
        pass
    finally:
        online_run.OnlineRun.learn = real
with open(f"{sys.argv[1]}/sharded.rank{dist.get_rank()}.json", "w") as file:
    json.dump(sharded, file)
dist.destroy_process_group()
'''


def write_config(root, name: str, **overrides) -> str:
    # kl_coef > 0 and a reference that moves every 2 rounds: the reference is scored, copied from the sharded policy
    # and checkpointed; each rank samples 4 of a round's 8 prompts in generate calls of 2
    config = dict(method="grpo", model=str(root / "model"), prompts=str(root / "prompts.jsonl"), reward="synthetic",
                  output_dir=str(root / name), rounds=4, prompts_per_round=8, num_samples=4, max_length=64,
                  max_tokens_per_batch=200, max_tokens_per_row=512, learning_rate=1e-3, eval_samples=1,
                  progress=False, minibatches=2, kl_coef=0.04, ref_update_every=2, save_every=1, seed=3,
                  sampling={"batch_size": 2, "max_new_tokens": 10, "engine": "fast"}, **overrides)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def rollout_lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


@pytest.mark.slow
def test_online_fsdp_two_processes_equal_one_and_resume_exactly(task, tmp_path):
    copy.deepcopy(task.model).save_pretrained(tmp_path / "model")
    task.tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts(64, seed=31)])
    fsdp, resumed = (write_config(tmp_path, n, distributed="fsdp") for n in ("fsdp", "resumed"))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "worker.py"), str(tmp_path), fsdp, f"{resumed}@3", resumed], env=env,
                         capture_output=True, text=True, timeout=420)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    for rank in (0, 1):  # every run's learner was sharded (the scorer and the final KL ask once each per run)
        sharded = json.loads((tmp_path / f"sharded.rank{rank}.json").read_text())
        assert len(sharded) >= 3 and all(sharded)
    assert main(["online", "--config", write_config(tmp_path, "single")]) == 0
    assert rollout_lines(tmp_path / "fsdp") == rollout_lines(tmp_path / "single")  # the engines got the same weights
    ours, theirs = without_timing(read_metrics(tmp_path / "fsdp")), without_timing(read_metrics(tmp_path / "single"))
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):  # every logged number: sums over ranks in another order, non-fused AdamW
        assert sorted(a) == sorted(b)
        for key, value in b.items():
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["step"], key)
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("fsdp", "single")]
    assert summaries[0]["kl_to_start"] == pytest.approx(summaries[1]["kl_to_start"], rel=1e-4, abs=1e-6)
    assert summaries[0]["reward_final"] == summaries[1]["reward_final"]  # the engine's held-out samples: the same
    final, expected = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("fsdp", "single"))
    moved = 0.0
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=1e-5, msg=key)
        moved = max(moved, float((expected[key] - task.model.state_dict()[key]).abs().max()))
    assert moved > 1e-3  # the runs trained
    # the crashed run resumed from round 2's checkpoint (sharded optimizer state, the moved reference) exactly
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4]
    assert without_timing(read_metrics(tmp_path / "resumed")) == ours
    assert rollout_lines(tmp_path / "resumed") == rollout_lines(tmp_path / "fsdp")
    again = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)


SHARDED = Dist(rank=0, world_size=2)


@pytest.mark.parametrize("overrides, key", [
    ({"lora": {"r": 4}}, "lora"),
    ({"method": "ppo"}, "method"),
    ({"method": "self-reward"}, "method"),
    ({"sampling": {"engine": "hf"}}, "sampling.engine"),
])
def test_fsdp_online_refuses_by_name(overrides, key):
    cfg = online_config({"method": "grpo", "model": "tiny", "prompts": "-", "distributed": "fsdp", **overrides})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_online_setup(cfg, SHARDED)
    check_online_setup(cfg.model_copy(update={"distributed": "ddp"}), SHARDED)  # ddp runs them


def test_fsdp_online_refuses_auto_falling_back_to_hf():
    cfg = online_config({"method": "grpo", "model": "tiny", "prompts": "-", "distributed": "fsdp"})
    with pytest.raises(ConfigError, match=r"sampling\.engine.*GPT2"):
        check_sharded_engine(cfg, build_tiny_model("gpt2", 32), SHARDED)
    check_sharded_engine(cfg, build_tiny_model("llama", 32), SHARDED)  # the fast engine runs it
    check_online_setup(cfg, SHARDED)

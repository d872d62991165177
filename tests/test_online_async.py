"""Async rollouts (online/producer.py, `async: {max_staleness: N}`): the decoupled PPO loss against a NumPy
transcription of AReaL's; N = 0 is the synchronous run; every token is sampled by the scheduled weight version (its
log-probs rescored under that version's saved weights) within the bound; the producer samples while the learner
trains; a run stopped mid-way resumes to the uninterrupted run's weights; what async refuses."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.data.load import write_jsonl_atomic
from alignkit.errors import ConfigError
from alignkit.losses.offpolicy import resolve_correction
from alignkit.losses.online import GRPOOptions, RLOOOptions, grpo_loss
from alignkit.online import OnlineInputs, online_config, run_online
from alignkit.online import run as online_run
from alignkit.online.config import method_loss
from alignkit.online.producer import sampling_version
from alignkit.online.rollout import training_examples
from alignkit.train.logging import read_metrics
from alignkit.train.reference import score_examples
from synthetic_task import SENTIMENT, prompts
from test_online_guarantees import (
    assert_matches_one_process,
    crash_in_round,
    rollout_lines,
    values,
    without_timing,
    write_online_config,
)
from test_online_math import grpo_inputs, rollout_tensors

pytestmark = pytest.mark.usefixtures("one_thread")
ASYNC_KEYS = ("weight_version", "sampled_version", "staleness", "token_staleness", "time/wait_s")


def run(task, out, staleness: int | None, reward=SENTIMENT, **overrides):
    extra = {"async": {"max_staleness": staleness}} if staleness is not None else {}
    cfg = online_config(values("grpo", out, **{"rounds": 4, **extra, **overrides}))
    return run_online(cfg, copy.deepcopy(task.model), task.tokenizer,
                      OnlineInputs(prompts(64, seed=31), prompts(8, seed=32), reward))


def record_versions(monkeypatch) -> tuple[dict, dict, list]:
    """(snapshots, rollouts, runs), filled as the next run goes: the policy's weights at each version v (before round
    v's update), each round's rollout, and the OnlineRun itself."""
    snapshots, rollouts, runs = {}, {}, []
    real_learn, real_round = online_run.OnlineRun.learn, online_run.OnlineRun.round

    def learn(self, experience, round_index):
        runs.append(self)
        snapshots[round_index] = {k: v.clone() for k, v in self.policy.state_dict().items()}
        return real_learn(self, experience, round_index)

    def round_(self, round_index):
        row, rollout = real_round(self, round_index)
        rollouts[round_index] = rollout
        return row, rollout

    monkeypatch.setattr(online_run.OnlineRun, "learn", learn)
    monkeypatch.setattr(online_run.OnlineRun, "round", round_)
    return snapshots, rollouts, runs


def assert_resumed_as_straight(stopped: Path, straight: Path) -> None:
    """A stopped-and-resumed run's metrics, rollouts and final weights are the uninterrupted run's."""
    assert without_timing(read_metrics(stopped)) == without_timing(read_metrics(straight))
    assert rollout_lines(stopped) == rollout_lines(straight)
    final, expected = (load_file(out / "final" / "model.safetensors") for out in (stopped, straight))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


# ---- the loss ----


def numpy_areal_decoupled(logps, proximal, behaviour, advantages, mask, eps_low, eps_high, cap):
    """AReaL's ppo_actor_loss_fn (areal/utils/functional.py) with the decoupled loss, transcribed: r = exp(l - l_prox);
    pg = max(-A r, -A clip(r, 1 - e_low, 1 + e_high)); w = exp(l_prox - l_behav), 0 where w > cap (or off the mask);
    loss = sum(pg w over the mask) / count(mask)."""
    ratio = np.where(mask, np.exp(logps - proximal), 0.0)
    pg = np.maximum(-advantages * ratio, -advantages * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    weight = np.exp(proximal - behaviour)
    keep = mask & (weight <= cap) if cap is not None else mask
    pg = pg * np.where(keep, weight, 0.0)
    return np.where(mask, pg, 0.0).sum() / max(mask.sum(), 1)


@pytest.mark.parametrize("cap", [None, 1.5])
def test_decoupled_loss_matches_numpy_areal(cap):
    logps, proximal, _, mask, scores = rollout_tensors(seed=3)
    behaviour = (proximal + 0.5 * torch.randn(proximal.shape, generator=torch.Generator().manual_seed(4))) * mask
    opts = GRPOOptions(epsilon=0.2, epsilon_high=0.28, kl_coef=0.0, loss_aggregation="token-mean",
                       engine_correction="decoupled", engine_ratio_max=cap)
    inputs, policy = grpo_inputs(logps, proximal, None, mask, scores)
    inputs.engine_token_logps = behaviour
    losses, metrics = grpo_loss(inputs, opts)
    advantages = ((scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-4))[..., None]
    expected = numpy_areal_decoupled(logps.numpy(), proximal.numpy(), behaviour.numpy(),
                                     advantages.expand_as(logps).numpy(), mask.numpy(), 0.2, 0.28, cap)
    assert float(losses.mean()) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # the gradient: autograd of the NumPy formula written in torch on the same leaf
    naive_policy = logps.clone().requires_grad_()
    ratio = torch.exp(naive_policy - proximal)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.28))
    weight = torch.exp(proximal - behaviour)
    keep = mask & (weight <= cap) if cap is not None else mask
    (torch.where(keep, pg * weight, 0.0).sum() / mask.sum()).backward()
    losses.mean().backward()
    assert torch.allclose(policy.grad, naive_policy.grad, atol=1e-6)
    if cap is not None:  # tokens whose weight passes the cap carry no loss, and are counted
        share = float(((torch.exp(proximal - behaviour) > cap) & mask).sum() / mask.sum())
        assert 0 < share and float((metrics["engine_ratio_masked"] * mask.sum((1, 2))).sum() / mask.sum()) == \
            pytest.approx(share)


def test_auto_is_decoupled_for_stale_rollouts_and_stays_as_it_was_otherwise():
    assert resolve_correction(GRPOOptions(), True, stale=True).engine_correction == "decoupled"
    assert resolve_correction(GRPOOptions(), False, stale=True).engine_correction == "decoupled"
    assert resolve_correction(RLOOOptions(), True, stale=True).engine_correction == "sequence_truncate"
    assert resolve_correction(GRPOOptions(), True).engine_correction == "none"
    assert resolve_correction(GRPOOptions(), False).engine_correction == "sequence_mask"
    with pytest.raises(ConfigError, match="engine_correction"):
        RLOOOptions(engine_correction="decoupled")  # a weight per token on a loss per response


# ---- config ----


@pytest.mark.parametrize("bad, key", [
    (dict(method="online-dpo"), "async.max_staleness"),
    (dict(sampling={"engine": "hf"}), "sampling.engine"),
    (dict(loss_options={"engine_correction": "none"}), "loss_options.engine_correction"),
    (dict(**{"async": {"max_staleness": -1}}), "async.max_staleness"),
    (dict(**{"async": {"max_stale": 1}}), "async.max_stale"),
])
def test_async_refusals_name_the_key(tmp_path, bad, key):
    settings = {"method": "grpo", "async": {"max_staleness": 2}, **bad}
    with pytest.raises(ConfigError) as err:
        method_loss(online_config(values(settings.pop("method"), tmp_path, **settings)))
    assert err.value.key == key


def test_async_key_forms_are_one_field(tmp_path):
    forms = [{"async": {"max_staleness": 3}}, {"async_rollouts": {"max_staleness": 3}}]
    assert {online_config(values("grpo", tmp_path, **f)).async_rollouts.max_staleness for f in forms} == {3}
    assert online_config(values("grpo", tmp_path), {"async.max_staleness": 3}).async_rollouts.max_staleness == 3
    assert online_config(values("grpo", tmp_path), {"max_staleness": 3}).async_rollouts.max_staleness == 3


# ---- runs ----


def test_staleness_zero_equals_the_synchronous_run(task, tmp_path):
    common = dict(epochs=2, rounds=3)  # two updates per rollout: the behaviour log-probs are scored too
    sync = run(task, tmp_path / "sync", None, **common)
    zero = run(task, tmp_path / "zero", 0, **common)
    assert all(row["staleness"] == 0 for row in zero.rounds)
    stripped = [{k: v for k, v in row.items() if k not in ASYNC_KEYS} for row in zero.rounds]
    assert without_timing(stripped) == without_timing(sync.rounds)
    assert rollout_lines(tmp_path / "zero") == rollout_lines(tmp_path / "sync")
    for name, tensor in sync.model.state_dict().items():
        assert torch.equal(zero.model.state_dict()[name], tensor), name


def test_every_token_is_sampled_by_its_scheduled_version_within_the_bound(task, tmp_path, monkeypatch):
    """Round r's tokens carry version max(0, r - N) >= r - N, and their engine log-probs are those of the policy
    saved at that version (not the learner's current one, once they differ)."""
    staleness, rounds = 2, 5
    snapshots, rollouts, runs = record_versions(monkeypatch)
    result = run(task, tmp_path / "async", staleness, rounds=rounds, eval_before_after=False)
    online, scorer_model = runs[0], copy.deepcopy(task.model)
    assert [row["staleness"] for row in result.rounds] == [min(r, staleness) for r in range(rounds)]
    for r, rollout in rollouts.items():
        versions = torch.cat(rollout.token_versions)
        assert len(versions) == rollout.generated_tokens
        assert int(versions.min()) >= r - staleness and set(versions.tolist()) == {sampling_version(r, staleness)}
        examples, engine_logps, _ = training_examples(rollout)
        scorer_model.load_state_dict(snapshots[int(versions[0])])
        sampled_by = torch.cat(score_examples(scorer_model, examples, online.packing)[1])
        assert torch.allclose(sampled_by, torch.cat(engine_logps), atol=1e-4), f"round {r + 1}"
        if r >= staleness + 1:  # the learner's weights moved since: the engine's log-probs are not theirs
            scorer_model.load_state_dict(snapshots[r])
            current = torch.cat(score_examples(scorer_model, examples, online.packing)[1])
            assert (current - torch.cat(engine_logps)).abs().max() > 1e-3
    assert all("engine_ratio_masked" in row for row in result.rounds)  # auto: decoupled


def test_the_producer_samples_while_the_learner_trains(task, tmp_path, monkeypatch):
    """Round v + N is scored while the learner trains round v: its reward waits until learn(v) has begun, and learn(v)
    waits until that reward was called. A run that sampled only between learner steps (in either order) would stall
    on one of the waits."""
    staleness, rounds, state, event = 1, 4, {"rewards": 0, "learning": 0}, threading.Condition()
    reward_waits, learn_waits = [], []

    def reward(prompts_, texts):
        with event:
            version = sampling_version(state["rewards"], staleness)  # this call scores round state["rewards"]
            if state["rewards"] > staleness:
                reward_waits.append(event.wait_for(lambda: state["learning"] > version, timeout=60))
            state["rewards"] += 1
            event.notify_all()
        return SENTIMENT(prompts_, texts)

    real_learn = online_run.OnlineRun.learn

    def learn(self, experience, round_index):
        with event:
            state["learning"] = round_index + 1
            event.notify_all()
            if round_index + staleness < rounds:
                learn_waits.append(event.wait_for(lambda: state["rewards"] > round_index + staleness, timeout=60))
        return real_learn(self, experience, round_index)

    monkeypatch.setattr(online_run.OnlineRun, "learn", learn)
    run(task, tmp_path / "overlap", staleness, reward=reward, rounds=rounds, eval_before_after=False)
    assert reward_waits == [True] * (rounds - staleness - 1) and learn_waits == [True] * (rounds - staleness)


def test_a_stopped_async_run_resumes_to_the_uninterrupted_runs_weights(task, tmp_path):
    common = dict(rounds=5, save_every=1, keep_last=10, epochs=2)
    straight = run(task, tmp_path / "straight", 2, **common)
    crash_in_round(4, lambda: run(task, tmp_path / "stopped", 2, **common))  # rounds 4 and 5 were sampled ahead
    assert (tmp_path / "stopped" / "checkpoints" / "step-00000003" / "inflight_rollouts.pt").exists()
    resumed = run(task, tmp_path / "stopped", 2, **common)
    assert [row["round"] for row in resumed.rounds] == [4, 5]
    assert_resumed_as_straight(tmp_path / "stopped", tmp_path / "straight")
    assert straight.summary["reward_final"] == resumed.summary["reward_final"]


# ---- under torchrun ----

CRASHING_WORKER = '''
import os
import sys
import threading
from pathlib import Path
import torch.distributed as dist
from alignkit.cli import main
from alignkit.online import run as online_run

crash = int(os.environ.get("CRASH_IN_ROUND", "0"))
learn = online_run.OnlineRun.learn

def crashing(self, experience, round_index):
    if round_index + 1 == crash:
        raise RuntimeError("stopped on purpose")
    return learn(self, experience, round_index)

online_run.OnlineRun.learn = crashing
gather = online_run.sampling.gather_objects

def checked_gather(value, ctx, group=None):  # a collective off the main thread must not share the learner's group
    if group is None and threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the producer thread gathered on the default group")
    return gather(value, ctx, group)

online_run.sampling.gather_objects = checked_gather
dist.init_process_group("gloo")
code = main(["online", "--config", sys.argv[1]])
dist.destroy_process_group()
raise SystemExit(code)
'''


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [{"max_staleness": 1}, {"max_staleness": 2, "partial": True}],
                         ids=["whole", "partial"])
def test_async_under_torchrun_stopped_and_resumed_equals_one_process(task, tmp_path, asynchronous):
    """Two ranks, max_staleness 1: the producer thread's exchange of the ranks' shares runs on a group of its own
    beside the learner's gradient all-reduce. Stopped in round 3 (round 3 already sampled ahead, in the checkpoint)
    and resumed, the run equals the uninterrupted one-process async run: rollouts, losses, final weights. Also with
    partial rollouts (max_staleness 2): each rank samples its share's segments, half-sampled rounds in its checkpoint."""
    model = copy.deepcopy(task.model)
    model.save_pretrained(tmp_path / "model")
    task.tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts(64, seed=31)])
    common = dict(rounds=4, prompts_per_round=8, epochs=1, minibatches=2, save_every=1, keep_last=10,
                  max_tokens_per_batch=200, sampling={"batch_size": 2}, **{"async": asynchronous})
    ddp = write_online_config(tmp_path, task, "ddp", **common)
    (tmp_path / "worker.py").write_text(CRASHING_WORKER)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(tmp_path / "worker.py"), ddp]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    stopped = subprocess.run(launch, env={**env, "CRASH_IN_ROUND": "3"}, capture_output=True, text=True, timeout=300)
    assert stopped.returncode != 0 and "stopped on purpose" in stopped.stderr + stopped.stdout
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000002" / "inflight_rollouts.pt").exists()
    resumed = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert main(["online", "--config", write_online_config(tmp_path, task, "single", **common)]) == 0
    n = asynchronous["max_staleness"]
    assert [row["staleness"] for row in read_metrics(tmp_path / "ddp")] == [min(r, n) for r in range(4)]
    assert_matches_one_process(tmp_path / "ddp", tmp_path / "single", rounds=4)

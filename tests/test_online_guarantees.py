"""Online training has what offline training has, through the same step (train/step.py): LR warmup and schedule, the
fused AdamW, on_nonfinite abort|skip, bf16 autocast, gradient checkpointing, LoRA (reference = adapters off), torchrun
DDP equal to one process, checkpoints every N rounds that resume exactly after a SIGKILL, and a resume with a changed
config refused, naming the keys. Also: loss options and dotted keys on `alignkit online`."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.config import SamplingOptions
from alignkit.data.load import write_jsonl_atomic
from alignkit.errors import AlignkitError, ConfigError
from alignkit.models.lora import is_peft
from alignkit.online import OnlineInputs, online_config, run_online
from alignkit.online import run as online_run
from alignkit.online.experience import Scorer
from alignkit.online.rollout import RolloutShape, generate_rollout
from alignkit.online.run import online_references
from alignkit.rewards.base import Reward
from alignkit.train.distributed import Dist
from alignkit.train.logging import read_metrics
from alignkit.train.packing import Packing
from alignkit.train.reference import score_examples
from alignkit.train.step import Stepper, lr_lambda
from synthetic_task import SENTIMENT, prompts

TIMING = ("time/", "samples_per_s", "tokens_per_s")


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny models run on one thread (tests/conftest.py)


def values(method: str, out, **overrides) -> dict:
    base = dict(method=method, model="tiny", prompts="-", output_dir=str(out), rounds=4, prompts_per_round=8,
                num_samples=4, max_new_tokens=10, max_length=64, max_tokens_per_batch=1024, max_tokens_per_row=512,
                learning_rate=1e-3, eval_samples=1, progress=False)
    return {**base, **overrides}


def run(task, method: str, out, model=None, reward=SENTIMENT, **overrides):
    cfg = online_config(values(method, out, **overrides))
    return run_online(cfg, model if model is not None else copy.deepcopy(task.model), task.tokenizer,
                      OnlineInputs(prompts(64, seed=31), prompts(8, seed=32), reward))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def rollout_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


def assert_matches_one_process(out: Path, single: Path, rounds: int = 3) -> None:
    """A run spread over processes (DDP ranks, Ray workers) against the one-process run: the same rollouts, the loss and
    gradient norm of every round, and the final weights, to float tolerance."""
    assert rollout_lines(out) == rollout_lines(single)
    ours, theirs = read_metrics(out), read_metrics(single)
    assert len(ours) == len(theirs) == rounds
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-5)
    final, expected = (load_file(d / "final" / "model.safetensors") for d in (out, single))
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=1e-5)


# ---- the schedule, the optimizer, the guards, precision, checkpointing ----


def test_online_steps_follow_the_warmup_and_schedule_with_the_fused_adamw(task, tmp_path):
    result = run(task, "grpo", tmp_path, rounds=4, epochs=2, lr_schedule="linear", warmup_steps=2)
    cfg = online_config(values("grpo", tmp_path, rounds=4, epochs=2, lr_schedule="linear", warmup_steps=2))
    factor = lr_lambda(cfg, 8)
    # each round runs 2 steps; a round logs the mean of its steps' rates (each the next step's, as offline)
    expected = [1e-3 * (factor(2 * r + 1) + factor(2 * r + 2)) / 2 for r in range(4)]
    assert [row["lr"] for row in result.rounds] == pytest.approx(expected, rel=1e-9)
    assert [row["updates"] for row in result.rounds] == [2, 2, 2, 2]
    stepper = Stepper.build(task.model, cfg, Dist(), 8)
    assert stepper.optimizer.defaults["fused"] is True  # the offline loop's fused AdamW, not the default one


class NaNOnce(Reward):
    """The task's reward, but NaN for every sample of the `bad`-th rollout (call 1 is the starting evaluation)."""

    def __init__(self, bad: int):
        self.calls, self.bad = 0, bad

    def score(self, prompts, responses):
        self.calls += 1
        return [math.nan if self.calls == self.bad else r for r in SENTIMENT(prompts, responses)]


def test_online_non_finite_step_is_skipped_or_aborts(task, tmp_path):
    with pytest.raises(AlignkitError, match="loss is nan"):
        run(task, "rloo", tmp_path / "abort", reward=NaNOnce(bad=3), rounds=3)
    model = copy.deepcopy(task.model)
    seen = []
    real = online_run.OnlineRun.round

    def spy(*args, **kwargs):  # the weights before each round
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(*args, **kwargs)

    online_run.OnlineRun.round = spy
    try:
        result = run(task, "rloo", tmp_path / "skip", model=model, reward=NaNOnce(bad=3), rounds=3,
                     on_nonfinite="skip")
    finally:
        online_run.OnlineRun.round = real
    rows = result.rounds
    assert rows[1]["skipped"] == 1 and "loss" not in rows[1] and rows[2]["skipped_steps"] == 1
    assert all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # round 2 changed nothing
    assert not all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])  # round 1 did train


def test_bf16_and_gradient_checkpointing_online(task, tmp_path):
    plain = run(task, "grpo", tmp_path / "fp32", rounds=2)
    checkpointed = run(task, "grpo", tmp_path / "gc", rounds=2, gradient_checkpointing=True)
    # recomputing activations changes nothing but memory: the same rollouts, losses and gradients
    assert rollout_lines(tmp_path / "gc") == rollout_lines(tmp_path / "fp32")
    for a, b in zip(checkpointed.rounds, plain.rounds):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                    rel=1e-4)
    bf16 = run(task, "grpo", tmp_path / "bf16", rounds=1, precision="bf16")
    first = bf16.rounds[0]
    # the same first rollout (sampling is not autocast), and a loss close to fp32's on it
    assert rollout_lines(tmp_path / "bf16")[0] == rollout_lines(tmp_path / "fp32")[0]
    assert math.isfinite(first["loss"]) and first["loss"] == pytest.approx(plain.rounds[0]["loss"], abs=0.02)
    assert first["grad_norm"] == pytest.approx(plain.rounds[0]["grad_norm"], rel=0.1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # an untied head; a head tied to the embedding, and biases
def test_bf16_reference_holds_bf16_matmul_weights_and_gives_the_same_bits_under_autocast(family):
    from alignkit.data.tokenize import TokenizedExample
    from alignkit.models.inference import frozen_copy
    from alignkit.models.tiny import build_tiny_model

    model = build_tiny_model(family, 97, seed=3)
    full, lean = frozen_copy(model), frozen_copy(model, "bf16")
    linears = [m for m in lean.modules() if isinstance(m, torch.nn.Linear)]
    tied = lean.get_output_embeddings().weight is lean.get_input_embeddings().weight
    assert tied == (family == "qwen2")
    for module in linears:  # each linear in bf16 but a head that is the embedding; the embedding and norms stay fp32
        expected = torch.float32 if tied and module is lean.get_output_embeddings() else torch.bfloat16
        assert {p.dtype for p in module.parameters()} == {expected}
    assert lean.get_input_embeddings().weight.dtype == torch.float32
    assert lean.model.norm.weight.dtype == torch.float32 and not any(p.requires_grad for p in lean.parameters())
    rng = random.Random(0)
    examples = [TokenizedExample([rng.randrange(4, 97) for _ in range(rng.randrange(3, 12))],
                                 [[rng.randrange(4, 97) for _ in range(rng.randrange(1, 9))] for _ in range(3)])
                for _ in range(6)]
    expected_seq, expected_tokens = score_examples(full, examples, Packing(64, None, 0, "bf16"))
    seq, tokens = score_examples(lean, examples, Packing(64, None, 0, "bf16"))
    assert torch.equal(seq, expected_seq) and all(torch.equal(a, b) for a, b in zip(tokens, expected_tokens))
    fp32_seq, _ = score_examples(full, examples, Packing(64, None, 0, "fp32"))
    assert not torch.equal(seq, fp32_seq)  # the comparison can tell: bf16 matmuls do change the numbers


def test_bf16_online_run_scores_its_reference_and_kl_under_autocast(task, tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(online_run, "online_references",
                        lambda *a, **k: made.append(online_references(*a, **k)) or made[-1])
    result = run(task, "grpo", tmp_path, rounds=1, precision="bf16", kl_coef=0.05)
    assert made[0][0].reference.lm_head.weight.dtype == torch.bfloat16  # the tiny Llama's head is its own
    # before its update the policy is the reference: under autocast their log-probs are the same bits, KL exactly 0
    assert result.rounds[0]["kl"] == 0.0 and result.rounds[0]["kl_k3"] == 0.0
    assert math.isfinite(result.summary["kl_to_start"]) and math.isfinite(result.rounds[0]["loss"])


def test_no_reference_copy_is_held_where_nothing_reads_one(task, tmp_path, monkeypatch):
    """kl_coef 0 and eval_before_after false: no loss term and no summary KL read a reference, so the run makes no
    frozen copy of the policy (TRL loads no ref model at beta 0), and trains exactly as the run that holds one."""
    made = []

    def made_with(read=None):
        def references(model, cfg, self_judge=False, read_=True):
            made.append(online_references(model, cfg, self_judge, read_ if read is None else read))
            return made[-1]
        return references

    monkeypatch.setattr(online_run, "online_references", made_with())
    run(task, "grpo", tmp_path / "lean", rounds=2, kl_coef=0.0, eval_before_after=False)
    run(task, "grpo", tmp_path / "kl", rounds=1, kl_coef=0.05, eval_before_after=False)
    run(task, "grpo", tmp_path / "summary", rounds=1, kl_coef=0.0)  # the summary's KL to the start
    monkeypatch.setattr(online_run, "online_references", made_with(read=True))  # as before: always a copy
    run(task, "grpo", tmp_path / "held", rounds=2, kl_coef=0.0, eval_before_after=False)
    assert made[0] == (None, None) and all(refs[0] is not None for refs in made[1:])
    assert without_timing(read_metrics(tmp_path / "lean")) == without_timing(read_metrics(tmp_path / "held"))
    final, expected = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("lean", "held"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_log_every_means_the_same_online_every_nth_round_and_the_last(task, tmp_path):
    result = run(task, "grpo", tmp_path, rounds=3, log_every=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 3]  # as offline: every 2nd step, and the last
    assert len(result.rounds) == 3 and [r["step"] for r in rollout_lines(tmp_path)] == [1, 2, 3]


def test_neftune_alpha_is_refused_online_by_name(task, tmp_path):
    """NEFTune noises the learner's inputs: the log-probs it trains would not be those the samples were scored
    with. Online takes 0, and says so instead of ignoring the key."""
    with pytest.raises(ConfigError, match="neftune_alpha"):
        run(task, "grpo", tmp_path, rounds=1, neftune_alpha=5.0)
    assert not (tmp_path / "config.json").exists()  # refused before anything is written


# ---- LoRA ----


def test_lora_online_trains_adapters_against_the_base_as_reference(task, tmp_path):
    start = copy.deepcopy(task.model)
    result = run(task, "grpo", tmp_path, rounds=3, lora={"r": 4, "alpha": 8, "save": "adapter"}, kl_coef=0.1,
                 learning_rate=5e-3)
    policy = result.model
    assert is_peft(policy)
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in policy.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in start.state_dict().items())  # the base never moved
    assert any(float(p.abs().sum()) > 0 for n, p in policy.named_parameters() if "lora_B" in n)  # adapters did
    # the reference of a LoRA run is the policy with its adapters off: exactly the starting model's log-probs
    cfg = online_config(values("grpo", tmp_path, lora={"r": 4}))
    rollout = generate_rollout(start, task.tokenizer, prompts(4, seed=5), SENTIMENT,
                               SamplingOptions(max_new_tokens=8), RolloutShape(2, 64, seed=1))
    scorer = Scorer(policy, policy, Packing.from_config(cfg, task.tokenizer))
    ref_seq, _ = scorer.reference(None, rollout.examples)
    start_seq, _ = score_examples(start, rollout.examples, Packing(1024, 512, task.tokenizer.pad_token_id))
    torch.testing.assert_close(ref_seq, start_seq, rtol=0, atol=1e-5)
    policy_seq, _ = scorer.behaviour(rollout.examples)
    assert not torch.allclose(policy_seq, start_seq, atol=1e-3)
    # the KL to the start is >= 0; its estimate on 8 samples may dip below 0, but not by 3 standard errors
    assert result.summary["kl_to_start"] > -3 * result.summary["kl_to_start_sem"]
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match="ref_update_every"):
        run(task, "online-dpo", tmp_path / "x", lora={"r": 4}, ref_update_every=1)


# ---- resume ----


def crash_in_round(n: int, start_run) -> None:
    """start_run() with the learner interrupted (KeyboardInterrupt) in round n, as a kill would."""
    real, calls = online_run.OnlineRun.learn, [0]

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    online_run.OnlineRun.learn = crashing
    try:
        with pytest.raises(KeyboardInterrupt):
            start_run()
    finally:
        online_run.OnlineRun.learn = real


@pytest.mark.parametrize("adam_moments", ["fp32", "bf16"])  # bf16: the value head's own group too
def test_ppo_crash_and_resume_restores_value_head_moments_and_optimizer(task, tmp_path, adam_moments):
    common = dict(rounds=4, save_every=1, epochs=2, keep_last=5, adam_moments=adam_moments)
    straight = run(task, "ppo", tmp_path / "straight", **common)
    crash_in_round(3, lambda: run(task, "ppo", tmp_path / "crashed", **common))
    assert sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()) == ["step-00000001",
                                                                                       "step-00000002"]
    resumed = run(task, "ppo", tmp_path / "crashed", **common)
    assert [r["round"] for r in resumed.rounds] == [3, 4]
    assert without_timing(read_metrics(tmp_path / "crashed")) == without_timing(read_metrics(tmp_path / "straight"))
    assert rollout_lines(tmp_path / "crashed") == rollout_lines(tmp_path / "straight")
    assert torch.equal(resumed.value_head.linear.weight, straight.value_head.linear.weight)
    final, expected = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("crashed", "straight"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert resumed.summary["reward_start"] == straight.summary["reward_start"]  # the saved starting evaluation
    saved = torch.load(tmp_path / "crashed" / "checkpoints" / "step-00000003" / "trainer.pt", weights_only=True)
    dtypes = {state[key].dtype for state in saved["optimizer"]["state"].values() for key in ("exp_avg", "exp_avg_sq")}
    assert dtypes == {torch.bfloat16 if adam_moments == "bf16" else torch.float32}


def write_online_config(root: Path, task, name: str, **overrides) -> str:
    settings = {"rounds": 8, "prompts_per_round": 16, "save_every": 1, "epochs": 2, **overrides}
    config = values("grpo", root / name, model=str(root / "model"), prompts=str(root / "prompts.jsonl"),
                    reward="synthetic", **settings)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def kill_at_a_random_round(config: str, out: Path, rounds: int, env: dict | None = None) -> int:
    """`alignkit online --config config` in a subprocess, SIGKILLed once a random round in 2..5 is logged; the rounds
    logged by then."""
    kill_after = random.randint(2, 5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    job = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "online", "--config", config], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240

    def logged():
        try:
            return sum(1 for line in metrics.read_text().splitlines() if line.endswith("}"))
        except FileNotFoundError:
            return 0

    while logged() < kill_after and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    job.send_signal(signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL, f"the run ended before the kill (round {kill_after}):\n{stderr[-3000:]}"
    killed_at = logged()
    assert kill_after <= killed_at < rounds and not (out / "final").exists()
    return killed_at


def assert_resumed_exactly(killed: Path, straight: Path, rounds: int, killed_at: int) -> None:
    """The resumed run logged every round once, the same numbers, rollouts and final weights as the straight one."""
    resumed, expected = read_metrics(killed), read_metrics(straight)
    assert [r["step"] for r in resumed] == list(range(1, rounds + 1)), f"killed after round {killed_at}"
    assert without_timing(resumed) == without_timing(expected), f"killed after round {killed_at}"
    assert rollout_lines(killed) == rollout_lines(straight)  # the same sampled texts
    for file in sorted(p.name for p in (straight / "final").glob("*.safetensors")):
        final, reference = (load_file(d / "final" / file) for d in (killed, straight))
        assert all(torch.equal(final[k], reference[k]) for k in reference), f"killed after round {killed_at}: {file}"


@pytest.mark.slow
def test_online_sigkill_at_a_random_round_then_resume_is_exact(task, tmp_path):
    model = copy.deepcopy(task.model)
    model.config.attention_dropout = 0.1  # training draws random numbers: resuming must restore the RNG too
    model.save_pretrained(tmp_path / "model")
    task.tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts(64, seed=31)])
    config = write_online_config(tmp_path, task, "killed")
    killed_at = kill_at_a_random_round(config, tmp_path / "killed", 8)
    assert main(["online", "--config", config]) == 0  # resumes
    assert main(["online", "--config", write_online_config(tmp_path, task, "straight", save_every=0)]) == 0
    assert_resumed_exactly(tmp_path / "killed", tmp_path / "straight", 8, killed_at)


def three_round_run(task, tmp_path) -> str:
    """A finished 3-round online run in tmp_path/run (checkpoints of rounds 1 and 2 left); its config file."""
    model = copy.deepcopy(task.model)
    model.save_pretrained(tmp_path / "model")
    task.tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts(64, seed=31)])
    config = write_online_config(tmp_path, task, "run", rounds=3, prompts_per_round=4)
    assert main(["online", "--config", config]) == 0
    return config


def test_a_resume_with_a_changed_config_is_refused_naming_the_keys(task, tmp_path, capsys):
    config = three_round_run(task, tmp_path)
    saved = (tmp_path / "run" / "config.json").read_text()
    assert main(["online", "--config", config, "--kl_coef", "0.2", "--seed", "3", "--progress", "true"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "changed: loss_options.kl_coef, seed" in err and "progress" not in err.split("changed:")[1]
    assert (tmp_path / "run" / "config.json").read_text() == saved  # nothing rewritten
    assert main(["online", "--config", config, "--log_every", "2"]) == 0  # bookkeeping keys may change


def test_a_run_saved_before_a_key_existed_resumes_when_the_key_keeps_its_default(task, tmp_path, capsys):
    config = three_round_run(task, tmp_path)
    saved_path = tmp_path / "run" / "config.json"
    saved = json.loads(saved_path.read_text())
    del saved["turn_credit"], saved["sampling"]["top_k"]  # keys an older version did not write
    saved_path.write_text(json.dumps(saved))
    assert main(["online", "--config", config]) == 0  # absent = the default: the same run
    saved_path.write_text(json.dumps(saved))
    assert main(["online", "--config", config, "--top_k", "5"]) == 2  # absent is not "anything"
    assert "changed: sampling.top_k" in capsys.readouterr().err.replace("\n", " ")


def test_an_offline_resume_with_a_changed_config_is_refused(tmp_path, capsys):
    from alignkit.data.synthetic import VOCABULARY, preference_records
    from alignkit.models.tiny import build_tiny_model, build_word_tokenizer

    tokenizer = build_word_tokenizer(VOCABULARY)
    build_tiny_model("llama", len(tokenizer), hidden=32, layers=1).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(16, seed=1))
    args = ["dpo", "--model", str(tmp_path / "model"), "--train_data", str(tmp_path / "pairs.jsonl"), "--output_dir",
            str(tmp_path / "run"), "--max_steps", "3", "--save_every", "1", "--max_tokens_per_batch", "80",
            "--ref_cache", "false", "--progress", "false"]
    assert main(args) == 0
    assert main([*args, "--beta", "0.3", "--max_tokens_per_batch", "160"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "changed: loss_options.beta, max_tokens_per_batch" in err


# ---- the config vocabulary ----


def test_loss_options_and_dotted_keys_on_alignkit_online(tmp_path, capsys):
    cfg = online_config(None, {"method": "grpo", "model": "m", "prompts": "p", "kl_coef": 0.1, "epsilon_high": 0.28,
                               "sampling.temperature": 0.7, "top_p": 0.9, "lora.r": 4})
    assert cfg.loss_options == {"kl_coef": 0.1, "epsilon_high": 0.28}
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.lora.r) == (0.7, 0.9, 4)
    # ppo's options are ppo's, not grpo's
    assert online_config(None, {"method": "ppo", "model": "m", "prompts": "p", "vf_coef": 0.5}).loss_options == {
        "vf_coef": 0.5}
    common = ["online", "--method", "grpo", "--model", "m", "--prompts", "p", "--output_dir", str(tmp_path / "o")]
    assert main([*common, "--vf_coef", "0.5"]) == 2  # a ppo option is unknown to grpo
    assert "'vf_coef': unknown key" in capsys.readouterr().err
    assert main([*common, "--sampling.temprature", "0.5"]) == 2
    assert "'sampling.temprature': unknown key" in capsys.readouterr().err
    assert main([*common, "--generation_batch_size", "4"]) == 2
    assert "renamed: use sampling.batch_size" in capsys.readouterr().err
    assert main([*common, "--kl_coef", "nan"]) == 2
    assert "kl_coef" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["online", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--sampling.temperature" in out and "--lr_schedule" in out and "--lora" in out


# ---- several processes ----

WORKER = '''
import sys
import torch.distributed as dist
from alignkit.cli import main

dist.init_process_group("gloo")
if main(["online", "--config", sys.argv[1]]) != 0:
    raise SystemExit("online failed")
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_online_ddp_two_processes_equal_one(task, tmp_path):
    model = copy.deepcopy(task.model)
    model.save_pretrained(tmp_path / "model")
    task.tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts(64, seed=31)])
    # each rank samples 4 of the round's 8 prompts, in generate calls of 2 prompts seeded by their place in the round
    common = dict(rounds=3, prompts_per_round=8, epochs=1, minibatches=2, save_every=0, max_tokens_per_batch=200,
                  sampling={"batch_size": 2})
    ddp = write_online_config(tmp_path, task, "ddp", **common)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "worker.py"), ddp], env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    assert main(["online", "--config", write_online_config(tmp_path, task, "single", **common)]) == 0
    assert_matches_one_process(tmp_path / "ddp", tmp_path / "single")


@pytest.mark.parametrize("method", ["grpo", "dapo"])
def test_online_micro_batch_size_does_not_change_the_step(task, tmp_path, method):
    """A learner cut into micro-batches (max_tokens_per_batch, the memory lever) trains the same weights as one
    pass over the round: seq-mean (grpo) and token-mean (dapo) losses both accumulate exactly."""
    whole = run(task, method, tmp_path / "whole", rounds=2, max_tokens_per_batch=4096)
    cut = run(task, method, tmp_path / "cut", rounds=2, max_tokens_per_batch=60)
    assert rollout_lines(tmp_path / "whole") == rollout_lines(tmp_path / "cut")
    for key in ("loss", "grad_norm"):  # the gradient's scale too (Adam's update would hide it)
        assert [row[key] for row in cut.rounds] == pytest.approx([row[key] for row in whole.rounds], rel=1e-5, abs=1e-6)
    moved = 0.0
    for (name, a), (_, b), (_, start) in zip(cut.model.state_dict().items(), whole.model.state_dict().items(),
                                             task.model.state_dict().items()):
        # float summation order, scaled by Adam's 1/sqrt(v) where a gradient is near 0: < 1 % of the update
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=name)
        moved = max(moved, float((b - start).abs().max()))
    assert moved > 1e-3  # the runs trained (two Adam steps of lr 1e-3)


# ---- with an environment: multi-turn conversations ----

TESTS = Path(__file__).parent
ENV_PATH = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}  # envs_support


def write_environment_run(root: Path) -> None:
    """A tiny random chat policy and four records for envs_support's TRL-style Notebook environment (a tool, a reply
    to each malformed call, no reward of its own: word_count scores the last answer)."""
    from envs_support import chat_model, chat_tokenizer

    tokenizer = chat_tokenizer()
    chat_model(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl_atomic(root / "prompts.jsonl", [{"prompt": [{"role": "user", "content": q}]} for q in
                                                ["what is two", "what is three", "what is five", "hello what"]])


def write_environment_config(root: Path, name: str, **overrides) -> str:
    config = {"method": "ppo", "model": str(root / "model"), "prompts": str(root / "prompts.jsonl"),
              "environment": "envs_support:Notebook", "max_turns": 3, "reward": "envs_support:word_count",
              "rounds": 6, "prompts_per_round": 4, "num_samples": 3, "learning_rate": 1e-3, "max_length": 256,
              "sampling": {"max_new_tokens": 8, "engine": "hf"}, "eval_samples": 2, "seed": 0, "progress": False,
              "save_every": 1, "output_dir": str(root / name), **overrides}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_online_ddp_with_an_environment_two_processes_equal_one(tmp_path):
    """PPO on conversations of 1 to 3 turns: each rank talks through its 2 records' 6 conversations, in generate calls
    of 3 (a multiple of which each rank's share is), and the ranks learn together; one process does it all."""
    write_environment_run(tmp_path)
    common = dict(rounds=3, save_every=0, environment="envs_support:Parity", max_tokens_per_batch=100, sampling={"max_new_tokens": 8, "engine": "hf",
                                                                              "batch_size": 3})
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **ENV_PATH}
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "worker.py"), write_environment_config(tmp_path, "ddp", **common)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    assert main(["online", "--config", write_environment_config(tmp_path, "single", **common)]) == 0
    assert rollout_lines(tmp_path / "ddp") == rollout_lines(tmp_path / "single")  # the same conversations
    ours, theirs = without_timing(read_metrics(tmp_path / "ddp")), without_timing(read_metrics(tmp_path / "single"))
    assert len(ours) == len(theirs) == 3 and all(1 < r["turns"] < 3 for r in theirs)  # some ran on, some ended
    for a, b in zip(ours, theirs):  # every logged number
        assert sorted(a) == sorted(b)
        for key, value in b.items():
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["step"], key)
    for file in ("model.safetensors", "value_head.safetensors"):
        final, expected = (load_file(tmp_path / n / "final" / file) for n in ("ddp", "single"))
        for key in expected:
            torch.testing.assert_close(final[key], expected[key], rtol=0, atol=1e-5, msg=f"{file}: {key}")


@pytest.mark.slow
def test_online_sigkill_with_an_environment_then_resume_is_exact(tmp_path):
    write_environment_run(tmp_path)
    config = write_environment_config(tmp_path, "killed")
    killed_at = kill_at_a_random_round(config, tmp_path / "killed", 6, ENV_PATH)
    assert main(["online", "--config", config]) == 0  # resumes
    assert main(["online", "--config", write_environment_config(tmp_path, "straight", save_every=0)]) == 0
    assert max(r["turns"] for r in read_metrics(tmp_path / "straight")) > 1
    assert_resumed_exactly(tmp_path / "killed", tmp_path / "straight", 6, killed_at)

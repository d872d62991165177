"""The training loop end to end on a tiny Llama and the synthetic review task: DPO learns the held-out
preferences, the final checkpoint reloads with transformers, an interrupted run resumes exactly (also past a
corrupted checkpoint), the reference log-probs cache hits and misses when it should, gradient accumulation gives
the same update as one big batch, and epochs visit every example once per epoch."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.pack import pack
from alignkit.data.synthetic import VOCABULARY, preference_records, sft_records
from alignkit.models.attention import attention_implementation, set_attention
from alignkit.models.logprobs import response_logprobs
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train import loop, reference
from alignkit.train.logging import read_metrics
from alignkit.train.loop import plan_steps, train
from alignkit.train.method import Method
from alignkit.train.packing import Packing

TOKENIZER = build_word_tokenizer(VOCABULARY)
COMMON = dict(model="tiny", max_length=64, max_tokens_per_row=512, progress=False, seed=0)


def tiny_llama(seed: int = 0):
    return build_tiny_model("llama", len(TOKENIZER), seed=seed, hidden=32, layers=2, heads=4)


def write_pairs(path: Path, n: int, seed: int) -> str:
    write_jsonl_atomic(path, preference_records(n, seed))
    return str(path)


def dpo_config(out: Path, train_data: str, **values) -> TrainConfig:
    settings = {**COMMON, "loss": "dpo", "loss_options": {"beta": 0.1}, "learning_rate": 2e-3, "ref_cache": False,
                "max_tokens_per_batch": 400, **values}
    return TrainConfig(train_data=train_data, output_dir=str(out), **settings)


def step_values(rows: list[dict]) -> list[tuple]:
    """What must repeat exactly in a resumed run (timings are left out)."""
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["rewards/margins"]) for r in rows]


def assert_same_weights(model_a, model_b, atol: float = 0.0) -> None:
    state_b = model_b.state_dict()
    for name, tensor in model_a.state_dict().items():
        torch.testing.assert_close(tensor, state_b[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- (a) + (b): SFT then DPO learns; the final checkpoint reloads ----


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_dpo")
    write_jsonl_atomic(root / "sft.jsonl", sft_records(200, seed=0))
    model = tiny_llama()
    sft = TrainConfig(train_data=str(root / "sft.jsonl"), loss="sft", learning_rate=3e-3, warmup_steps=2,
                      max_tokens_per_batch=1024, output_dir=str(root / "sft"), **COMMON)
    model = loop.train(sft, model, TOKENIZER).model
    dpo = dpo_config(root / "dpo", write_pairs(root / "train.jsonl", 300, seed=1), max_tokens_per_batch=1024,
                     eval_data=write_pairs(root / "eval.jsonl", 100, seed=2), warmup_steps=2, eval_every=4)
    return loop.train(dpo, model, TOKENIZER), root


def test_dpo_learns_heldout_preferences(trained):
    result, root = trained
    rows = read_metrics(root / "dpo")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # step 1: the policy is the reference, every margin is 0, so the loss is log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/accuracy"] == pytest.approx(0.5)
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    assert len(evals) >= 2 and evals[-1]["step"] == rows[-1]["step"]
    assert result.final_metrics["eval/rewards/accuracy"] >= 0.75
    assert result.final_metrics["eval/rewards/margins"] > 0
    assert rows[-1]["loss"] < math.log(2)


def test_final_checkpoint_reloads_with_identical_logprobs(trained):
    result, root = trained
    final = root / "dpo" / "final"
    state = json.loads((final / "training_state.json").read_text())  # the model card's facts, for programs
    assert state["loss"] == "dpo" and state["final_metrics"]["loss"] == result.final_metrics["loss"]
    assert (final / "README.md").read_text().startswith("---\nbase_model:")
    reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    set_attention(reloaded, attention_implementation(result.model))  # the same kernel: equal to the last bit
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert_same_weights(result.model, reloaded)

    examples = prepare_examples(str(root / "eval.jsonl"), tokenizer, ExampleSettings("pairs", max_length=64))[:16]
    assert examples == prepare_examples(str(root / "eval.jsonl"), TOKENIZER,
                                        ExampleSettings("pairs", max_length=64))[:16]
    batch = pack(examples, max_tokens_per_row=512, pad_token_id=tokenizer.pad_token_id)
    result.model.eval()
    with torch.no_grad():
        ours, theirs = response_logprobs(result.model, batch), response_logprobs(reloaded, batch)
    torch.testing.assert_close(theirs.token_logps, ours.token_logps, rtol=0, atol=1e-6)
    torch.testing.assert_close(theirs.seq_logps, ours.seq_logps, rtol=0, atol=1e-6)


# ---- (c) exact resume ----


class Interrupt(Exception):
    pass


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Raise inside the `step`-th call of Method.forward (one call per step with grad_accum=1, no eval)."""
    real = Method.forward
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise Interrupt(f"stopped in step {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(Method, "forward", counting)


def test_resume_is_exact_and_skips_a_corrupted_checkpoint(tmp_path, monkeypatch, caplog):
    data = write_pairs(tmp_path / "pairs.jsonl", 80, seed=3)
    settings = dict(max_steps=6, save_every=2, keep_last=2, max_tokens_per_batch=200)

    straight = loop.train(dpo_config(tmp_path / "straight", data, **settings), tiny_llama(), TOKENIZER)
    expected = step_values(read_metrics(tmp_path / "straight"))
    assert [s[0] for s in expected] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "straight" / "checkpoints").exists() or len(
        list((tmp_path / "straight" / "checkpoints").glob("step-*"))) <= 2

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 6)  # steps 1-5 done and logged, checkpoints at 2 and 4
        with pytest.raises(Interrupt):
            loop.train(dpo_config(interrupted, data, **settings), tiny_llama(), TOKENIZER)
    assert [r["step"] for r in read_metrics(interrupted)] == [1, 2, 3, 4, 5]
    checkpoints = sorted(p.name for p in (interrupted / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-00000002", "step-00000004"]
    corrupted = tmp_path / "corrupted"
    shutil.copytree(interrupted, corrupted)

    # resume: a fresh model (same initial weights, so the same reference); the loop restores the rest
    with caplog.at_level(logging.INFO, logger="alignkit.train"):
        resumed = loop.train(dpo_config(interrupted, data, **settings), tiny_llama(), TOKENIZER)
    assert "step 4" in caplog.text
    assert step_values(read_metrics(interrupted)) == expected  # step 5 re-run and logged once
    assert_same_weights(resumed.model, straight.model)

    # the newest checkpoint is truncated: fall back to step 2, with a warning, and still end identical
    weights = corrupted / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignkit.train"):
        fallback = loop.train(dpo_config(corrupted, data, **settings), tiny_llama(), TOKENIZER)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000004" in r.getMessage() and "unreadable" in r.getMessage() for r in warnings)
    assert "step 2" in caplog.text
    assert step_values(read_metrics(corrupted)) == expected
    assert_same_weights(fallback.model, straight.model)


# ---- (d) reference log-probs cache ----


class Recomputed(Exception):
    pass


def test_reference_cache_hits_and_misses(tmp_path, monkeypatch, private_cache):
    data = write_pairs(tmp_path / "pairs.jsonl", 24, seed=4)

    def run(name: str, model_seed: int = 0, train_data: str = data, **values):
        cfg = dpo_config(tmp_path / name, train_data, ref_cache=True, max_steps=1, **values)
        return loop.train(cfg, tiny_llama(model_seed), TOKENIZER)

    first = run("first")
    cached = list((private_cache / "ref_logps").glob("*.safetensors"))
    assert len(cached) == 1

    def fail(*args, **kwargs):
        raise Recomputed

    monkeypatch.setattr(reference, "score_examples", fail)
    second = run("second")  # same weights, data and tokenisation: served from the cache
    assert read_metrics(tmp_path / "second")[0]["loss"] == read_metrics(tmp_path / "first")[0]["loss"]
    assert_same_weights(first.model, second.model)

    with pytest.raises(Recomputed):
        run("weights", model_seed=1)
    with pytest.raises(Recomputed):
        run("data", train_data=write_pairs(tmp_path / "other.jsonl", 24, seed=5))
    with pytest.raises(Recomputed):
        run("truncated", max_length=10)  # prompt 4 + response 8 tokens: responses are cut, token ids change
    with pytest.raises(Recomputed):
        run("bf16", precision="bf16")
    assert len(list((private_cache / "ref_logps").glob("*.safetensors"))) == 1


def test_reference_cache_values_equal_a_fresh_computation(tmp_path):
    examples = prepare_examples(write_pairs(tmp_path / "pairs.jsonl", 12, seed=6), TOKENIZER,
                                ExampleSettings("pairs", 64))
    model = tiny_llama()
    args = (Packing(200, 512, 0),)
    fresh_seq, fresh_tokens = reference.score_examples(model, examples, *args)
    stored = reference.reference_logps(model, examples, *args)
    hit_seq, hit_tokens = reference.reference_logps(model, examples, *args)
    for seq, tokens in (stored, (hit_seq, hit_tokens)):
        torch.testing.assert_close(seq, fresh_seq, rtol=0, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(tokens, fresh_tokens))
    assert [len(t) for t in hit_tokens] == [sum(len(r) for r in e.response_ids) for e in examples]


# ---- (e) gradient accumulation ----


def test_grad_accum_equals_one_big_batch(tmp_path):
    # Every synthetic pair is 20 tokens (prompt 4, responses 7 words + EOS), so 8 pairs fill one 160-token
    # batch, or two 80-token micro-batches: the first (only) optimizer step sees the same 8 examples.
    data = write_pairs(tmp_path / "pairs.jsonl", 8, seed=7)
    examples = prepare_examples(data, TOKENIZER, ExampleSettings("pairs", 64))
    assert {e.num_tokens for e in examples} == {20}
    big = dpo_config(tmp_path / "big", data, max_steps=1, max_tokens_per_batch=160, grad_accum=1)
    small = dpo_config(tmp_path / "small", data, max_steps=1, max_tokens_per_batch=80, grad_accum=2)
    assert [len(mb) for mb in loop.plan_steps(examples, big)[0]] == [8]
    assert [len(mb) for mb in loop.plan_steps(examples, small)[0]] == [4, 4]

    start = tiny_llama()
    one = loop.train(big, tiny_llama(), TOKENIZER)
    two = loop.train(small, tiny_llama(), TOKENIZER)
    start_state = start.state_dict()
    moved = max(float((value - start_state[name]).abs().max()) for name, value in one.model.state_dict().items())
    assert moved > 1e-4  # the step did change the weights
    assert_same_weights(one.model, two.model, atol=1e-6)
    big_row, small_row = read_metrics(tmp_path / "big")[0], read_metrics(tmp_path / "small")[0]
    assert small_row["loss"] == pytest.approx(big_row["loss"], abs=1e-6)
    assert small_row["grad_norm"] == pytest.approx(big_row["grad_norm"], rel=1e-5)
    assert small_row["examples"] == big_row["examples"] == 8


def test_epochs_visit_every_example_once_per_epoch_in_a_new_order(task, tmp_path, one_thread):
    """epochs: 2 plans each example once per epoch, reshuffled; the run's first epoch is the one-epoch run, bit for
    bit, and the second continues from it."""
    write_jsonl_atomic(tmp_path / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                  for r in preference_records(12, seed=9)])
    common = dict(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), loss="dpo", learning_rate=1e-2,
                  lr_schedule="constant", max_length=64, max_tokens_per_batch=100, progress=False, ref_cache=False)
    two = TrainConfig(epochs=2, output_dir=str(tmp_path / "two"), **common)
    steps = plan_steps(_examples(two, task.tokenizer), two)
    flat = [i for step in steps for mb in step for i in mb]
    assert sorted(flat) == sorted(list(range(12)) * 2)
    half = len(flat) // 2
    assert sorted(flat[:half]) == sorted(flat[half:]) == list(range(12)) and flat[:half] != flat[half:]
    rows = {}
    for name, epochs in (("one", 1), ("two", 2)):
        cfg = TrainConfig(epochs=epochs, output_dir=str(tmp_path / name), **common)
        train(cfg, copy.deepcopy(task.model), task.tokenizer)
        rows[name] = read_metrics(tmp_path / name)
    assert len(rows["two"]) == 2 * len(rows["one"]) == len(steps)
    assert [r["loss"] for r in rows["two"][:len(rows["one"])]] == [r["loss"] for r in rows["one"]]
    assert sum(r["examples"] for r in rows["two"]) == 24


def _examples(cfg, tokenizer):
    return prepare_examples(cfg.train_data, tokenizer, ExampleSettings("pairs", cfg.max_length))

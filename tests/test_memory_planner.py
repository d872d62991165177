"""The memory planner (`max_memory_gb`, train/memory.py): each step's micro-batches are cut to what the budget
allows and keep their examples in order; the training run then never keeps more than the budget (weights,
gradients and AdamW moments plus every tensor autograd holds for backward, counted by a saved-tensors hook on the
real run), where the unplanned run of the same step does; and the losses and weights are the unplanned run's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.config import TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train import loop, memory
from alignkit.train.logging import read_metrics
from alignkit.train.method import Method

WORDS = [f"w{i}" for i in range(60)]
TOKENIZER = build_word_tokenizer(WORDS)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=5), min_size=1, max_size=3), min_size=1,
                max_size=4), st.integers(9, 30))
def test_split_to_budget_keeps_each_steps_examples_in_order_under_the_budget(step_sizes, budget):
    examples, steps = [], []
    for micro_sizes in step_sizes:
        step = []
        for sizes in micro_sizes:
            step.append(list(range(len(examples), len(examples) + len(sizes))))
            examples += [TokenizedExample([1] * (n - 1) or [1], [[2]]) for n in sizes]
        steps.append(step)
    planned = memory.split_to_budget(steps, examples, budget)
    assert len(planned) == len(steps)
    for before, after in zip(steps, planned):
        assert [i for mb in after for i in mb] == [i for mb in before for i in mb]
        assert all(sum(examples[i].num_tokens for i in mb) <= budget for mb in after)
        assert all(mb for mb in after)
    with pytest.raises(ConfigError, match="max_memory_gb"):
        memory.split_to_budget([[[0]]], [TokenizedExample([1] * 40, [[2]])], 30)


def test_static_bytes_are_weights_plus_gradients_and_two_fp32_moments_of_the_trainable():
    model = build_tiny_model("llama", 64, seed=0, hidden=32, layers=1)
    n = sum(p.numel() for p in model.parameters())
    assert memory.static_bytes(model) == 4 * n + 12 * n
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    frozen = model.model.embed_tokens.weight.numel()
    assert memory.static_bytes(model) == 4 * n + 12 * (n - frozen)
    with pytest.raises(ConfigError, match="optimizer state alone"):
        memory.micro_batch_tokens(memory.static_bytes(model) / 2e9, model, 100.0)


def test_a_planned_run_stays_in_its_budget_and_equals_the_unplanned_run(tmp_path, one_thread, monkeypatch):
    import random

    rng = random.Random(0)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    write_jsonl_atomic(tmp_path / "pairs.jsonl", [{"prompt": words(300), "chosen": words(20), "rejected": words(25)}
                                                  for _ in range(8)])
    model = build_tiny_model("llama", len(TOKENIZER), seed=0, hidden=128, layers=2, heads=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    peaks = {}
    real = Method.forward

    def tracked(name):
        def compute(*args, **kwargs):
            with memory.SavedBytes(args[1].parameters()) as saved:  # args: method, model, ...
                out = real(*args, **kwargs)
            peaks[name] = max(peaks.get(name, 0), saved.bytes)
            return out
        return compute

    budget = memory.static_bytes(model) / 1e9 + 0.02  # room for ~1-2 of these 345-token pairs' activations
    finals, rows = {}, {}
    for name, extra in (("unplanned", {}), ("planned", {"max_memory_gb": budget})):
        monkeypatch.setattr(Method, "forward", tracked(name))
        model.load_state_dict(start)
        cfg = TrainConfig(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), loss="dpo", learning_rate=1e-3,
                          max_length=400, max_tokens_per_batch=8 * 400, max_steps=1, ref_cache=False, progress=False,
                          output_dir=str(tmp_path / name), **extra)
        finals[name] = {k: v.clone() for k, v in loop.train(cfg, model, TOKENIZER).model.state_dict().items()}
        rows[name] = read_metrics(tmp_path / name)
    static = memory.static_bytes(model)
    assert static + peaks["unplanned"] > budget * 1e9  # one pass over all 8 pairs would not fit ...
    assert static + peaks["planned"] <= budget * 1e9  # ... the planned passes do
    assert rows["planned"][0]["examples"] == rows["unplanned"][0]["examples"] == 8  # the same step
    assert rows["planned"][0]["loss"] == pytest.approx(rows["unplanned"][0]["loss"], abs=1e-6)
    for key, value in finals["unplanned"].items():
        torch.testing.assert_close(finals["planned"][key], value, rtol=1e-5, atol=1e-5)  # Adam: lr 1e-3 steps


FRAGMENTS = """
import sys, torch
from alignkit.train.memory import release_freed_memory, trim_freed_memory
if sys.argv[1] == "release":
    assert release_freed_memory()
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
base = rss_mb()
big = torch.ones(5 * 2**20)  # 20 MB, mmapped, then freed: glibc raises its mmap threshold to 20 MB
del big
tensors = [torch.ones(2**20 + 2**12 + i) for i in range(60)]  # 60 activations just over 4 MiB
last = tensors[-1]
del tensors  # all freed but the last
if sys.argv[1] == "trim":
    assert trim_freed_memory()
print(rss_mb() - base)
"""


def test_release_memory_hands_freed_activations_back_to_the_os():
    """glibc's default keeps the freed ~240 MB in its heap (under the last block); held threshold: back at once;
    malloc_trim: back when called."""
    def kept_mb(mode):
        out = subprocess.run([sys.executable, "-c", FRAGMENTS, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert kept_mb("default") > 200
    assert kept_mb("release") < 30
    assert kept_mb("trim") < 30  # malloc_trim after the fact (online rounds, once per round) returns them too


def test_release_memory_is_on_where_the_run_asks_for_less_memory():
    """By default the threshold is held only with checkpointing or a memory budget (it costs page faults); an
    explicit setting wins either way."""
    from alignkit.config import TrainConfig
    from alignkit.online import online_config
    from alignkit.train.step import release_memory

    def cfg(**kw):
        return TrainConfig(**{"model": "tiny", "train_data": "x.jsonl", "output_dir": "out", **kw})

    assert not release_memory(cfg())
    assert release_memory(cfg(gradient_checkpointing=True))
    assert release_memory(cfg(max_memory_gb=4.0))
    assert not release_memory(cfg(gradient_checkpointing=True, release_memory=False))
    assert release_memory(cfg(release_memory=True))
    assert not release_memory(online_config({"method": "grpo", "model": "tiny", "prompts": "-", "output_dir": "o"}))

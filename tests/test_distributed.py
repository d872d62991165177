"""Several processes (torchrun, gloo on CPU): DDP and FSDP2 give the per-step losses and final weights of one
process on the same global batches; steps are shared out evenly across ranks; an FSDP2 run interrupted after a
checkpoint resumes to the same end; options work and the documented refusals are one line per rank under two
processes; in one process every distributed helper is a no-op. One torchrun launch per group of scenarios
(tests/distributed_worker.py) records each scenario's outcome, which its own test checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from alignkit.api import build_config
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.errors import AlignkitError
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train import distributed, loop
from alignkit.train.logging import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tokenizer = build_word_tokenizer(VOCABULARY)
    model = build_tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl_atomic(root / "pairs.jsonl", preference_records(32, seed=1))  # 20 tokens per pair
    return root


def write_config(root: Path, name: str, **values) -> str:
    # 4 pairs per 80-token micro-batch, 2 micro-batches (8 pairs) per step, 4 steps.
    base = dict(model=str(root / "model"), train_data=str(root / "pairs.jsonl"), loss="dpo", learning_rate=2e-3,
                ref_cache=False, max_length=64, max_tokens_per_row=512, max_tokens_per_batch=80, grad_accum=2,
                max_steps=4, progress=False)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**base, "output_dir": str(root / name), **values}))
    return str(path)


def one_process(config: str):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the same kernels, so the same rounding
    try:
        return loop.train(build_config(config=config))
    finally:
        torch.set_num_threads(threads)


def assert_same_run(root: Path, name: str, reference: str, atol: float) -> None:
    ours, theirs = read_metrics(root / name), read_metrics(root / reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=atol), (name, a["step"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=atol), (name, a["step"])
        assert a["examples"] == b["examples"] == 8
    assert_same_final(root, name, reference, atol)


def assert_same_final(root: Path, name: str, reference: str, atol: float) -> None:
    """The same safetensors files in both final/ folders, with the same tensors."""
    files = sorted(p.name for p in (root / reference / "final").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (root / name / "final").glob("*.safetensors"))
    for file in files:
        final, expected = load_file(root / name / "final" / file), load_file(root / reference / "final" / file)
        assert sorted(final) == sorted(expected)
        for key in expected:
            torch.testing.assert_close(final[key], expected[key], rtol=0, atol=atol, msg=f"{name}: {key}")


@dataclass
class Launch:
    """One torchrun launch of tests/distributed_worker.py: two processes run its scenarios in turn."""

    out: Path
    run: subprocess.CompletedProcess

    def outcomes(self, scenario: str, expected_exit: int | str) -> list[dict]:
        """Each rank's outcome of one scenario, once both ranks are seen to exit as expected."""
        paths = [self.out / f"{scenario}.rank{rank}.json" for rank in range(2)]
        assert all(p.exists() for p in paths), f"{scenario} did not run: {self.run.stdout[-3000:]}{self.run.stderr[-6000:]}"
        outcomes = [json.loads(p.read_text()) for p in paths]
        assert [o["exit"] for o in outcomes] == [expected_exit] * 2, "".join(o["error"] or o["stderr"][-6000:]
                                                                             for o in outcomes)
        return outcomes


def launch(root: Path, name: str, scenarios: dict[str, str], timeout: int) -> Launch:
    """Runs the scenarios ({name: "command:config.yaml"}) in the same two processes, once for the module."""
    out = root / name
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ALIGNKIT_CACHE": str(root / "cache")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(Path(__file__).with_name("distributed_worker.py")), str(out),
                          *(f"{scenario}={spec}" for scenario, spec in scenarios.items())],
                         env=env, capture_output=True, text=True, timeout=timeout)
    return Launch(out, run)


@pytest.fixture(scope="module")
def reference_run(setup):
    """One process's run of a config, made once for the module however many tests compare with it."""
    done = set()

    def run(name: str, **values) -> None:
        if name not in done:
            one_process(write_config(setup, name, **values))
            done.add(name)
    return run


# ---- two processes equal one ----

SPLIT = dict(grad_accum=1, max_tokens_per_batch=160)  # one 8-pair batch, halved over the ranks
REFERENCES = {"single": {}, "single_split": SPLIT}


@pytest.fixture(scope="module")
def equal_one(setup):
    root = setup
    fsdp = write_config(root, "fsdp", distributed="fsdp", save_every=1)
    return launch(root, "equal_one", {
        "ddp": "train:" + write_config(root, "ddp"),  # each rank runs one of the step's two micro-batches
        "ddp_split": "train:" + write_config(root, "ddp_split", **SPLIT),
        "fsdp_crash": f"train:{fsdp}@3",  # crashes in step 3 ...
        "fsdp": f"train:{fsdp}",  # ... and resumes from step 2
    }, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name, reference", [("ddp", "single"), ("fsdp", "single"), ("ddp_split", "single_split")])
def test_two_processes_equal_one(setup, equal_one, reference_run, monkeypatch, name, reference):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(setup / "cache"))
    outcomes = equal_one.outcomes(name, 0)
    assert sum(o["stderr"].count("saved ") for o in outcomes) == 1  # rank 0 only (the console writes to stderr)
    reference_run(reference, **REFERENCES[reference])
    # Same micro-batches, loss scaled by world size, gradients averaged: the same arithmetic, bit for bit in
    # practice; 1e-5 leaves room for a different reduction order. Halving a micro-batch changes the packing, not
    # the maths.
    assert_same_run(setup, name, reference, atol=1e-5)


@pytest.mark.slow
def test_an_interrupted_fsdp_run_resumes_from_its_last_checkpoint(setup, equal_one):
    """The run's end equals one process's: test_two_processes_equal_one[fsdp]."""
    equal_one.outcomes("fsdp_crash", "crashed")
    stderr = "".join(o["stderr"] for o in equal_one.outcomes("fsdp", 0))
    assert stderr.count("resumed from") == 2 and "step-00000002 (step 2)" in stderr  # both ranks
    assert not list((setup / "fsdp" / "checkpoints").glob(".tmp*"))


# ---- sharding a step ----


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=7), st.integers(1, 5))
def test_split_for_ranks_is_even_and_loses_nothing(sizes, world_size):
    micro_batches, start = [], 0
    for size in sizes:
        micro_batches.append(list(range(start, start + size)))
        start += size
    if start < world_size:
        with pytest.raises(AlignkitError, match="for .* ranks"):
            distributed.split_for_ranks(micro_batches, world_size, step=4)
        return
    per_rank = distributed.split_for_ranks(micro_batches, world_size)
    counts = {len(mbs) for mbs in per_rank}
    assert len(counts) == 1 and counts.pop() >= 1  # the same number of forward/backward passes per rank
    assert all(mb for mbs in per_rank for mb in mbs)  # no empty micro-batch
    assert sorted(i for mbs in per_rank for mb in mbs for i in mb) == list(range(start))
    if len(micro_batches) % world_size == 0:  # nothing to split: the micro-batches are kept as they are
        assert sorted(map(tuple, (mb for mbs in per_rank for mb in mbs))) == sorted(map(tuple, micro_batches))


def test_too_few_examples_for_the_ranks_is_a_clear_error():
    with pytest.raises(AlignkitError) as err:
        distributed.shard_steps([[[0, 1, 2, 3]], [[4]]], distributed.Dist(rank=1, world_size=2))
    assert "step 2 has 1 example(s) for 2 ranks" in str(err.value) and "max_tokens_per_batch" in str(err.value)


def test_one_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_distributed()
    assert ctx == distributed.Dist() and not ctx.enabled and ctx.is_main and ctx.device is None
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, "fsdp", ctx) is model
    assert distributed.sum_over_ranks({"a": 1.0}, ctx) == {"a": 1.0}
    assert distributed.gather_objects(3, ctx) == [3]
    steps = [[[0, 1], [2]], [[3]]]
    assert distributed.shard_steps(steps, ctx) == steps
    assert distributed.full_model_state(model, model) is None


def test_world_size_without_rank_says_to_use_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(AlignkitError, match="torchrun"):
        distributed.init_distributed()


# ---- options under several processes, and the documented refusals ----

def assert_same_metrics(root: Path, name: str, reference: str, atol: float) -> None:
    """Every logged number (training and eval rows; throughput aside) and every saved tensor of the final model."""
    ours, theirs = read_metrics(root / name), read_metrics(root / reference)
    assert len(ours) == len(theirs) >= 4
    for a, b in zip(ours, theirs):
        assert sorted(a) == sorted(b), (name, a.get("step"))
        for key, value in b.items():
            if key != "tokens_per_s" and isinstance(value, (int, float)):
                assert a[key] == pytest.approx(value, rel=1e-4, abs=atol), (name, a.get("step"), key)
    assert_same_final(root, name, reference, atol)


LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "save": "adapter"}
# name: (command, config values, the one line each rank prints); "online" runs its own config (online_config).
REFUSED = {
    "lora_fsdp": ("train", dict(lora=LORA, distributed="fsdp"), "fsdp with lora"),
    "rm": ("train", dict(loss="rm"), "reward-model training runs in one process"),
    "sparsepo": ("train", dict(loss="sparsepo"), "live reference model"),
    "ref_update_fsdp": ("train", dict(ref_update={"mode": "hard", "every": 1}, distributed="fsdp"),
                        "needs an unsharded reference"),
    "online": ("online", {}, "ppo's value head is not sharded yet"),
}


def option_runs(root: Path) -> dict[str, dict]:
    """Two-process config values; the one-process reference's drop distributed and gradient_checkpointing."""
    return {
        "lora": dict(lora=LORA, learning_rate=2e-2),
        "ckpt_ddp": dict(gradient_checkpointing=True),
        "ckpt_fsdp": dict(gradient_checkpointing=True, distributed="fsdp"),
        "moments_ddp": dict(adam_moments="bf16"),
        "moments_fsdp": dict(adam_moments="bf16", distributed="fsdp", save_every=1),
        "eval": dict(eval_data=str(root / "heldout.jsonl"), eval_every=2),
    }


def bco_values(root: Path) -> dict:
    return dict(loss="bco", train_data=str(root / "unpaired.jsonl"), max_tokens_per_batch=40, save_every=1,
                keep_last=4)


def online_config(root: Path) -> str:
    online = root / "refused_online.yaml"
    online.write_text(yaml.safe_dump(dict(method="ppo", model=str(root / "model"), prompts=str(root / "prompts.jsonl"),
                                          reward="synthetic", distributed="fsdp", rounds=1, prompts_per_round=2,
                                          num_samples=2, max_new_tokens=4, output_dir=str(root / "refused_online"),
                                          progress=False)))
    return str(online)


@pytest.fixture(scope="module")
def options(setup):
    """The options and the refusals, in the same two processes: "ok" runs must succeed, refusals exit 2 (a one-line
    ConfigError) on every rank."""
    root = setup
    pairs = preference_records(32, seed=1)
    write_jsonl_atomic(root / "unpaired.jsonl", [x for r in pairs for x in (
        {"prompt": r["prompt"], "completion": r["chosen"], "label": 1},
        {"prompt": r["prompt"], "completion": r["rejected"], "label": 0})])
    write_jsonl_atomic(root / "heldout.jsonl", preference_records(6, seed=9))
    write_jsonl_atomic(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pairs[:8]])
    scenarios = {}
    for name, values in option_runs(root).items():
        config = write_config(root, f"two_{name}", **values)
        if name == "moments_fsdp":  # crashed in step 3, resumed from step 2's sharded bf16 moments
            scenarios[f"two_{name}_crash"] = f"train:{config}@3"
        scenarios[f"two_{name}"] = f"train:{config}"
    scenarios["two_bco"] = "train:" + write_config(root, "two_bco", **bco_values(root))
    for name, (command, values, _) in REFUSED.items():
        config = online_config(root) if command == "online" else write_config(root, f"refused_{name}", **values)
        scenarios[f"refused_{name}"] = f"{command}:{config}"
    return launch(root, "options", scenarios, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "ckpt_ddp", "ckpt_fsdp", "moments_ddp", "moments_fsdp", "eval"])
def test_an_option_under_two_processes_equals_one(setup, options, monkeypatch, name):
    root = setup
    monkeypatch.setenv("ALIGNKIT_CACHE", str(root / "cache"))
    options.outcomes(f"two_{name}", 0)
    values = option_runs(root)[name]
    reference = {k: v for k, v in values.items() if k not in ("distributed", "gradient_checkpointing", "save_every")}
    one_process(write_config(root, f"one_{name}", **reference))
    assert_same_metrics(root, f"two_{name}", f"one_{name}", atol=1e-5)


@pytest.mark.slow
def test_fsdp_with_bf16_moments_resumed_from_its_checkpoint(setup, options):
    """Its end equals one process's: test_an_option_under_two_processes_equals_one[moments_fsdp]."""
    options.outcomes("two_moments_fsdp_crash", "crashed")
    stderr = "".join(o["stderr"] for o in options.outcomes("two_moments_fsdp", 0))
    assert stderr.count("resumed from") == 2 and "step-00000002 (step 2)" in stderr
    # the step after the resume saved bf16 moments again (a load casts them to the weights' fp32)
    saved = torch.load(setup / "two_moments_fsdp" / "checkpoints" / "step-00000003" / "trainer.pt", weights_only=True)
    moments = [s[k] for s in saved["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)


@pytest.mark.slow
def test_eval_rows_are_logged_under_two_processes(setup, options):
    options.outcomes("two_eval", 0)
    assert any("eval/loss" in row for row in read_metrics(setup / "two_eval"))


@pytest.mark.slow
def test_bco_reward_shift_under_two_processes_equals_one(setup, options, monkeypatch):
    """BCO's running reward shift: within a step each rank absorbs only its own micro-batches (one process: every
    earlier micro-batch of the step too); the ranks' increments are merged at the step's end, so the state carried
    between steps and saved in each checkpoint equals one process's."""
    root = setup
    monkeypatch.setenv("ALIGNKIT_CACHE", str(root / "cache"))
    options.outcomes("two_bco", 0)
    one_process(write_config(root, "one_bco", **bco_values(root)))

    def carried(name):
        return [json.loads((path / "trainer_state.json").read_text())["loss_state"]
                for path in sorted((root / name / "checkpoints").glob("step-*"))]

    ours, theirs = carried("two_bco"), carried("one_bco")
    seen = [sum(r["examples"] for r in read_metrics(root / "one_bco")[:i + 1]) for i in range(len(theirs))]
    assert len(theirs) >= 3 and [s["count"] for s in theirs] == seen  # every example of every step, once
    for a, b in zip(ours, theirs, strict=True):
        assert a["count"] == b["count"] and a["mean"] == pytest.approx(b["mean"], abs=1e-6)
    steps = [(a["loss"], b["loss"]) for a, b in zip(read_metrics(root / "two_bco"), read_metrics(root / "one_bco"))]
    assert steps[0][0] == pytest.approx(steps[0][1], abs=1e-2)  # the same data, a slightly different shift


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFUSED))
def test_a_refusal_under_two_processes_is_one_line_per_rank(setup, options, name):
    message = REFUSED[name][2]
    outcomes = options.outcomes(f"refused_{name}", 2)
    assert sum(o["stderr"].count(message) for o in outcomes) == 2, message  # one line from each rank, before anything trained
    assert not (setup / f"refused_{name}").exists()

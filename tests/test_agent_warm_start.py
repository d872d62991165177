"""`alignkit agent --task arithmetic`'s warm start: worked conversations on problems outside the training and
held-out records, tokenised exactly as a rollout that wrote the same replies (SmolLM2's real tokenizer and ChatML
template, the default tool block), trained on the assistant turns only; the SFT changes the model and the RL run
starts from the warm-started weights; bad settings are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from alignkit.config import SamplingOptions
from alignkit.data.template import render_chat
from alignkit.envs import Limits, run_trajectories
from alignkit.envs.arithmetic import ArithmeticTools, arithmetic_sets, demonstration_problems, worked_replies
from alignkit.envs.sandbox import calculate
from alignkit.envs.tools import tool_schema, with_tool_block
from alignkit.errors import ConfigError
from alignkit.generate.engines import Generation
from alignkit.models.tiny import build_tiny_model
from alignkit.recipes import agent
from alignkit.recipes.agent import AgentConfig, run_agent
from alignkit.recipes.warm_start import demonstration_examples

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLING = SamplingOptions(max_new_tokens=48, temperature=1.0, batch_size=8)
LIMITS = Limits(max_turns=3, max_tokens=768, require_reward=False)


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def test_warm_start_problems_are_disjoint_from_training_and_held_out_and_seeded():
    for steps in (1, 2):
        train, held = arithmetic_sets(64, 32, seed=3, steps=steps)
        warm = demonstration_problems(48, train + held, seed=3, steps=steps)
        questions = [r["prompt"][-1]["content"] for r in warm]
        assert len(set(questions)) == 48
        assert not set(questions) & {r["prompt"][-1]["content"] for r in train + held}
        assert warm == demonstration_problems(48, train + held, seed=3, steps=steps)
        assert warm != demonstration_problems(48, train + held, seed=4, steps=steps)
    # a stream whose first draws are all excluded still gives fresh problems
    first = demonstration_problems(10, [], seed=0, steps=1)
    assert not set(map(str, first)) & set(map(str, demonstration_problems(10, first, seed=0, steps=1)))


@pytest.mark.parametrize("steps", [1, 2])
def test_worked_replies_solve_the_problem_in_the_instructions_format(steps):
    for record in demonstration_problems(8, [], seed=1, steps=steps):
        call, answer = worked_replies(record)
        body = json.loads(call.removeprefix("<tool_call>").removesuffix("</tool_call>"))
        assert body["name"] == "calculate" and calculate(body["arguments"]["expression"]) == record["answer"]
        assert answer == f"The answer is {record['answer']}."


class ContextEngine:
    """A rollout engine over many conversations at once: each context gets the next reply of the problem whose
    question it holds (found in the decoded context), tokenised with the end-of-turn token."""

    def __init__(self, tokenizer, records):
        self.tokenizer = tokenizer
        self.replies = {r["prompt"][-1]["content"]: list(worked_replies(r)) for r in records}

    def generate(self, prompt_ids, sampling, num_samples=1, seed=0):
        out = Generation([list(p) for p in prompt_ids], [], [], [], [], [])
        rows = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            question = next(q for q in self.replies if q in text)
            rows.append(self.tokenizer(self.replies[question].pop(0), add_special_tokens=False)["input_ids"]
                        + [self.tokenizer.eos_token_id])
        out.add_rows(self.tokenizer, rows, [[-1.0] * len(r) for r in rows], 1, [self.tokenizer.eos_token_id], ())
        return out

    def update_weights(self, model):
        pass


def test_sft_examples_are_the_rollouts_ids_and_loss_mask(smol_tokenizer):
    records = demonstration_problems(4, [], seed=5, steps=1)
    examples = demonstration_examples(smol_tokenizer, records, ArithmeticTools, worked_replies, SAMPLING, LIMITS)
    rows = [{**r, "_row": i + 1} for i, r in enumerate(records)]
    rollouts = run_trajectories(ContextEngine(smol_tokenizer, records), smol_tokenizer,
                                [ArithmeticTools() for _ in rows], rows, SAMPLING, LIMITS)
    for example, rollout, record in zip(examples, rollouts, records):
        assert rollout.reward == 1.0 and rollout.tool_calls == 1 and not rollout.forks
        assert example.prompt_ids + example.response_ids[0] == rollout.ids
        mask = [False] * len(example.prompt_ids) + example.response_loss_masks[0]
        assert mask == [bool(m) for m in rollout.loss_mask]
        # independently of the rollout code: the template's rendering of the worked conversation with the default
        # tool block, and loss exactly on the two replies and their end-of-turn tokens
        call, answer = worked_replies(record)
        messages = with_tool_block(record["prompt"], [tool_schema(calculate, "arithmetic_tools")]) + [
            {"role": "assistant", "content": call}, {"role": "tool", "content": record["answer"]},
            {"role": "assistant", "content": answer}]
        rendered = render_chat(smol_tokenizer, messages, add_generation_prompt=False)
        assert rendered.startswith(smol_tokenizer.decode(rollout.ids))
        assert rendered[len(smol_tokenizer.decode(rollout.ids)):].strip() == ""
        trained = [t for t, m in zip(example.response_ids[0], example.response_loss_masks[0]) if m]
        eos = smol_tokenizer.eos_token
        assert smol_tokenizer.decode(trained) == call + eos + answer + eos


def tiny_smol(smollm2, root):
    """A tiny Llama over SmolLM2's tokenizer (its BPE and ChatML template), saved as a model directory."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = build_tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2, max_positions=1024)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


@pytest.mark.slow
def test_warm_start_changes_the_model_and_the_rl_run_starts_from_it(smollm2, tmp_path, monkeypatch):
    seen = {}
    warm_start, run_online = agent.run_warm_start, agent.run_online

    def recording_warm_start(model, tokenizer, examples, settings, online, out):
        seen["initial"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["examples"] = examples
        seen["nll_before"] = reply_nll(model, examples)
        trained = warm_start(model, tokenizer, examples, settings, online, out)
        seen["warm"] = {k: v.clone() for k, v in trained.state_dict().items()}
        seen["nll_after"] = reply_nll(trained, examples)
        return trained

    def recording_online(cfg, model, tokenizer, inputs):
        seen["rl_start"] = {k: v.clone() for k, v in model.state_dict().items()}
        return run_online(cfg, model, tokenizer, inputs)

    monkeypatch.setattr(agent, "run_warm_start", recording_warm_start)
    monkeypatch.setattr(agent, "run_online", recording_online)
    model_dir = tiny_smol(smollm2, tmp_path / "model")
    summary = run_agent(overrides={
        "model": model_dir, "output_dir": str(tmp_path / "run"), "task": "arithmetic", "rounds": 1,
        "prompts_per_round": 2, "num_samples": 2, "num_train": 6, "num_eval": 2, "precision": "fp32",
        "sampling": {"max_new_tokens": 40, "batch_size": 8}, "eval_sampling": {"max_new_tokens": 8},
        "warm_start": {"examples": 6, "epochs": 3, "learning_rate": 1e-2, "examples_per_step": 2}})
    assert len(seen["examples"]) == 6 and seen["nll_after"] < seen["nll_before"] - 0.1
    assert any(not torch.equal(seen["initial"][k], seen["warm"][k]) for k in seen["warm"])
    assert all(torch.equal(seen["rl_start"][k], seen["warm"][k]) for k in seen["warm"])
    written = [json.loads(x) for x in (tmp_path / "run" / "warm_start.jsonl").read_text().splitlines()]
    questions = {r["prompt"][-1]["content"] for r in written}
    for name in ("train.jsonl", "eval.jsonl"):
        others = [json.loads(x) for x in (tmp_path / "run" / name).read_text().splitlines()]
        assert not questions & {r["prompt"][-1]["content"] for r in others}
    rate = summary["rates"]["success"]
    assert {"before", "warm_start", "after", "change", "change_over_warm_start", "warm_start_change"} <= set(rate)
    assert "warm start" in (tmp_path / "run" / "report.html").read_text()


def reply_nll(model, examples) -> float:
    """Mean negative log-likelihood per trained token of the worked replies under `model`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.prompt_ids + e.response_ids[0]])
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            token_logps = logps.gather(-1, targets[:, None])[:, 0][len(e.prompt_ids) - 1:]
            mask = torch.tensor(e.response_loss_masks[0])
            total -= token_logps[mask].sum().item()
            count += int(mask.sum())
    return total / count


@pytest.mark.parametrize(("overrides", "key"), [
    ({"task": "arithmetic", "warm_start": {"examples": -1}}, "warm_start.examples"),
    ({"task": "arithmetic", "warm_start": {"epochs": 0}}, "warm_start.epochs"),
    ({"task": "arithmetic", "warm_start": {"learning_rate": float("nan")}}, "warm_start.learning_rate"),
    ({"task": "arithmetic", "warm_start": {"learning_rate": "fast"}}, "warm_start.learning_rate"),
    ({"task": "arithmetic", "warm_start": {"examples_per_step": 0}}, "warm_start.examples_per_step"),
    ({"task": "arithmetic", "warm_start": {"exampels": 8}}, "warm_start.exampels"),
    ({"task": "self-correction", "warm_start": {"examples": 8}}, "warm_start.examples"),
])
def test_bad_warm_start_settings_are_refused_by_name(overrides, key):
    from alignkit.config import load_command_config

    with pytest.raises(ConfigError) as err:
        load_command_config(AgentConfig, None, overrides)
    assert key in str(err.value)


def test_each_task_takes_its_own_defaults_and_a_key_given_wins():
    """make agent runs arithmetic (warm start on, 8 rounds x 4 records, 64 held-out problems); self-correction keeps
    its 12 x 5 and 96 held-out prompts with no warm start; any key given replaces the task's default."""
    from alignkit.config import load_command_config
    from alignkit.recipes.agent import ONLINE, online_option_names

    arithmetic = AgentConfig()
    assert arithmetic.task == "arithmetic" and arithmetic.warm_start.examples > 0 and arithmetic.num_eval == 64
    assert (arithmetic.online.rounds, arithmetic.online.prompts_per_round) == (8, 4)
    correction = AgentConfig(task="self-correction")
    assert correction.warm_start.examples == 0 and correction.num_eval == 96
    assert (correction.online.rounds, correction.online.prompts_per_round) == (ONLINE["rounds"],
                                                                                 ONLINE["prompts_per_round"])
    assert AgentConfig(task="arithmetic", warm_start={"examples": 0}).warm_start.examples == 0
    given = load_command_config(AgentConfig, None, {"rounds": 3, "num_eval": 10, "prompts_per_round": 2},
                                online_option_names(ONLINE))
    assert (given.online.rounds, given.online.prompts_per_round, given.num_eval) == (3, 2, 10)
    assert given.online.num_samples == ONLINE["num_samples"]

"""`alignkit agent`'s plumbing on the tiny model: it trains through `alignkit online` with the arithmetic tool
environment, talks the held-out problems through before and after, and writes a summary whose accuracy, tool-call
and per-turn figures recompute from the conversations it saved, and a report that shows them as conversations."""

from __future__ import annotations

import json

import pytest

from alignkit.envs.arithmetic import arithmetic_sets
from alignkit.recipes.agent import outcomes, run_agent, turn_rows
from alignkit.rewards.verifiable.math import extract_answer, same_answer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(task, out, **overrides):
    return {"model": str(task.model_dir), "output_dir": str(out), "rounds": 2, "prompts_per_round": 2,
            "num_samples": 2, "num_train_problems": 8, "num_eval_problems": 4, "max_turns": 2,
            "sampling": {"max_new_tokens": 6, "batch_size": 32}, "eval_sampling": {"max_new_tokens": 6},
            "precision": "fp32", **overrides}


def test_agent_recipe_writes_a_summary_that_recomputes_from_its_conversations(task, tmp_path):
    summary = run_agent(overrides=tiny(task, tmp_path))
    saved = [json.loads(line) for line in (tmp_path / "conversations.jsonl").read_text().splitlines()]
    assert len(saved) == 4 * 2 and summary["eval_conversations"] == 8
    _, held = arithmetic_sets(8, 4, 0, 1)
    assert [s["answer"] for s in saved] == [r["answer"] for r in held for _ in range(2)]
    for side, key in (("original", "correct_before"), ("trained", "correct_after")):
        right = []
        for s in saved:  # the reward is 1 exactly when the last assistant turn (no tool call) states the answer
            last = [m for m in s[side] if m["role"] == "assistant"][-1]
            answered = not last.get("tool_calls") and not last.get("tool_call_errors")
            right.append(answered and same_answer(extract_answer(last["content"]), s["answer"]))
            assert s[f"{side}_reward"] in (0.0, 1.0)
            assert (s[f"{side}_reward"] == 1.0) == right[-1]
        assert summary[key][0] == pytest.approx(sum(right) / len(right))
        assert summary[key][1] <= summary[key][0] <= summary[key][2]
    rounds = [json.loads(line) for line in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all("tool_calls" in r and "turns" in r for r in rounds)
    html = (tmp_path / "report.html").read_text()
    assert "Per assistant turn" in html and html.count("<img") == 1 and "[assistant]" in html and "[user]" in html


class _T:
    def __init__(self, messages, reward, done=True):
        self.messages, self.reward, self.done = messages, reward, done
        self.turns = sum(m["role"] == "assistant" for m in messages)
        self.tool_calls = sum(len(m.get("tool_calls") or []) for m in messages)
        self.tool_errors = sum(m["role"] == "tool" and "error" in m["content"] for m in messages)


def test_per_turn_outcomes_on_hand_written_conversations():
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calculate"}}]}
    bad = {"role": "assistant", "content": "", "tool_call_errors": ["not JSON"]}
    tool, err = {"role": "tool", "content": "1234"}, {"role": "tool", "content": '{"error": "not JSON"}'}
    answer = {"role": "assistant", "content": "1234"}
    wrong = {"role": "assistant", "content": "12"}
    trajectories = [_T([call, tool, answer], 1.0), _T([answer], 1.0), _T([bad, err, wrong], 0.0),
                    _T([call, tool, call], 0.0, done=False)]
    got = outcomes(trajectories)
    assert got["correct"] == [1.0, 1.0, 0.0, 0.0] and got["called"] == [1.0, 0.0, 0.0, 1.0]
    assert got["tool_errors"] == 0.25
    first, second = got["turns"][:2]
    assert first == {"turn": 1, "reached": 1.0, "tool_call": 0.5, "malformed_call": 0.25, "answered": 0.25,
                     "answered_right": 0.25}
    assert second == {"turn": 2, "reached": 0.75, "tool_call": 0.25, "malformed_call": 0.0, "answered": 0.5,
                      "answered_right": 0.25}
    rows = turn_rows({"turns_before": got["turns"], "turns_after": got["turns"][:1]})
    assert rows[1][1] == "100% -> 100%" and rows[2][1] == "75% -> 0%"

"""`alignkit agent`'s plumbing on the tiny model, in both environments: it trains through `alignkit online` with
the environment, talks the held-out records through before and after, and writes a summary whose rates and
per-turn figures recompute from the conversations it saved, and a report that shows them as conversations."""

from __future__ import annotations

import json

import pytest

from alignkit.envs.arithmetic import arithmetic_sets
from alignkit.recipes.agent import TASKS, outcomes, run_agent, turn_rows
from alignkit.rewards.verifiable.constraints import check_all
from alignkit.rewards.verifiable.math import extract_answer, same_answer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(fixture, out, **overrides):
    return {"model": str(fixture.model_dir), "output_dir": str(out), "rounds": 2, "prompts_per_round": 2,
            "num_samples": 2, "num_train": 8, "num_eval": 4, "sampling": {"max_new_tokens": 6, "batch_size": 32},
            "eval_sampling": {"max_new_tokens": 6}, "precision": "fp32", **overrides}


def saved_and_report(out, summary):
    saved = [json.loads(line) for line in (out / "conversations.jsonl").read_text().splitlines()]
    assert len(saved) == 4 * 2 and summary["eval_conversations"] == 8
    rounds = [json.loads(line) for line in (out / "online" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all("tool_calls" in r and "turns" in r for r in rounds)
    html = (out / "report.html").read_text()
    assert "Per assistant turn" in html and html.count("<img") == 1 and "[assistant]" in html and "[user]" in html
    return saved


def replies(messages):
    return [m for m in messages if m["role"] == "assistant"]


@pytest.mark.slow
def test_self_correction_summary_recomputes_from_its_conversations(task, tmp_path):
    summary = run_agent(overrides=tiny(task, tmp_path, task="self-correction"))
    saved = saved_and_report(tmp_path, summary)
    for side, when in (("original", "before"), ("trained", "after")):
        first, second = [], []
        for s in saved:  # attempt 1, the checkers' verdict as a user turn, attempt 2
            attempts = replies(s[side])
            assert len(attempts) == 2 and s[side][2]["role"] == "user"
            first.append(all(check_all(s["record"]["constraints"], attempts[0]["text"].strip())))
            second.append(all(check_all(s["record"]["constraints"], attempts[1]["text"].strip())))
        assert summary["rates"]["first_all_met"][when][0] == pytest.approx(sum(first) / len(first))
        fixed = [s and not f for f, s in zip(first, second)]
        broken = [f and not s for f, s in zip(first, second)]
        assert summary["rates"]["wrong_to_right"][when][0] == pytest.approx(sum(fixed) / len(fixed))
        assert summary["rates"]["right_to_wrong"][when][0] == pytest.approx(sum(broken) / len(broken))
        assert summary["rates"]["success"][when][0] == pytest.approx(sum(second) / len(second))
        turn1, turn2 = summary[f"turns_{when}"]
        assert turn1["succeeded"] == pytest.approx(sum(first) / len(first))
        assert turn2["succeeded"] == pytest.approx(sum(second) / len(second))


@pytest.mark.slow
def test_arithmetic_summary_recomputes_from_its_conversations(task, tmp_path):
    # no warm start: the word-level tokenizer cannot write a tool call (tests/test_agent_warm_start.py has one)
    summary = run_agent(overrides=tiny(task, tmp_path, task="arithmetic", warm_start={"examples": 0}))
    saved = saved_and_report(tmp_path, summary)
    _, held = arithmetic_sets(8, 4, 0, 1)
    assert [s["record"]["answer"] for s in saved] == [r["answer"] for r in held for _ in range(2)]
    for side, when in (("original", "before"), ("trained", "after")):
        right = []
        for s in saved:  # reward 1 exactly when the last assistant turn (no tool call) states the answer
            last = replies(s[side])[-1]
            answered = not last.get("tool_calls") and not last.get("tool_call_errors")
            right.append(answered and same_answer(extract_answer(last["content"]), s["record"]["answer"]))
            assert (s[f"{side}_reward"] == 1.0) == right[-1]
        rate = summary["rates"]["success"][when]
        assert rate[0] == pytest.approx(sum(right) / len(right)) and rate[1] <= rate[0] <= rate[2]


class _T:
    def __init__(self, messages, reward, done=True):
        self.messages, self.reward, self.done, self.infos = messages, reward, done, []
        self.turns = sum(m["role"] == "assistant" for m in messages)
        self.tool_calls = sum(len(m.get("tool_calls") or []) for m in messages)
        self.tool_errors = sum(m["role"] == "tool" and "error" in m["content"] for m in messages)


def test_per_turn_outcomes_on_hand_written_conversations():
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calculate"}}]}
    bad = {"role": "assistant", "content": "", "tool_call_errors": ["not JSON"]}
    tool, err = {"role": "tool", "content": "1234"}, {"role": "tool", "content": '{"error": "not JSON"}'}
    answer, wrong = {"role": "assistant", "content": "1234"}, {"role": "assistant", "content": "12"}
    trajectories = [_T([call, tool, answer], 1.0), _T([answer], 1.0), _T([bad, err, wrong], 0.0),
                    _T([call, tool, call], 0.0, done=False)]
    got = outcomes(trajectories, TASKS["arithmetic"])
    assert got["rates"] == {"success": [1.0, 1.0, 0.0, 0.0], "called_tool": [1.0, 0.0, 0.0, 1.0]}
    assert got["tool_errors"] == 0.25
    first, second = got["turns"][:2]
    assert first == {"turn": 1, "reached": 1.0, "tool_call": 0.5, "malformed_call": 0.25, "succeeded": 0.25}
    assert second == {"turn": 2, "reached": 0.75, "tool_call": 0.25, "malformed_call": 0.0, "succeeded": 0.25}
    rows = turn_rows({"turns_before": got["turns"], "turns_after": got["turns"][:1]})
    assert rows[1][1] == "100% -> 100%" and rows[2][1] == "75% -> 0%"


def test_self_correction_trains_on_make_rls_pairs_in_their_training_wording():
    """make agent's records are make rl's constraint pairs as the pilot had them: every training record has two
    constraints, each in the checker's own wording (rl_train.jsonl's variety, other wordings and single constraints,
    is make rl's choice, not this job's), and the held-out records are rl_eval.jsonl's."""
    from alignkit.data.load import load_records
    from alignkit.recipes.agent import AgentConfig, records_of
    from alignkit.recipes.rl import shipped
    from alignkit.rewards.verifiable.constraints import describe

    train, held = records_of(AgentConfig(task="self-correction", num_train=64, num_eval=8))
    assert len(train) == 64 and all(len(r["constraints"]) == 2 for r in train)
    assert all(describe(c) in r["prompt"][-1]["content"] for r in train for c in r["constraints"])
    strip = [{k: v for k, v in r.items() if not k.startswith("_")}
             for r in load_records(shipped("rl_eval.jsonl"), shape="prompts")[:8]]
    assert [{k: v for k, v in r.items() if not k.startswith("_")} for r in held] == strip

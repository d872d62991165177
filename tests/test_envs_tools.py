"""Tools in multi-turn rollouts: the default Hermes-style format for templates without tool support, calls parsed
from the text (or by the tokenizer's response template), malformed calls and failures answered with an error the
model reads, per-call timeouts, the per-turn call limit, schema errors named, and the sandbox the shipped calculate
tool runs in."""

from __future__ import annotations

import json
import time

import pytest

from alignkit.data.template import render_chat
from alignkit.envs import EnvError, Limits, ToolsEnvironment, run_trajectories
from alignkit.envs.sandbox import SandboxLimits, calculate, run_sandboxed
from alignkit.envs.tools import (
    parse_default,
    parse_reply,
    template_supports_tools,
    tool_schema,
    with_tool_block,
)
from envs_support import SAMPLING, ScriptedEngine, add, chat_tokenizer, tool_call

ROW = {"prompt": [{"role": "user", "content": "what is the sum of two and three"}]}
NO_REWARD = Limits(require_reward=False, tool_timeout=2.0)
LONG = SAMPLING.model_copy(update={"max_new_tokens": 40})


def one_trajectory(replies: list[str], functions, limits: Limits = NO_REWARD, tokenizer=None):
    tokenizer = tokenizer or chat_tokenizer()
    engine = ScriptedEngine(tokenizer, {"two": replies})
    [trajectory] = run_trajectories(engine, tokenizer, [ToolsEnvironment(functions, limits)], [ROW], LONG, limits)
    return trajectory, engine, tokenizer


def tool_results(trajectory) -> list:
    return [json.loads(m["content"]) if m["content"].startswith("{") else m["content"]
            for m in trajectory.messages if m["role"] == "tool"]


def test_templates_without_tool_support_get_the_tool_block_in_the_system_turn():
    trajectory, engine, tokenizer = one_trajectory(["five"], [add])
    assert not template_supports_tools(tokenizer)
    prompt = with_tool_block(ROW["prompt"], [tool_schema(add, "t")])
    assert prompt[0]["role"] == "system" and '"name": "add"' in prompt[0]["content"] and "<tool_call>" in prompt[0][
        "content"]
    expected = tokenizer(render_chat(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)
    assert engine.calls[0][0] == expected["input_ids"]
    # a template that renders `tools` itself gets them there, and no block
    tokenizer.chat_template = "{% for t in tools %}{{ t.function.name }} {% endfor %}" + tokenizer.chat_template
    assert template_supports_tools(tokenizer)
    _, engine, _ = one_trajectory(["five"], [add], tokenizer=tokenizer)
    assert engine.calls[0][0] == tokenizer(render_chat(tokenizer, ROW["prompt"], True, tools=[tool_schema(add, "t")]),
                                           add_special_tokens=False)["input_ids"]


def test_a_tool_call_runs_and_its_result_is_the_next_turn():
    trajectory, engine, _ = one_trajectory([tool_call("add", a=2, b=3), "five"], [add])
    assert trajectory.done and trajectory.turns == 2 and trajectory.reward is None
    assert trajectory.messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "add",
                                                                                       "arguments": {"a": 2, "b": 3}}}]
    assert tool_results(trajectory) == ["5"] and (trajectory.tool_calls, trajectory.tool_errors) == (1, 0)
    assert sum(trajectory.loss_mask) == sum(len(sampled) for _, sampled in engine.calls)


@pytest.mark.parametrize("reply, complaint", [
    ("<tool_call> {bad </tool_call>", "not JSON"),
    ("<tool_call> {", "without a closing"),
    (tool_call("mul", a=2, b=3), "unknown tool 'mul'"),
    ('<tool_call> {"name": "add", "arguments": 5} </tool_call>', "expected"),
])
def test_malformed_calls_come_back_to_the_model_as_errors(reply, complaint):
    trajectory, _, _ = one_trajectory([reply, "five"], [add])
    assert trajectory.done and trajectory.turns == 2 and trajectory.tool_errors == 1
    [result] = tool_results(trajectory)
    assert complaint in result["error"]


def test_a_failing_or_slow_tool_answers_with_an_error_in_time():
    def fails(x: int) -> int:
        """Fail.

        Args:
            x: Anything.
        """
        raise ValueError("no such thing")

    def slow(x: int) -> int:
        """Sleep.

        Args:
            x: Anything.
        """
        time.sleep(30)
        return x

    limits = Limits(require_reward=False, tool_timeout=0.3)
    tic = time.perf_counter()
    trajectory, _, _ = one_trajectory([tool_call("fails", x=1) + " " + tool_call("slow", x=1), "five"], [fails, slow],
                                      limits)
    assert time.perf_counter() - tic < 5
    assert [r["error"] for r in tool_results(trajectory)] == ["ValueError: no such thing",
                                                             "the tool call timed out after 0.3 s"]


def test_calls_over_the_per_turn_limit_are_not_run_and_flagged():
    limits = Limits(require_reward=False, max_tool_calls=2)
    trajectory, _, _ = one_trajectory([" ".join([tool_call("add", a=2, b=3)] * 3), "five"], [add], limits)
    results = tool_results(trajectory)
    assert results[:2] == ["5", "5"] and "only 2 tool calls" in results[2]["error"]
    assert "max_tool_calls" in trajectory.flags and trajectory.limit is None


def test_the_tokenizers_response_template_parses_where_it_has_one():
    tokenizer = chat_tokenizer()
    tokenizer.response_template = {
        "defaults": {"role": "assistant"}, "start_anchor": "<|assistant|> ",
        "fields": {"tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True,
                                  "content": "json", "transform": {"type": "function", "function": "{content}"}},
                   "content": {"close_pattern": r"<\|end\|>\s*", "content": "text"}}}
    context = tokenizer("<|user|> what <|end|> <|assistant|> ", add_special_tokens=False)["input_ids"]
    schemas = [tool_schema(add, "t")]
    good, bad = tool_call("add", a=2, b=3), "<tool_call> {bad </tool_call>"
    parsed = parse_reply(tokenizer, tokenizer(good, add_special_tokens=False)["input_ids"], context, good, schemas)
    assert parsed["tool_calls"] == [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
    parsed = parse_reply(tokenizer, tokenizer(bad, add_special_tokens=False)["input_ids"], context, bad, schemas)
    assert "tool_calls" not in parsed and parsed["tool_call_errors"][0].startswith("malformed tool call")


def test_the_default_format_reads_string_arguments_and_keeps_the_text_before_the_call():
    message = parse_default('let me add <tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    assert message["content"] == "let me add" and message["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}


def test_tools_that_cannot_be_described_are_named():
    def undocumented(x: int) -> int:
        return x

    class Point:
        pass

    def odd_type(p: Point) -> int:
        """Take a point.

        Args:
            p: The point.
        """
        return 0

    with pytest.raises(EnvError, match=r"environment tools: tool 'undocumented' cannot be described.*docstring"):
        ToolsEnvironment([undocumented])
    with pytest.raises(EnvError, match=r"tool 'odd_type' cannot be described"):
        ToolsEnvironment([odd_type])


def test_calculate_is_exact_and_refuses_anything_but_arithmetic():
    assert calculate("37 * 24 - 150") == "738" and calculate("(1 + 2) * 3.5") == "10.5"
    assert calculate("7 / 2") == "3.5" and calculate("2 ^ 10") == "1024"
    assert "division by zero" in json.loads(calculate("1 / 0"))["error"]
    assert "not Call" in json.loads(calculate("__import__('os').system('ls')"))["error"]
    assert "exponents" in json.loads(calculate("9 ** 9 ** 9"))["error"]
    assert "error" in json.loads(calculate("(10 ** 10000) ** 10000"))  # stopped by the CPU or memory limit


def test_the_sandbox_limits_hold(tmp_path):
    outside = tmp_path / "written.txt"
    assert "socket" in json.loads(run_sandboxed("import socket; socket.socket()"))["error"]
    assert "not allowed" in json.loads(run_sandboxed(f"open({str(outside)!r}, 'w').write('x')"))["error"]
    assert not outside.exists()
    assert run_sandboxed("open('inside.txt', 'w').write('ok'); print(open('inside.txt').read())") == "ok"
    assert "os.system" in json.loads(run_sandboxed("import os; os.system('true')"))["error"]
    assert "subprocess" in json.loads(run_sandboxed("import subprocess; subprocess.run(['true'])"))["error"]
    assert "out of memory" in json.loads(run_sandboxed("x = bytearray(2 * 10 ** 9)"))["error"]
    cpu = json.loads(run_sandboxed("while True: pass", limits=SandboxLimits(cpu_seconds=1, wall_seconds=20)))
    assert "CPU-time limit" in cpu["error"]
    tic = time.perf_counter()
    wall = json.loads(run_sandboxed("import time; time.sleep(30)", limits=SandboxLimits(wall_seconds=0.5)))
    assert "timed out" in wall["error"] and time.perf_counter() - tic < 10
    long = run_sandboxed("print('a' * 5000)", limits=SandboxLimits(output_chars=100))
    assert len(long) == 100 and long.endswith("[cut: 5000 characters]")

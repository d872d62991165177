"""Environments users already have run unchanged: a TRL environment_factory class (sync and async), TRL's plain
tools list, rows routed to several environments by their `environment` column, skyrl-gym's gsm8k_multi_turn from
the installed package with its own record fields, and `module:attr` / `skyrl:<id>` strings. Each way an environment
can break its contract is one named error: the environment, the row, what to fix."""

from __future__ import annotations

import pytest

from alignkit.envs import EnvError, Limits, Step, load_environment, run_trajectories
from alignkit.envs.base import DEFAULT_LIMITS
from alignkit.errors import ConfigError
from envs_support import SAMPLING, Echo, ScriptedEngine, chat_tokenizer, tool_call

LONG = SAMPLING.model_copy(update={"max_new_tokens": 40})


class Counter:
    """A TRL-style environment, as TRL 1.16's docs write one."""

    def __init__(self):
        self.total = None

    def reset(self, **kwargs):
        self.target, self.total, self.seen = kwargs["target"], None, kwargs
        return " please"

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.total = a + b
        return self.total

    def get_reward(self) -> float:
        return float(self.total == self.target)


class AsyncCounter(Counter):
    async def reset(self, **kwargs):
        return super().reset(**kwargs)

    async def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        return super().add(a, b)

    async def get_reward(self) -> float:
        return super().get_reward()


def rollout(spec, rows, replies: dict[str, list[str]], limits: Limits = DEFAULT_LIMITS, tokenizer=None):
    tokenizer = tokenizer or chat_tokenizer()
    factory = load_environment(spec, limits)
    envs = [factory.make(row, i + 1) for i, row in enumerate(rows)]
    return run_trajectories(ScriptedEngine(tokenizer, replies), tokenizer, envs, rows, LONG, limits)


def row(question="what is the sum of two", **fields):
    return {"prompt": [{"role": "user", "content": question}], **fields}


@pytest.mark.parametrize("spec", [Counter, AsyncCounter, "test_envs_adapters:Counter"])
def test_a_trl_environment_class_runs_unchanged(spec):
    [trajectory] = rollout(spec, [row(target=5, _row=3)], {"two": [tool_call("add", a=2, b=3), "five"]})
    assert trajectory.env == ("AsyncCounter" if spec is AsyncCounter else "Counter")
    assert trajectory.messages[0]["content"] == "what is the sum of two please"  # reset's string is appended
    assert [m["role"] for m in trajectory.messages] == ["user", "assistant", "tool", "assistant"]
    assert trajectory.messages[2]["content"] == "5" and trajectory.done and trajectory.reward == 1.0


def test_trl_reset_gets_the_row_without_control_fields_and_each_rollout_its_own_instance():
    factory = load_environment(Counter)
    rows = [row(target=5, environment="x", _source="f.jsonl"), row(target=6)]
    first, second = (factory.make(r) for r in rows)
    first.reset(rows[0])
    assert first.instance is not second.instance and set(first.instance.seen) == {"prompt", "target"}
    assert [t["function"]["name"] for t in first.tools] == ["add"]


def test_a_trajectory_cut_by_max_turns_is_scored_by_get_reward():
    [trajectory] = rollout(Counter, [row(target=5)], {"two": [tool_call("add", a=2, b=3)]}, Limits(max_turns=1))
    assert trajectory.limit == "max_turns" and trajectory.reward == 1.0


def test_trl_plain_tools_list():
    from envs_support import add

    [trajectory] = rollout([add], [row()], {"two": [tool_call("add", a=2, b=3), "five"]},
                           Limits(require_reward=False))
    assert trajectory.messages[2]["content"] == "5" and trajectory.reward is None


def test_rows_route_to_their_environment():
    rows = [row(target=5, environment="counter"), dict(question="what is three", environment="echo")]
    trajectories = rollout({"counter": Counter, "echo": lambda: Echo(1)}, rows,
                           {"two": [tool_call("add", a=2, b=3), "five"], "three": ["yes"]})
    assert [t.env for t in trajectories] == ["Counter", "Echo"]
    assert [t.reward for t in trajectories] == [1.0, 0.1]
    with pytest.raises(EnvError, match=r"environment \{counter, echo\}, row 2: the row is routed to environment "
                                       r"'chess'.*set the row's 'environment' to one of 'counter', 'echo'"):
        load_environment({"counter": Counter, "echo": Echo}).make(row(environment="chess"), 2)


def test_skyrl_gym_gsm8k_multi_turn_from_the_installed_package():
    pytest.importorskip("skyrl_gym")
    tokenizer = chat_tokenizer()
    tokenizer.add_tokens(["####"])
    record = row(env_class="gsm8k_multi_turn", reward_spec={"method": "rule", "ground_truth": "5"},
                 extra_info={"max_turns": 3})
    [trajectory] = rollout("skyrl:gsm8k_multi_turn", [record], {"two": ["no", "#### 5"]}, tokenizer=tokenizer)
    assert trajectory.env == "skyrl:gsm8k_multi_turn" and trajectory.turns == 2 and trajectory.done
    assert trajectory.turn_rewards == [0, 1.0] and trajectory.reward == 1.0
    assert "#### ANSWER" in trajectory.messages[2]["content"]  # the environment's own feedback turn


def test_skyrl_errors_name_the_id_and_the_row():
    pytest.importorskip("skyrl_gym")
    with pytest.raises(EnvError, match=r"environment skyrl:gsm8k_multiturn: skyrl-gym has no environment with this "
                                       r"id; use one of .*gsm8k_multi_turn"):
        load_environment("skyrl:gsm8k_multiturn")
    with pytest.raises(EnvError, match=r"skyrl:gsm8k_multi_turn, row 4: the row lacks what the environment reads"):
        rollout("skyrl:gsm8k_multi_turn", [row(_row=4)], {"two": ["no"]})


def test_module_attr_strings_that_do_not_load_are_config_errors():
    with pytest.raises(ConfigError, match="environment.*no_such_module"):
        load_environment("no_such_module:Env")
    with pytest.raises(ConfigError, match="expected module:attr"):
        load_environment("Counter")


class Broken:
    """A native environment that breaks its contract in the way `mode` says."""

    tools: list = []

    def __init__(self, mode):
        self.mode = mode

    def reset(self, row):
        if self.mode == "reset raises":
            raise ValueError("no such puzzle")
        if self.mode == "reset returns text":
            return "just a string"
        return [{"role": "user", "content": "what is two"}]

    def step(self, message):
        if self.mode == "step raises":
            raise KeyError("board")
        if self.mode == "step returns text":
            return Step("try again", 0.0, False, {})
        if self.mode == "nan reward":
            return Step([], float("nan"), True, {})
        return Step([], None, True, {})

    def close(self):
        pass


@pytest.mark.parametrize("mode, message", [
    ("reset raises", r"environment Broken, row 7: reset raised ValueError\('no such puzzle'\); fix the environment's reset"),
    ("reset returns text", r"row 7: reset returned str 'just a string', not a list of messages; return messages"),
    ("step raises", r"row 7: step raised KeyError\('board'\); fix the environment's step"),
    ("step returns text", r"row 7: step returned str 'try again', not a list of messages"),
    ("nan reward", r"row 7: step gave the reward nan; return a finite float"),
    ("no reward", r"row 7: the trajectory ended \(done after 1 turns\) with no reward; return a reward"),
])
def test_broken_environments_are_named_errors(mode, message):
    with pytest.raises(EnvError, match=message):
        rollout(lambda: Broken(mode), [row(_row=7)], {"two": ["yes"]})


def test_trl_contract_errors_are_named():
    class NoReset:
        def add(self, a: int) -> int:
            """Add.

            Args:
                a: A number.
            """
            return a

    class Undocumented(Counter):
        def peek(self, a: int) -> int:
            return a

    class BadReset(Counter):
        def reset(self, **kwargs):
            return 42

    with pytest.raises(EnvError, match="environment NoReset: it has no reset method; a TRL environment defines reset"):
        load_environment(NoReset)
    with pytest.raises(EnvError, match="environment Undocumented: tool 'peek' cannot be described"):
        load_environment(Undocumented)
    with pytest.raises(EnvError, match="environment BadReset, row 1: reset returned int, not a string or None"):
        rollout(BadReset, [row(target=1)], {"two": ["yes"]})

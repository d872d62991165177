"""Environments users already have, run unchanged behind the protocol of envs/base.py:
- a TRL `environment_factory` instance (TRL 1.16's contract: reset(**row) returns None or a string appended to the
  last user message; its public methods other than reset and get_reward are the tools, each described by its
  docstring; the optional get_reward() scores the finished rollout; the rollout ends at the first turn without a
  tool call);
- TRL's plain `tools=[fn]` list;
- a skyrl-gym environment by id, built per row from the row's own fields (reward_spec, extra_info, ...) as
  SkyRL's dataset hands them to skyrl_gym.make."""

from __future__ import annotations

from collections.abc import Callable

from alignkit.envs.base import DEFAULT_LIMITS, EnvError, Limits, Step, resolve
from alignkit.envs.tools import public_methods, run_tool_calls, tool_schema

# Row fields that route or locate a row, never handed to an environment as its data.
CONTROL_FIELDS = ("environment", "env_class")


def prompt_messages(row: dict) -> list[dict]:
    """The row's prompt as messages (TRL's default for a row without one: one empty user turn)."""
    prompt = row.get("prompt", [{"role": "user", "content": ""}])
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def row_data(row: dict, drop: tuple[str, ...] = ()) -> dict:
    """The row without alignkit's own keys (_source, _row) and the control fields."""
    return {k: v for k, v in row.items() if not k.startswith("_") and k not in CONTROL_FIELDS + drop}


class ToolsEnvironment:
    """TRL's `tools=[fn]`: the prompt as it is; each turn's calls run; done at the first turn without one. The
    reward comes from the run's reward (require_reward: false), as in TRL."""

    def __init__(self, functions: list[Callable], limits: Limits = DEFAULT_LIMITS, name: str = "tools"):
        self.name = name
        self.functions = {fn.__name__: fn for fn in functions}
        self.tools = [tool_schema(fn, name) for fn in functions]
        self.timeout, self.max_chars = limits.tool_timeout, limits.tool_output_chars

    def reset(self, row: dict) -> list[dict]:
        return prompt_messages(row)

    def step(self, message: dict) -> Step:
        if not message.get("tool_calls") and not message.get("tool_call_errors"):
            return Step([], self.final_reward(), True, {})
        return Step(run_tool_calls(message, self.functions, self.timeout, self.max_chars), None, False, {})

    def final_reward(self) -> float | None:
        return None

    def close(self) -> None:
        pass


class TRLEnvironment(ToolsEnvironment):
    """A TRL environment_factory instance (one per rollout) and the standalone tools beside it."""

    def __init__(self, instance, limits: Limits = DEFAULT_LIMITS, name: str | None = None, extra_tools: tuple = ()):
        name = name or type(instance).__name__
        if not callable(getattr(instance, "reset", None)):
            raise EnvError(name, None, "it has no reset method",
                           "a TRL environment defines reset(self, **row) returning a string or None")
        methods = public_methods(instance)
        super().__init__([*extra_tools, *methods.values()], limits, name)
        self.instance = instance

    def reset(self, row: dict) -> list[dict]:
        observation = resolve(self.instance.reset(**row_data(row)))
        messages = prompt_messages(row)
        if observation is None:
            return messages
        if not isinstance(observation, str):
            raise EnvError(self.name, None, f"reset returned {type(observation).__name__}, not a string or None",
                           "return the text to append to the last user message, or None")
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
        return messages

    def final_reward(self) -> float | None:
        get_reward = getattr(self.instance, "get_reward", None)
        if get_reward is None:
            return None
        try:
            return resolve(get_reward())
        except Exception as err:
            raise EnvError(self.name, None, f"get_reward raised {err!r}", "fix the environment's get_reward") from err


def skyrl_ids() -> list[str]:
    """The ids skyrl-gym registers (its package must be installed: pip install skyrl-gym)."""
    try:
        import skyrl_gym
    except ImportError:
        raise EnvError("skyrl", None, "skyrl-gym is not installed", "pip install skyrl-gym") from None
    return sorted(skyrl_gym.registry)


class SkyRLEnvironment:
    """A skyrl-gym BaseTextEnv: made per row with extras = the row's fields other than prompt and env_class (SkyRL's
    PromptDataset does the same), init(prompt) gives the prompt, step(text) gives observations/reward/done."""

    tools: list[dict] = []  # skyrl-gym environments read their own tags from the text

    def __init__(self, env_id: str, env_config: dict | None = None):
        self.env_id, self.name, self.env_config, self.env = env_id, f"skyrl:{env_id}", env_config or {}, None
        if env_id not in skyrl_ids():
            raise EnvError(self.name, None, "skyrl-gym has no environment with this id",
                           f"use one of {', '.join(skyrl_ids())}")

    def reset(self, row: dict) -> list[dict]:
        import skyrl_gym
        from omegaconf import OmegaConf

        try:
            self.env = skyrl_gym.make(self.env_id, env_config=OmegaConf.create(self.env_config),
                                      extras=row_data(row, drop=("prompt",)))
        except (AssertionError, KeyError, TypeError) as err:
            raise EnvError(self.name, None, f"the row lacks what the environment reads ({err!r})",
                           "give the row skyrl-gym's fields, e.g. reward_spec: {ground_truth: ...} and "
                           "extra_info: {}") from err
        prompt, _ = self.env.init(prompt_messages(row))
        return prompt

    def step(self, message: dict) -> Step:
        out = self.env.step(message.get("text", message.get("content", "")))
        return Step(out.get("observations") or [], out.get("reward"), bool(out.get("done")),
                    dict(out.get("metadata") or {}))

    def close(self) -> None:
        if self.env is not None:
            self.env.close()

"""The environment protocol a multi-turn rollout talks to, the limits a rollout runs under, and the checks that turn a
misbehaving environment into one named error (which environment, which row, what to fix)."""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from alignkit.errors import AlignkitError


class EnvError(AlignkitError):
    """An environment broke its contract: names the environment (class or id), the 1-based row and what to fix."""

    def __init__(self, env: str, row: int | None, reason: str, hint: str):
        self.env, self.row, self.reason, self.hint = env, row, reason, hint
        where = f"environment {env}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {reason}; {hint}")


class Step(NamedTuple):
    """What step returns; a NamedTuple, so `messages, reward, done, info = env.step(msg)` works as well."""

    messages: list[dict]
    reward: float | None  # None: the environment gives no reward for this turn
    done: bool
    info: dict


@runtime_checkable
class Environment(Protocol):
    """One instance per rollout. reset(row) -> the prompt messages; step(assistant message) -> Step; close().
    tools: JSON schemas of the functions the model may call ([] if none). Any of the methods may be async."""

    tools: list[dict]

    def reset(self, row: dict) -> list[dict]: ...

    def step(self, message: dict) -> Step: ...

    def close(self) -> None: ...


class Limits(BaseModel):
    """What one trajectory may spend (a trajectory that reaches a limit is flagged, Trajectory.limit), and how many
    environment calls a rollout runs at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_turns: int = Field(4, ge=1)  # assistant turns
    max_tool_calls: int = Field(4, ge=0)  # per assistant turn; the rest are answered with an error
    max_tokens: int = Field(2048, ge=2)  # per sequence: prompt, assistant and environment tokens together
    tool_timeout: float = Field(10.0, gt=0)  # seconds per tool call
    tool_output_chars: int = Field(2000, ge=16)  # a longer tool result is cut (and says so)
    reward: Literal["final", "sum"] = "final"  # the trajectory's reward: the last turn's, or the sum over turns
    require_reward: bool = True  # a trajectory that ends with no reward is an error (False: the caller scores it)
    seed: int = 0  # of the first turn's sampling; turn t samples with seed + SEED_STRIDE * t
    workers: int = Field(16, ge=1)  # threads that reset and step the environments of a turn at once (1: in turn)


DEFAULT_LIMITS = Limits()


def describe(env) -> str:
    """How errors name an environment: its id where it has one, else its class."""
    return getattr(env, "name", None) or type(env).__name__


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """One event loop on a daemon thread for every async environment (TRL runs its async tools the same way): a
    loop-bound resource an environment opens in reset stays usable in step."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, daemon=True, name="alignkit-envs").start()
    return _loop


def resolve(value, timeout: float | None = None):
    """value itself, or its result when it is awaitable (an async environment's method)."""
    if not inspect.isawaitable(value):
        return value
    return asyncio.run_coroutine_threadsafe(_as_coroutine(value), _background_loop()).result(timeout)


async def _as_coroutine(awaitable):
    return await awaitable


def check_messages(value: Any, env: str, row: int | None, what: str) -> list[dict]:
    """value as a list of {"role": str, "content": str, ...} messages; an EnvError naming `what` otherwise."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list | tuple):
        raise EnvError(env, row, f"{what} returned {type(value).__name__} {_short(value)}, not a list of messages",
                       'return messages like [{"role": "user", "content": "..."}]')
    for i, message in enumerate(value):
        ok = isinstance(message, dict) and isinstance(message.get("role"), str)
        if not ok or not isinstance(message.get("content", ""), str):
            raise EnvError(env, row, f"{what} returned {_short(message)} as message {i + 1}, not a message",
                           'each message is a dict with a string "role" and a string "content"')
    return [dict(m) for m in value]


def check_reward(value: Any, env: str, row: int | None, what: str) -> float | None:
    """A turn's reward as a float (None stays None); NaN, infinities and non-numbers are an EnvError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) and not hasattr(value, "__float__"):
        raise EnvError(env, row, f"{what} gave the reward {_short(value)}, not a number", "return a float")
    reward = float(value)
    if not math.isfinite(reward):
        raise EnvError(env, row, f"{what} gave the reward {reward}", "return a finite float")
    return reward


def with_row(err: EnvError, index: int | None) -> EnvError:
    """The same error with the row filled in (adapters raise before they know which row they serve)."""
    return err if err.row is not None or index is None else EnvError(err.env, index, err.reason, err.hint)


def checked_reset(env, row: dict, index: int | None) -> list[dict]:
    """env.reset(row), its result checked; an exception inside reset becomes an EnvError naming it."""
    name = describe(env)
    try:
        messages = resolve(env.reset(row))
    except EnvError as err:
        raise with_row(err, index) from err.__cause__
    except Exception as err:  # the environment's own bug: named, with the row that triggered it
        raise EnvError(name, index, f"reset raised {err!r}", "fix the environment's reset for this row") from err
    messages = check_messages(messages, name, index, "reset")
    if not messages:
        raise EnvError(name, index, "reset returned no messages", "return the prompt messages of the row")
    return messages


def checked_step(env, message: dict, index: int | None) -> Step:
    """env.step(message) as a Step, each part checked; an exception inside step becomes an EnvError naming it."""
    name = describe(env)
    try:
        out = resolve(env.step(message))
    except EnvError as err:
        raise with_row(err, index) from err.__cause__
    except Exception as err:
        raise EnvError(name, index, f"step raised {err!r}", "fix the environment's step") from err
    if not isinstance(out, tuple) or len(out) != 4:
        raise EnvError(name, index, f"step returned {_short(out)}", "return (messages, reward, done, info)")
    messages, reward, done, info = out
    return Step(check_messages(messages, name, index, "step"), check_reward(reward, name, index, "step"),
                bool(done), dict(info or {}))


def close_quietly(env) -> None:
    """Close an environment; a failing close must not lose the trajectories already made."""
    close = getattr(env, "close", None)
    if close is not None:
        try:
            resolve(close())
        except Exception:  # noqa: BLE001 - cleanup only
            pass


def close_all(envs) -> None:
    """close_quietly each (None, an environment a checkpoint dropped, is skipped: it has no close)."""
    for env in envs:
        close_quietly(env)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

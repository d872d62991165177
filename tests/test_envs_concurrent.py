"""Environment calls of one turn run concurrently (Limits.workers, `env_workers` online): the trajectories are those of
the sequential run (workers 1), a turn of 8 environments whose step sleeps 0.2 s takes about one sleep, not eight
(plain and async environments), an error still names its row, and every environment is closed after its calls."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from pydantic import ValidationError

from alignkit.envs import EnvError, Limits, Step, run_trajectories
from alignkit.errors import ConfigError
from alignkit.generate.engines import FastEngine
from alignkit.online import online_config
from alignkit.online.env_rollout import EnvironmentSetup
from envs_support import SAMPLING, chat_model, chat_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["what is two", "what is three", "what is five", "hello what", "the sum of two", "try the answer",
             "what is the sum", "good answer"]
SLEEP = 0.2


class SlowTool:
    """A tool environment whose every reset and step waits `sleep` seconds (a tool's I/O); an answer with an odd
    number of words gets a tool reply and the conversation goes on. Records when each call ran and when it closed."""

    tools: list = []

    def __init__(self, sleep: float = 0.0, fail_row: str | None = None):
        self.sleep, self.fail_row, self.spans, self.closed_at = sleep, fail_row, [], None

    def reset(self, row):
        self.question = row["question"]
        return [{"role": "user", "content": row["question"]}]

    def step(self, message):
        start = time.perf_counter()
        time.sleep(self.sleep)
        self.spans.append((start, time.perf_counter()))
        if self.question == self.fail_row:
            raise RuntimeError("the tool server refused")
        words = len(message["content"].split())
        return Step([] if words % 2 == 0 else [{"role": "tool", "content": "5"}], words / 10, words % 2 == 0, {})

    def close(self):
        self.closed_at = time.perf_counter()


class AsyncSlowTool(SlowTool):
    async def step(self, message):
        start = time.perf_counter()
        await asyncio.sleep(self.sleep)
        self.spans.append((start, time.perf_counter()))
        return Step([{"role": "tool", "content": "5"}], 0.5, False, {})


def talk(environments: list, workers: int, max_turns: int = 3):
    tokenizer = chat_tokenizer()
    engine = FastEngine(chat_model(tokenizer), tokenizer)
    rows = [{"question": q} for q in QUESTIONS[:len(environments)]]
    sampling = SAMPLING.model_copy(update={"engine": "fast", "max_new_tokens": 5, "batch_size": 4})
    return run_trajectories(engine, tokenizer, environments, rows, sampling,
                            Limits(max_turns=max_turns, max_tokens=256, workers=workers))


def turn_seconds(environments: list, turn: int) -> float:
    """Wall time from the first environment's step of `turn` starting to the last one's ending."""
    spans = [env.spans[turn] for env in environments if len(env.spans) > turn]
    return max(end for _, end in spans) - min(start for start, _ in spans)


def test_concurrent_steps_give_the_sequential_trajectories():
    sequential = talk([SlowTool() for _ in QUESTIONS], workers=1)
    concurrent = talk([SlowTool(sleep=0.01) for _ in QUESTIONS], workers=8)
    assert 1 < max(t.turns for t in sequential) and min(t.turns for t in sequential) < 3  # some went on, some ended
    for one, other in zip(sequential, concurrent):
        assert [s.ids for s in one.segments] == [s.ids for s in other.segments]
        assert [s.engine_logps for s in one.segments] == [s.engine_logps for s in other.segments]
        assert [s.loss_mask for s in one.segments] == [s.loss_mask for s in other.segments]
        assert (one.reward, one.turn_rewards, one.messages) == (other.reward, other.turn_rewards, other.messages)


@pytest.mark.parametrize("environment", [SlowTool, AsyncSlowTool])
def test_a_turn_of_sleeping_environments_takes_about_one_sleep(environment):
    environments = [environment(sleep=SLEEP) for _ in range(8)]
    talk(environments, workers=8, max_turns=1)
    serial = SLEEP * len(environments)
    assert turn_seconds(environments, 0) < serial / 2  # about one sleep, not eight
    one_at_a_time = [environment(sleep=SLEEP) for _ in range(8)]
    talk(one_at_a_time, workers=1, max_turns=1)
    assert turn_seconds(one_at_a_time, 0) >= serial  # workers 1: in turn


def test_an_error_names_its_row_and_every_environment_is_closed_after_its_calls():
    environments = [SlowTool(sleep=SLEEP if i % 2 else 0.0, fail_row=QUESTIONS[2]) for i in range(6)]
    with pytest.raises(EnvError, match="row 3: step raised RuntimeError"):
        talk(environments, workers=6)
    for env in environments:
        assert env.closed_at is not None and env.closed_at >= max(end for _, end in env.spans)
    assert not [t for t in threading.enumerate() if t.name.startswith("alignkit-env-calls")]  # the pool is gone


def test_env_workers_is_validated_and_reaches_the_rollouts_limits():
    base = {"model": "m", "prompts": "p.jsonl", "method": "grpo", "environment": "envs_support:Parity"}
    with pytest.raises(ConfigError) as err:
        online_config({**base, "env_workers": 0})
    assert err.value.key == "env_workers"
    assert EnvironmentSetup.from_config(online_config(base), None).limits.workers == 16
    assert EnvironmentSetup.from_config(online_config({**base, "env_workers": 1}), None).limits.workers == 1
    with pytest.raises(ValidationError, match="workers"):
        Limits(workers=0)

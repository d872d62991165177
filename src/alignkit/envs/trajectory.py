"""Token-exact multi-turn trajectories: an engine talks to one environment per rollout, turn by turn.

The prompt is rendered once with the chat template. Each assistant turn keeps the exact ids and log-probs the engine
sampled. Each environment turn is appended as the continuation of the text so far: the conversation is rendered with
the new messages, the text already in the sequence must be a prefix of that rendering, and only the new text after
it is tokenised (and masked). Earlier ids are never re-tokenised. Where the template re-renders earlier turns
differently (one that drops earlier <think> blocks, or ends turns with a token the sampler did not emit), the
trajectory forks: a new segment starts from the rendered context, and the fork is counted.

The environments of one turn are reset and stepped concurrently (Limits.workers threads), since a tool call mostly
waits on I/O; their answers are applied in the rollouts' fixed order, so the trajectories are those of a sequential
run."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from alignkit.data.template import render_chat
from alignkit.envs.base import (
    DEFAULT_LIMITS,
    EnvError,
    Limits,
    Step,
    check_reward,
    checked_reset,
    checked_step,
    close_all,
    describe,
    resolve,
)
from alignkit.envs.tools import parse_reply, template_supports_tools, with_tool_block
from alignkit.generate.engines.base import start_generate, stop_token_ids

SEED_STRIDE = 7919  # each turn's generate calls are seeded apart, so turn 2 does not replay turn 1's draws


@dataclass
class Segment:
    """One sequence the learner trains on: ids, loss_mask 1 exactly on engine-sampled tokens, the engine's
    log-prob of each sampled token (0.0 elsewhere) and the assistant turn (0-based) it was sampled in (-1 elsewhere:
    per-turn credit, online/turn_credit.py)."""

    ids: list[int]
    loss_mask: list[int]
    engine_logps: list[float]
    turns: list[int] = field(default_factory=list)

    def extend(self, ids: list[int], logps: list[float] | None = None, turn: int = -1) -> None:
        self.ids += ids
        self.loss_mask += [0 if logps is None else 1] * len(ids)
        self.engine_logps += [0.0] * len(ids) if logps is None else list(logps)
        self.turns += [-1 if logps is None else turn] * len(ids)


@dataclass
class Trajectory:
    env: str
    row: dict
    messages: list[dict]  # the conversation as the environment saw it (assistant turns parsed)
    segments: list[Segment]  # one, plus one per fork
    turn_rewards: list[float | None] = field(default_factory=list)
    reward: float | None = None
    infos: list[dict] = field(default_factory=list)
    done: bool = False  # the environment ended it
    limit: str | None = None  # the limit that ended it instead: max_turns or max_tokens
    flags: list[str] = field(default_factory=list)  # every limit met on the way (max_tool_calls included)
    turns: int = 0
    cut_turns: int = 0  # assistant turns cut at max_new_tokens
    tool_calls: int = 0
    tool_errors: int = 0  # tool replies that are {"error": ...}: malformed or unknown calls, failures, timeouts

    @property
    def forks(self) -> int:
        return len(self.segments) - 1

    def _only(self) -> Segment:
        if self.forks:
            raise ValueError(f"the trajectory forked {self.forks} time(s): read .segments")
        return self.segments[0]

    @property
    def ids(self) -> list[int]:
        return self._only().ids

    @property
    def loss_mask(self) -> list[int]:
        return self._only().loss_mask

    @property
    def engine_logps(self) -> list[float]:
        return self._only().engine_logps


@dataclass
class _Run:
    """A trajectory in progress: its environment, the messages as rendered (assistant turns as sampled text) and
    the text its current segment's ids decode to."""

    env: object
    index: int | None
    position: int  # in the call's list of rollouts: fixes its generate chunk and seed whichever others still run
    trajectory: Trajectory
    rendered: list[dict]
    template_tools: list[dict] | None
    context: str
    ended: bool = False


def run_trajectories(engine, tokenizer, environments: list, rows: list[dict], sampling, limits: Limits = DEFAULT_LIMITS
                     ) -> list[Trajectory]:
    """One trajectory per (environment, row), all advanced together: each turn is one generate call per token cap
    over the trajectories still running, then every environment's step at once. Every environment is closed at the
    end, also on an error (after every call in flight has returned)."""
    if len(environments) != len(rows):
        raise ValueError(f"{len(environments)} environments for {len(rows)} rows: give one environment per rollout")
    try:
        runs = start_trajectories(tokenizer, environments, rows, limits)
        advance_trajectories(engine, tokenizer, runs, sampling, limits, range(limits.max_turns))
        return finish_trajectories(runs, limits)
    finally:
        close_all(environments)


def start_trajectories(tokenizer, environments: list, rows: list[dict], limits: Limits) -> list[_Run]:
    """Every environment reset (at once) and its prompt rendered: the trajectories before their first turn."""
    with EnvCalls(limits.workers) as calls:
        places = [(i, _row_number(row, i)) for i, row in enumerate(rows)]
        prompts = calls.results([calls.submit(checked_reset, env, row, number)
                                 for env, row, (_, number) in zip(environments, rows, places)])
    return [_start(env, messages, row, place, tokenizer)
            for env, messages, row, place in zip(environments, prompts, rows, places)]


def advance_trajectories(engine, tokenizer, runs: list[_Run], sampling, limits: Limits, turns: range) -> None:
    """Turns `turns` (0-based, each seeded by its number) of every trajectory still running."""
    with EnvCalls(limits.workers) as calls:
        for turn in turns:
            live = [run for run in runs if not run.ended]
            if not live:
                break
            _take_turn(engine, tokenizer, live, sampling, limits, (limits.seed + SEED_STRIDE * turn, calls))


def finish_trajectories(runs: list[_Run], limits: Limits) -> list[Trajectory]:
    for run in runs:
        _finish(run, limits)
    return [run.trajectory for run in runs]


def replay_environment(env, run: _Run) -> None:
    """Bring a fresh environment to where `run`'s conversation stands (partial rollouts, on resume: a checkpoint keeps
    the conversations, not their environments): reset it with the row, step it with each recorded assistant message,
    and check every answer against the recorded one. An environment that answers otherwise cannot be resumed
    exactly: an EnvError says so."""
    trajectory = run.trajectory
    why = ("partial rollouts resume an environment by replaying its turns: it must answer a row and the same "
           "messages alike (or set async.partial false)")
    recorded, prompt = trajectory.messages, checked_reset(env, trajectory.row, run.index)
    if prompt != recorded[:len(prompt)]:
        raise EnvError(trajectory.env, run.index, "replayed to resume a part-sampled conversation, reset gave "
                       "another prompt", why)
    at = len(prompt)
    for turn, reward in enumerate(trajectory.turn_rewards):
        step = checked_step(env, recorded[at], run.index)  # the assistant message as the environment first saw it
        at += 1
        if step.messages != recorded[at:at + len(step.messages)] or step.reward != reward:
            raise EnvError(trajectory.env, run.index, f"replayed to resume a part-sampled conversation, turn "
                           f"{turn + 1} was answered differently from the first time", why)
        at += len(step.messages)
    run.env = env


class EnvCalls:
    """Runs environment calls (reset, step) on a bounded thread pool, or inline with one worker (the sequential run).
    An async environment's coroutine runs on the shared event loop (envs/base.resolve), so those overlap as well."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="alignkit-env-calls") if workers > 1 else None

    def submit(self, call, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(call, *args)
        future = Future()
        try:
            future.set_result(call(*args))
        except Exception as err:  # noqa: BLE001 - raised by results(), in the rollouts' order
            future.set_exception(err)
        return future

    @staticmethod
    def results(futures: list[Future]) -> list:
        """Every call's result once all have returned; the first error in the given order is raised."""
        wait(futures)
        return [future.result() for future in futures]

    def __enter__(self) -> EnvCalls:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _row_number(row: dict, i: int) -> int:
    return row.get("_row") or i + 1


def _start(env, messages: list[dict], row: dict, place: tuple[int, int], tokenizer) -> _Run:
    """Render the prompt an environment's reset gave once: with the tools through the template where it renders
    them, else with the default tool block in the system turn. place: (position, row number)."""
    position, index = place
    tools = list(getattr(env, "tools", None) or [])
    in_template = bool(tools) and template_supports_tools(tokenizer)
    rendered = messages if in_template or not tools else with_tool_block(messages, tools)
    template_tools = tools if in_template else None
    text = render_chat(tokenizer, rendered, add_generation_prompt=True, tools=template_tools)
    ids = _encode(tokenizer, text)
    segment = Segment([], [], [])
    segment.extend(ids)
    trajectory = Trajectory(describe(env), row, list(messages), [segment])
    return _Run(env, index, position, trajectory, list(rendered), template_tools, text)


def _take_turn(engine, tokenizer, live: list[_Run], sampling, limits: Limits, seeded: tuple[int, EnvCalls]) -> None:
    """Sample one assistant turn for every live trajectory, then let each environment answer it: a chunk's steps
    start as soon as it is sampled (while the next chunk samples), and their answers are added in a fixed order."""
    seed, calls = seeded
    end_ids = stop_token_ids(tokenizer, sampling.stop_strings)
    caps: dict[int, list[_Run]] = {}
    for run in live:
        room = limits.max_tokens - len(run.trajectory.segments[-1].ids)
        if room <= 0:
            _stop(run, "max_tokens")
            continue
        caps.setdefault(min(sampling.max_new_tokens, room), []).append(run)
    chunks: dict[tuple[int, int], list[_Run]] = {}
    for cap, group in caps.items():  # chunks of fixed positions, so a rollout's draws never depend on which others
        for run in group:            # still run (nor on how a round's rollouts are shared out over ranks)
            chunks.setdefault((cap, run.position // sampling.batch_size), []).append(run)
    stepped, steps = [], []
    started = [(group, start_generate(engine, [run.trajectory.segments[-1].ids for run in group],  # Ray: all at once
                                      sampling.model_copy(update={"max_new_tokens": cap}), 1, seed + group[0].position))
               for (cap, _), group in chunks.items()]
    for group, sampled in started:
        generation = sampled()
        for i, run in enumerate(group):
            ids, logps = generation.ids[i][0], generation.logprobs[i][0]
            message = _add_reply(run, tokenizer, ids, logps, end_ids)
            run.trajectory.cut_turns += generation.finish_reasons[i][0] == "length"
            _limit_tool_calls(run, message, limits)
            stepped.append(run)
            steps.append(calls.submit(checked_step, run.env, message, run.index))
    for run, step in zip(stepped, calls.results(steps)):
        _add_step(run, tokenizer, step, limits)


def _add_reply(run: _Run, tokenizer, ids: list[int], logps: list[float], end_ids: list[int]) -> dict:
    """Append the sampled ids (trained) and return the parsed assistant message; the rendered history keeps the
    sampled text itself, so the template re-renders it as it was sampled."""
    segment = run.trajectory.segments[-1]
    context_ids = list(segment.ids)
    segment.extend(list(ids), logps, run.trajectory.turns)
    body = ids[:-1] if ids and ids[-1] in end_ids else ids  # the template writes the end-of-turn itself
    text = _decode(tokenizer, body)
    run.context += _decode(tokenizer, ids)
    run.rendered.append({"role": "assistant", "content": text})
    message = parse_reply(tokenizer, list(body), context_ids, text, run.template_tools or run.env.tools or [])
    message["text"] = text
    run.trajectory.messages.append(message)
    run.trajectory.turns += 1
    return message


def _limit_tool_calls(run: _Run, message: dict, limits: Limits) -> None:
    """Keep the first max_tool_calls calls; the rest are answered with an error, and the trajectory is flagged."""
    calls = message.get("tool_calls") or []
    errors = message.get("tool_call_errors") or []
    if len(calls) > limits.max_tool_calls:
        message["tool_calls"] = calls[:limits.max_tool_calls]
        errors = [*errors, f"only {limits.max_tool_calls} tool calls are run per turn; "
                           f"{len(calls) - limits.max_tool_calls} were not run"]
        message["tool_call_errors"] = errors
        run.trajectory.flags.append("max_tool_calls")
    run.trajectory.tool_calls += len(message.get("tool_calls") or []) + len(errors)


def _add_step(run: _Run, tokenizer, step: Step, limits: Limits) -> None:
    """Record the environment's answer; unless the trajectory ends here, append its messages to the sequence as the
    exact continuation of the text so far (or fork)."""
    trajectory = run.trajectory
    trajectory.turn_rewards.append(step.reward)
    trajectory.infos.append(step.info)
    trajectory.messages += step.messages
    trajectory.tool_errors += sum(m["role"] == "tool" and m["content"].startswith('{"error": ') for m in step.messages)
    if step.done:
        trajectory.done, run.ended = True, True
        return
    if trajectory.turns >= limits.max_turns:
        _stop(run, "max_turns")
        return
    run.rendered += step.messages
    full = render_chat(tokenizer, run.rendered, add_generation_prompt=True, tools=run.template_tools)
    segment = trajectory.segments[-1]
    if full.startswith(run.context):
        bridge = _encode(tokenizer, full[len(run.context):])
        if len(segment.ids) + len(bridge) >= limits.max_tokens:
            _stop(run, "max_tokens")
            return
        segment.extend(bridge)
    else:  # the template re-renders earlier turns differently: a new sample from the rendered context
        ids = _encode(tokenizer, full)
        if len(ids) >= limits.max_tokens:
            _stop(run, "max_tokens")
            return
        trajectory.segments.append(Segment([], [], []))
        trajectory.segments[-1].extend(ids)
    run.context = full


def _stop(run: _Run, limit: str) -> None:
    run.ended = True
    run.trajectory.limit = limit
    run.trajectory.flags.append(limit)


def _finish(run: _Run, limits: Limits) -> None:
    """The trajectory's reward: the last turn's (asking the environment's final_reward where it stopped at a limit
    with no reward), or the sum over turns."""
    trajectory = run.trajectory
    rewards = trajectory.turn_rewards
    if limits.reward == "sum":
        given = [r for r in rewards if r is not None]
        trajectory.reward = sum(given) if given else None
    else:
        trajectory.reward = rewards[-1] if rewards else None
    final = getattr(run.env, "final_reward", None)
    if trajectory.reward is None and not trajectory.done and final is not None:
        trajectory.reward = check_reward(resolve(final()), trajectory.env, run.index, "final_reward")
    if trajectory.reward is None and limits.require_reward:
        raise EnvError(trajectory.env, run.index, f"the trajectory ended ({trajectory.limit or 'done'} after "
                       f"{trajectory.turns} turns) with no reward",
                       "return a reward from the last step (TRL: define get_reward), or score it with a reward "
                       "(require_reward: false)")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)



"""Worked conversations rendered exactly as rollouts render them: fixed assistant replies played through
run_trajectories (the same prompt rendering and tool block, reply parsing, tool calls and the bridges between turns),
so a warm start trains on the token sequences the policy later samples and reads."""

from __future__ import annotations

from alignkit.envs.base import Limits
from alignkit.envs.trajectory import Trajectory, run_trajectories
from alignkit.generate.engines.base import Generation, stop_token_ids


class ScriptedReplies:
    """An engine that writes given replies in turn: each is tokenizer(text) plus the end-of-turn token, as a
    sampler that stopped at the end of that text would have produced it."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies = tokenizer, list(replies)

    def generate(self, prompt_ids, sampling, num_samples: int = 1, seed: int = 0) -> Generation:
        if len(prompt_ids) != 1 or num_samples != 1 or not self.replies:
            raise ValueError("a scripted conversation answers one context at a time, with one reply per turn")
        end_ids = stop_token_ids(self.tokenizer, sampling.stop_strings)
        text = self.replies.pop(0)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + end_ids[:1]
        if len(ids) > sampling.max_new_tokens:
            raise ValueError(f"the worked reply {text!r} is {len(ids)} tokens, over max_new_tokens "
                             f"{sampling.max_new_tokens}: the policy could never write it")
        out = Generation([list(prompt_ids[0])], [], [], [], [], [])
        out.add_rows(self.tokenizer, [ids], [[0.0] * len(ids)], 1, end_ids, sampling.stop_strings)
        return out

    def update_weights(self, model) -> None:
        pass


def demonstration(tokenizer, env, row: dict, replies: list[str], sampling, limits: Limits) -> Trajectory:
    """The trajectory of `env` on `row` when the assistant writes `replies`: ids and loss mask (1 on the replies'
    tokens) exactly as a rollout with those samples. Every reply must be used, and the environment must end it."""
    engine = ScriptedReplies(tokenizer, replies)
    [trajectory] = run_trajectories(engine, tokenizer, [env], [row], sampling, limits)
    if engine.replies or not trajectory.done or trajectory.forks:
        raise ValueError(f"the worked conversation for row {row.get('_row', '?')} did not run as written: "
                         f"{len(engine.replies)} replies unused, ended by the environment: {trajectory.done}, "
                         f"forks: {trajectory.forks}")
    return trajectory

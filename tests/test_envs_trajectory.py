"""Token-exact multi-turn trajectories: the ids are the engine's sampled ids and the environment's rendered turns,
exactly, with the loss mask on the sampled tokens only; a template that re-renders earlier turns differently forks
the trajectory instead of re-tokenising it; limits end and flag a trajectory; the reward is the last turn's or the
sum."""

from __future__ import annotations

import pytest

from alignkit.data.template import render_chat
from alignkit.envs import Limits, run_trajectories
from alignkit.generate.engines import FastEngine, HFEngine
from envs_support import FORGETFUL_TEMPLATE, SAMPLING, Echo, ScriptedEngine, chat_model, chat_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["what is the sum of two", "what is the sum of three", "what is five"]


class Recording:
    """An engine wrapper keeping every (context, sampled ids, log-probs) it produced."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompt_ids, sampling, num_samples=1, seed=0):
        out = self.engine.generate(prompt_ids, sampling, num_samples, seed)
        self.calls += [(list(p), ids[0], lps[0]) for p, ids, lps in zip(prompt_ids, out.ids, out.logprobs)]
        return out

    def update_weights(self, model):
        pass


def runs(mask: list[int], value: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of `value` in mask."""
    spans, start = [], None
    for i, m in enumerate([*mask, None]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("engine_class", [HFEngine, FastEngine])
def test_ids_are_the_sampled_ids_and_the_rendered_environment_turns(engine_class):
    tokenizer = chat_tokenizer()
    engine = Recording(engine_class(chat_model(tokenizer), tokenizer))
    rows = [{"question": q} for q in QUESTIONS]
    trajectories = run_trajectories(engine, tokenizer, [Echo(3) for _ in rows], rows, SAMPLING,
                                    Limits(max_turns=3, max_tokens=256))
    for trajectory in trajectories:
        assert trajectory.forks == 0 and trajectory.done and trajectory.turns == 3
        ids, mask, logps = trajectory.ids, trajectory.loss_mask, trajectory.engine_logps
        # every assistant span is one engine call's sampled ids, given exactly the ids before it as its context
        spans = runs(mask, 1)
        assert len(spans) == 3
        for start, end in spans:
            context, sampled, sampled_logps = next(c for c in engine.calls if c[0] == ids[:start])
            assert ids[start:end] == sampled and logps[start:end] == sampled_logps
        assert all(lp == 0.0 for lp, m in zip(logps, mask) if m == 0)
        # everything else is the template's rendering of the conversation: the prompt, then each user turn
        conversation = [{"role": m["role"], "content": m.get("text", m["content"])} for m in trajectory.messages]
        rendered = tokenizer(render_chat(tokenizer, conversation, add_generation_prompt=False),
                             add_special_tokens=False)["input_ids"]
        assert ids == rendered[:len(ids)] and rendered[len(ids):] in ([], [tokenizer.eos_token_id])
        first = tokenizer(render_chat(tokenizer, conversation[:1], add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"]
        assert ids[:spans[0][0]] == first


def test_a_template_that_rewrites_earlier_turns_forks_instead_of_retokenising():
    tokenizer = chat_tokenizer(FORGETFUL_TEMPLATE)
    engine = ScriptedEngine(tokenizer, {"two": ["hello yes", "good answer", "done"]})
    [trajectory] = run_trajectories(engine, tokenizer, [Echo(3)], [{"question": QUESTIONS[0]}], SAMPLING,
                                    Limits(max_turns=3))
    assert trajectory.forks == 2 and len(trajectory.segments) == 3
    for segment, (context, sampled) in zip(trajectory.segments, engine.calls):
        [(start, end)] = runs(segment.loss_mask, 1)
        assert segment.ids[:start] == context and segment.ids[start:end] == sampled and end == len(segment.ids)
    # a fork starts from the template's own rendering, where the earlier answer is gone ("...")
    history = [{"role": m["role"], "content": m.get("text", m["content"])} for m in trajectory.messages[:3]]
    assert trajectory.segments[1].ids[:len(engine.calls[1][0])] == tokenizer(
        render_chat(tokenizer, history, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="forked 2"):
        _ = trajectory.ids


def test_max_turns_ends_and_flags_a_trajectory_with_the_last_turns_reward():
    tokenizer = chat_tokenizer()
    engine = ScriptedEngine(tokenizer, {"two": ["hello yes", "good answer yes"]})
    [trajectory] = run_trajectories(engine, tokenizer, [Echo(5)], [{"question": QUESTIONS[0]}], SAMPLING,
                                    Limits(max_turns=2))
    assert (trajectory.done, trajectory.limit, trajectory.turns) == (False, "max_turns", 2)
    assert trajectory.turn_rewards == [0.2, 0.3] and trajectory.reward == 0.3
    assert sum(trajectory.loss_mask) == len(engine.calls[0][1]) + len(engine.calls[1][1])


def test_the_token_budget_caps_each_turn_and_flags_the_trajectory():
    tokenizer = chat_tokenizer()
    engine = Recording(HFEngine(chat_model(tokenizer), tokenizer))
    rows = [{"question": q} for q in QUESTIONS]
    trajectories = run_trajectories(engine, tokenizer, [Echo(5) for _ in rows], rows, SAMPLING,
                                    Limits(max_turns=5, max_tokens=24))
    assert {t.limit for t in trajectories} == {"max_tokens"}
    assert all(len(t.ids) <= 24 for t in trajectories)


def test_sum_of_turn_rewards():
    tokenizer = chat_tokenizer()
    engine = ScriptedEngine(tokenizer, {"two": ["hello", "good answer", "yes no yes"]})
    [trajectory] = run_trajectories(engine, tokenizer, [Echo(3)], [{"question": QUESTIONS[0]}], SAMPLING,
                                    Limits(reward="sum"))
    assert trajectory.reward == pytest.approx(0.1 + 0.2 + 0.3)

"""Partial rollouts (`async: {max_staleness: N, partial: true}`, online/partial.py): the producer's segment schedule;
every token sampled by its segment's version (its log-prob rescored under that version's saved weights); a stop
string across two segments ends the response; a run stopped with a part-sampled round in its checkpoint resumes to
the uninterrupted run's weights; what partial refuses."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.config import SamplingOptions
from alignkit.errors import ConfigError
from alignkit.generate.engines import Generation
from alignkit.models.tiny import build_word_tokenizer
from alignkit.online import OnlineInputs, online_config, run_online
from alignkit.online.config import method_loss
from alignkit.online.partial import PartialRound, begin_round, finish_round, sample_segment, segment_span
from alignkit.online.producer import RolloutProducer
from alignkit.online.rollout import RolloutShape, training_examples
from alignkit.train.distributed import Dist
from alignkit.train.reference import score_examples
from synthetic_task import SENTIMENT, prompts
from test_online_async import assert_resumed_as_straight, record_versions
from test_online_guarantees import crash_in_round, values

pytestmark = pytest.mark.usefixtures("one_thread")


def run(task, out, staleness: int, **overrides):
    cfg = online_config(values("grpo", out, **{"async": {"max_staleness": staleness, "partial": True}, **overrides}))
    return run_online(cfg, copy.deepcopy(task.model), task.tokenizer,
                      OnlineInputs(prompts(64, seed=31), prompts(8, seed=32), SENTIMENT))


def test_segments_are_queued_by_their_version_oldest_round_first():
    """Segment j of round r is sampled by version max(0, r - N + j); take(r) gives its last segment's state."""
    rounds, staleness, current, calls = 6, 3, [0], []

    def sample(round_index, segment, state):
        calls.append((round_index, segment, current[0]))
        assert (state or []) == [(round_index, j) for j in range(segment)]  # the round's earlier segments, in order
        return [*(state or []), (round_index, segment)]

    producer = RolloutProducer(sample, rounds, staleness, segments=staleness)
    for version in range(rounds):
        current[0] = version
        producer.start(version)
        assert producer.take(version) == [(version, j) for j in range(staleness)]
        producer.drain()
    producer.close()
    expected = {(r, j, max(0, r - staleness + j)) for r in range(rounds) for j in range(staleness)}
    assert set(calls) == expected and len(calls) == len(expected)
    for version in range(rounds):  # within a version: oldest round first
        order = [r for r, _, v in calls if v == version]
        assert order == sorted(order)


def test_every_token_is_sampled_by_its_segments_version(task, tmp_path, monkeypatch):
    """A response's first len(segment_span(.., 0)) tokens carry version max(0, r - N), the rest max(0, r - N + 1), and
    each token's engine log-prob is that of the policy saved at its version."""
    staleness, rounds = 2, 5
    snapshots, rollouts, runs = record_versions(monkeypatch)
    result = run(task, tmp_path / "partial", staleness, rounds=rounds, eval_before_after=False, max_new_tokens=12)
    first = len(segment_span(12, staleness, 0))
    online, scorer_model, split_seen = runs[0], copy.deepcopy(task.model), False
    assert [row["staleness"] for row in result.rounds] == [min(r, staleness) for r in range(rounds)]
    assert all(row["token_staleness"] < row["staleness"] for row in result.rounds[staleness:])  # fresher tails
    for r, rollout in rollouts.items():
        examples, engine_logps, _ = training_examples(rollout)
        expected = [torch.tensor([max(0, r - staleness + (t >= first)) for n in e.trained_lengths for t in range(n)])
                    for e in examples]
        assert all(torch.equal(a, b) for a, b in zip(rollout.token_versions, expected)), f"round {r + 1}"
        versions, sampled = torch.cat(rollout.token_versions), torch.cat(engine_logps)
        split_seen |= len(set(versions.tolist())) == 2
        for version in set(versions.tolist()):
            scorer_model.load_state_dict(snapshots[version])
            scored = torch.cat(score_examples(scorer_model, examples, online.packing)[1])
            mine = versions == version
            assert torch.allclose(scored[mine], sampled[mine], atol=1e-4), f"round {r + 1}, version {version}"
    assert split_seen  # some response ran across a weight push


class ScriptedEngine:
    """generate() returns the next scripted words for every row (a fake engine for the segment logic)."""

    def __init__(self, tokenizer, script: list[str]):
        self.tokenizer, self.script, self.calls = tokenizer, list(script), []

    def generate(self, prompt_ids, sampling, num_samples=1, seed=0):
        self.calls.append((len(prompt_ids), num_samples, sampling.max_new_tokens))
        ids = self.tokenizer(self.script.pop(0), add_special_tokens=False)["input_ids"][:sampling.max_new_tokens]
        rows = [[ids] * num_samples for _ in prompt_ids]
        return Generation(prompt_ids, rows, [[[-1.0] * len(ids)] * num_samples for _ in prompt_ids],
                          [["length"] * num_samples for _ in prompt_ids], [[""] * num_samples for _ in prompt_ids],
                          [[len(ids)] * num_samples for _ in prompt_ids])


def test_a_stop_string_across_two_segments_ends_the_response():
    tokenizer = build_word_tokenizer(["alpha", "beta", "gamma", "delta", "omega"])
    sampling = SamplingOptions(max_new_tokens=6, stop=["beta gamma"])
    shape = RolloutShape(2, 64, None, None, 0)
    engine = ScriptedEngine(tokenizer, ["alpha beta", "gamma delta", "omega omega"])
    state = begin_round(tokenizer, ["omega"], shape, segments=3)
    for segment in range(3):
        sample_segment(engine, tokenizer, state, sampling, seed=segment)
    assert engine.calls == [(1, 2, 2), (2, 1, 2)]  # the third segment had no live row to sample
    assert state.stopped == [True, True]
    rollout = finish_round(state, lambda ps, ts: [0.0] * len(ts), shape)
    assert rollout.texts == [["alpha", "alpha"]] and bool(rollout.finished.all())
    # kept: up to the token where the stop string starts (beta), as in one whole generate call
    assert [e.response_ids for e in rollout.examples] == [[tokenizer("alpha beta")["input_ids"]] * 2]


def test_a_stopped_partial_run_resumes_to_the_uninterrupted_runs_weights(task, tmp_path):
    common = dict(rounds=5, save_every=1, keep_last=10, epochs=2)
    straight = run(task, tmp_path / "straight", 2, **common)
    crash_in_round(4, lambda: run(task, tmp_path / "stopped", 2, **common))
    inflight = torch.load(tmp_path / "stopped" / "checkpoints" / "step-00000003" / "inflight_rollouts.pt",
                          weights_only=False)
    part = inflight["ranks"][0][4]  # one rank's share (one process: all of it)
    assert isinstance(part, PartialRound) and part.segments_done == 1  # round 5: one segment of two
    resumed = run(task, tmp_path / "stopped", 2, **common)
    assert [row["round"] for row in resumed.rounds] == [4, 5]
    assert_resumed_as_straight(tmp_path / "stopped", tmp_path / "straight")
    assert straight.summary["reward_final"] == resumed.summary["reward_final"]


@pytest.mark.parametrize("bad, key", [
    (dict(max_staleness=1), "async.max_staleness"),
    (dict(dynamic_sampling=True), "dynamic_sampling"),
])
def test_partial_refusals_name_the_key(tmp_path, bad, key):
    settings = {"async": {"max_staleness": bad.pop("max_staleness", 2), "partial": True}, **bad}
    with pytest.raises(ConfigError) as err:
        method_loss(online_config(values("grpo", tmp_path, **settings)))
    assert err.value.key == key


def test_a_checkpoint_keeps_each_ranks_share_and_refuses_another_world_size():
    saved = {"ranks": [{4: "rank 0's share"}, {4: "rank 1's share"}]}
    assert RolloutProducer.restored(saved, Dist(rank=1, world_size=2)) == {4: "rank 1's share"}
    assert RolloutProducer.restored({4: "a whole round"}, Dist(rank=1, world_size=2)) == {4: "a whole round"}
    with pytest.raises(ConfigError) as err:
        RolloutProducer.restored(saved, Dist())
    assert err.value.key == "async.partial" and "2 ranks" in str(err.value)

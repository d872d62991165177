"""`alignkit rl`'s warm start on the model's own answers (recipes/raft.py): only answers that meet every
constraint, pass the training reward's floors and trip no degeneracy flag are kept, at most keep_per_prompt distinct
ones per prompt, token-exact; on the tiny model the SFT changes the weights, GRPO starts from exactly the
warm-started weights, the same seed gives the same kept answers and weights; bad settings are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.config import load_command_config
from alignkit.errors import ConfigError
from alignkit.generate.engines import Generation
from alignkit.recipes import raft, rl
from alignkit.recipes.raft import passing_answers
from alignkit.recipes.rl import RLConfig, run_rl
from alignkit.rewards.verifiable.constraints import check_all
from alignkit.rewards.verifiable.degenerate import flagged

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = {"prompt": [{"role": "user", "content": 'Tell me about the post office. Include the word "window". Do not '
                                                  "use any commas."}],
          "constraints": [{"type": "include", "words": ["window"]}, {"type": "no_commas"}]}
SHORT = {"prompt": "Describe a harbour. Answer in at most 12 words.",
         "constraints": [{"type": "max_words", "n": 12}]}
ANSWERS = [
    # WINDOW: every constraint met but keyword stuffing; a comma; too short for the floor (and only the quoted
    # word); met and unflagged; the same again; another met and unflagged; a third
    ["window " * 3 + "the window has a window and a window window", "The window sells stamps, and parcels.",
     "window", "The post office has a window where you buy stamps.",
     "The post office has a window where you buy stamps.", "You queue at the window to send a parcel home.",
     "A clerk behind the window weighs your letters."],
    # SHORT: over 12 words; a repeated bigram share over the floor's (ships ships ...); met and unflagged
    ["Boats of every size rest in the harbour while gulls circle above the quiet grey water.",
     "ships ships ships ships ships ships", "Fishing boats rest in the calm harbour at dawn."],
]


def generation(answers: list[list[str]]) -> Generation:
    """A generation holding the given texts, each with made-up ids that name its record and sample."""
    ids = [[[100 * i + j, 7] for j in range(len(group))] for i, group in enumerate(answers)]
    return Generation([[1, 2, i] for i in range(len(answers))], ids, [[[0.0, 0.0]] * len(g) for g in answers],
                      [["stop"] * len(g) for g in answers], answers, [[2] * len(g) for g in answers])


def independent_pass(record: dict, text: str) -> bool:
    return all(check_all(record["constraints"], text)) and not flagged(text, record["constraints"],
                                                                        record["prompt"]) and len(text.split()) >= 5


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_only_passing_unflagged_distinct_answers_are_kept_token_exact(keep):
    examples, counts = passing_answers([WINDOW, SHORT], generation(ANSWERS), keep, (5, 0.3))
    expected = {0: [3, 5, 6][:keep], 1: [2][:keep]}
    assert [(e.row, e.response_ids[0][0] % 100) for e in examples] == [
        (i + 1, j) for i, js in expected.items() for j in js]
    for e in examples:
        record, text = [WINDOW, SHORT][e.row - 1], ANSWERS[e.row - 1][e.response_ids[0][0] % 100]
        assert independent_pass(record, text)
        assert e.prompt_ids == [1, 2, e.row - 1] and e.response_ids[0][1] == 7
    # the first answer meets every constraint and is flagged: the filter, not the checkers, rejects it
    assert all(check_all(WINDOW["constraints"], ANSWERS[0][0])) and flagged(ANSWERS[0][0], WINDOW["constraints"],
                                                                           WINDOW["prompt"])
    assert counts == {"prompts": 2, "answers": 10, "all_met": 8, "passing": 5, "prompts_passing": 2,
                      "examples": len(examples)}


def test_a_prompt_without_a_passing_answer_gives_no_example():
    examples, counts = passing_answers([SHORT], generation([ANSWERS[1][:2]]), 1, (5, 0.3))
    assert examples == [] and counts["prompts_passing"] == 0 and counts["all_met"] == 1


def easy_prompts(path, n=12) -> str:
    """Constraints the tiny model meets with almost anything it says: a bound of 1000 words."""
    path.write_text("".join(json.dumps({"prompt": f"Say something about topic {i}.",
                                        "constraints": [{"type": "max_words", "n": 1000}]}) + "\n" for i in range(n)))
    return str(path)


def tiny(task, out, train, **overrides):
    return {"model": str(task.model_dir), "output_dir": str(out), "rounds": 1, "prompts_per_round": 4,
            "num_samples": 2, "sampling": {"max_new_tokens": 6, "batch_size": 32}, "train_prompts": train,
            "eval_sampling": {"max_new_tokens": 6, "batch_size": 96}, "eval_samples": 1, "kl_answers": 4,
            "precision": "fp32", "min_words": 2,
            "warm_start": {"prompts": 8, "samples_per_prompt": 3, "learning_rate": 1e-2, "epochs": 2}, **overrides}


def recorded_run(task, out, train, monkeypatch, **overrides) -> tuple[dict, dict]:
    """run_rl on the tiny model, recording the weights before and after the warm start and at GRPO's start."""
    seen = {}
    warm_start, run_online = raft.run_warm_start, rl.run_online

    def recording_warm_start(model, tokenizer, examples, settings, online, out_dir):
        seen["initial"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["examples"] = examples
        trained = warm_start(model, tokenizer, examples, settings, online, out_dir)
        seen["warm"] = {k: v.clone() for k, v in trained.state_dict().items()}
        return trained

    def recording_online(cfg, model, tokenizer, inputs):
        seen["rl_start"] = {k: v.clone() for k, v in model.state_dict().items()}
        return run_online(cfg, model, tokenizer, inputs)

    monkeypatch.setattr(raft, "run_warm_start", recording_warm_start)
    monkeypatch.setattr(rl, "run_online", recording_online)
    return run_rl(overrides=tiny(task, out, train, **overrides)), seen


def test_grpo_starts_from_the_warm_started_weights_and_the_run_is_seeded(task, tmp_path, monkeypatch):
    train = easy_prompts(tmp_path / "train.jsonl")
    summary, seen = recorded_run(task, tmp_path / "a", train, monkeypatch)
    kept = [json.loads(line) for line in (tmp_path / "a" / "warm_start.jsonl").read_text().splitlines()]
    w = summary["warm_start"]
    assert len(kept) == len(seen["examples"]) == w["examples"] > 0 and w["prompts"] == 8 and w["answers"] == 24
    assert w["examples"] == w["prompts_passing"] <= w["passing"] <= w["all_met"] <= 24
    for record in kept:
        assert all(check_all(record["constraints"], record["completion"]))
        assert not flagged(record["completion"], record["constraints"], record["prompt"])
    assert any(not torch.equal(seen["initial"][k], seen["warm"][k]) for k in seen["warm"])
    assert all(torch.equal(seen["rl_start"][k], seen["warm"][k]) for k in seen["warm"])
    for name in ("held_out", "phrasings"):
        assert w[name]["all_met_before"] == (summary if name == "held_out" else summary["phrasings"])["all_met_before"]
    assert "Warm start" in (tmp_path / "a" / "report.html").read_text()
    assert any("warm start: SFT" in stage for stage in summary["timings_s"])

    again, seen_again = recorded_run(task, tmp_path / "b", train, monkeypatch)
    assert (tmp_path / "b" / "warm_start.jsonl").read_text() == (tmp_path / "a" / "warm_start.jsonl").read_text()
    assert all(torch.equal(seen_again["warm"][k], v) for k, v in seen["warm"].items())
    assert again["all_met_after"] == summary["all_met_after"] and again["warm_start"] == w


def test_without_a_warm_start_grpo_starts_from_the_loaded_weights(task, tmp_path, monkeypatch):
    train = easy_prompts(tmp_path / "train.jsonl")
    summary, seen = recorded_run(task, tmp_path / "run", train, monkeypatch, warm_start={"prompts": 0})
    assert "warm_start" not in summary and "examples" not in seen and not (tmp_path / "run" / "warm_start.jsonl").exists()
    from alignkit.models.resolve import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(str(task.model_dir))[0].state_dict()
    assert all(torch.equal(seen["rl_start"][k], loaded[k]) for k in loaded)


def test_the_answers_are_sampled_with_the_runs_sampling_or_the_temperature_given(task, tmp_path, monkeypatch):
    train, used = easy_prompts(tmp_path / "train.jsonl"), []
    sample_with_counts = raft.sample_with_counts

    def recording(model, tokenizer, prompts, sampling, num_samples, seed):
        used.append((sampling, num_samples, len(prompts)))
        return sample_with_counts(model, tokenizer, prompts, sampling, num_samples, seed)

    monkeypatch.setattr(raft, "sample_with_counts", recording)
    for temperature in (None, 0.5):
        warm = {"prompts": 6, "samples_per_prompt": 2, "temperature": temperature, "evaluate": False}
        summary = run_rl(overrides=tiny(task, tmp_path / str(temperature), train, warm_start=warm))
        sampling, num_samples, prompts = used[-1]
        assert (num_samples, prompts) == (2, 6) and sampling.max_new_tokens == 6
        assert sampling.temperature == (1.0 if temperature is None else 0.5)
        assert "held_out" not in summary["warm_start"] and summary["warm_start"]["answers"] == 12


@pytest.mark.parametrize(("overrides", "key"), [
    ({"warm_start": {"prompts": -1}}, "warm_start.prompts"),
    ({"warm_start": {"samples_per_prompt": 0}}, "warm_start.samples_per_prompt"),
    ({"warm_start": {"keep_per_prompt": 0}}, "warm_start.keep_per_prompt"),
    ({"warm_start": {"epochs": 0}}, "warm_start.epochs"),
    ({"warm_start": {"learning_rate": float("nan")}}, "warm_start.learning_rate"),
    ({"warm_start": {"learning_rate": "fast"}}, "warm_start.learning_rate"),
    ({"warm_start": {"examples_per_step": 0}}, "warm_start.examples_per_step"),
    ({"warm_start": {"evaluate": "sometimes"}}, "warm_start.evaluate"),
    ({"warm_start": {"samples": 8}}, "warm_start.samples"),
    ({"warm_start": {"temperature": 0}}, "warm_start.temperature"),
    ({"warm_start": {"temperature": float("nan")}}, "warm_start.temperature"),
])
def test_bad_warm_start_settings_are_refused_by_name(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_command_config(RLConfig, None, overrides)
    assert key in str(err.value)


def test_more_warm_start_prompts_than_the_training_file_has_is_refused_before_anything_is_written(task, tmp_path):
    train = easy_prompts(tmp_path / "train.jsonl", n=4)
    with pytest.raises(ConfigError, match="warm_start.prompts.*4"):
        run_rl(overrides=tiny(task, tmp_path / "out", train))
    assert not (tmp_path / "out").exists()

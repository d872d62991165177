"""Process reward models: TRL's stepwise tokenisation (a label on each step's last token, the separator's), record
validation, the loss against NumPy and HF's token-classification loss (what TRL's PRMTrainer trained with), the
aggregates against NumPy, best-of-n and weighted best-of-n with a PRM, the `prm:DIR` spec, `alignkit prm`, and the
generated arithmetic task's exact labels."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from alignkit.cli import main
from alignkit.data.step_arithmetic import (
    SLIPS,
    candidate,
    make_problem,
    sample_candidate,
    solve,
    stepwise_records,
    task_vocabulary,
)
from alignkit.data.stepwise import IGNORE, StepSettings, load_stepwise, split_steps, tokenize_steps
from alignkit.decode.bon import BoNOptions, best_of_n, weighted_pick
from alignkit.errors import ConfigError, DataError
from alignkit.losses.prm import prm_loss, step_scores
from alignkit.models.tiny import build_tiny_model, build_tiny_prm, build_word_tokenizer
from alignkit.rewards.prm import ProcessRewardScorer, aggregate_steps
from alignkit.rewards.spec import load_reward
from alignkit.train.prm import PRMConfig, save_prm, train_prm

SEP = " ; "  # the word tokenizer splits on whitespace only, so "\n" would vanish; ";" is a token of its own


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(task_vocabulary())


def test_labels_sit_on_each_steps_separator_as_trl_placed_them(tokenizer):
    """TRL's PRMTrainer.tokenize_row (removed from TRL after 1.13, so not importable from 1.16): [bos] + prompt,
    then every step tokenised alone plus the separator's tokens, its label on the last of them, -100 elsewhere.
    Expected ids written out by hand from the vocabulary."""
    vocab = tokenizer.get_vocab()
    ids, labels = tokenize_steps(tokenizer, "compute mod 10 : 7 + 5", ["7 + 5 = 2", "2 - 3 = 9"], [True, False],
                                 StepSettings(SEP))
    words = ["<bos>", "compute", "mod", "10", ":", "7", "+", "5", "7", "+", "5", "=", "2", ";", "2", "-", "3", "=",
             "9", ";"]
    assert ids == [vocab[w] for w in words]
    assert labels == [IGNORE] * 13 + [1] + [IGNORE] * 5 + [0]
    # train_on_last_step_only: only the last step keeps its label
    ids_last, labels_last = tokenize_steps(tokenizer, "compute mod 10 : 7 + 5", ["7 + 5 = 2", "2 - 3 = 9"],
                                           [None, False], StepSettings(SEP))
    assert ids_last == ids and labels_last == [IGNORE] * 19 + [0]
    # TRL's cut: the steps to max_completion_length first, then the whole to max_length
    _, cut = tokenize_steps(tokenizer, "compute", ["7 + 5 = 2", "2 - 3 = 9"], [True, False],
                            StepSettings(SEP, max_length=None, max_completion_length=7))
    assert cut == [IGNORE] * 2 + [IGNORE] * 5 + [1] + [IGNORE]
    _, cut = tokenize_steps(tokenizer, "compute", ["7 + 5 = 2", "2 - 3 = 9"], [True, False],
                            StepSettings(SEP, max_length=9))
    assert len(cut) == 9 and cut[7] == 1


def test_a_separator_the_tokenizer_drops_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="step_separator"):
        tokenize_steps(tokenizer, "compute", ["7 + 5 = 2"], [True], StepSettings("\n"))


@pytest.mark.parametrize("record, field, reason", [
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, "labels", "1 labels for 2 steps"),
    ({"prompt": "p", "completions": ["a"], "labels": [1]}, "labels[0]", "expected true or false"),
    ({"prompt": "p", "completions": ["a", ""], "labels": [True, False]}, "completions[1]", "empty string"),
    ({"prompt": "p", "completions": [], "labels": []}, "completions", "non-empty list"),
    ({"prompt": "p", "completions": ["a"]}, "labels", "missing field"),
])
def test_bad_stepwise_records_name_file_row_and_field(tmp_path, tokenizer, record, field, reason):
    path = tmp_path / "steps.jsonl"
    good = {"prompt": "compute", "completions": ["7 + 5 = 2"], "labels": [True]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as err:
        load_stepwise(str(path), tokenizer, StepSettings(SEP))
    message = str(err.value)
    assert str(path) in message and "row 2" in message and f"field '{field}'" in message and reason in message
    assert len(load_stepwise(str(path), tokenizer, StepSettings(SEP), on_bad_record="skip")) == 1


def test_loss_equals_numpy_bce_and_hf_token_classification_loss():
    torch.manual_seed(0)
    logits = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    z = logits.detach().numpy()[:, 1] - logits.detach().numpy()[:, 0]
    y = labels.numpy()
    expected = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))
    losses = prm_loss(logits, labels)
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-6)
    # HF's token-classification loss (cross-entropy over the 2 classes, -100 ignored): what TRL's PRMTrainer used
    token_logits = torch.cat([logits, torch.zeros(3, 2, dtype=torch.float64)])[None]
    token_labels = torch.cat([labels, torch.full((3,), IGNORE)])[None]
    hf = torch.nn.functional.cross_entropy(token_logits.view(-1, 2), token_labels.view(-1), ignore_index=IGNORE)
    torch.testing.assert_close(losses.mean(), hf)
    grad_ours = torch.autograd.grad(losses.mean(), logits)[0]
    grad_hf = torch.autograd.grad(hf, logits)[0]
    torch.testing.assert_close(grad_ours, grad_hf)
    np.testing.assert_allclose(step_scores(logits).detach().numpy(), np.exp(logits.detach().numpy())[:, 1]
                               / np.exp(logits.detach().numpy()).sum(1), rtol=1e-6)


def test_training_loss_equals_the_models_own_token_classification_loss(tokenizer):
    """On padded rows, the mean loss over labelled steps equals LlamaForTokenClassification(labels=...).loss."""
    from alignkit.data.stepwise import stepwise_example
    from alignkit.train.prm import batch_loss

    model = build_tiny_prm("llama", len(tokenizer), seed=2).eval()
    examples = [stepwise_example(tokenizer, r, StepSettings(SEP)) for r in stepwise_records(1, 3, steps=(1, 3))]
    loss, _, _ = batch_loss(model, examples, tokenizer.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in examples])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples])
    labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in examples])
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss.detach(), hf, rtol=1e-5, atol=1e-6)


def test_aggregates_equal_numpy():
    scores = [0.9, 0.35, 0.8, 0.6]
    assert aggregate_steps(scores, "last") == pytest.approx(np.asarray(scores)[-1])
    assert aggregate_steps(scores, "min") == pytest.approx(np.min(scores))
    assert aggregate_steps(scores, "prod") == pytest.approx(np.prod(scores))
    assert aggregate_steps([], "min") == 0.0
    with pytest.raises(ConfigError, match="aggregate"):
        aggregate_steps(scores, "mean")


def test_weighted_pick_sums_rewards_per_answer():
    # answer 3 has the single best candidate (0.9) but answer 5 has more total reward (0.5 + 0.6 = 1.1)
    assert weighted_pick([0.9, 0.5, 0.6, 0.2], ["3", "5", "5", None]) == 2
    assert weighted_pick([0.9, 0.5, 0.3], ["3", "5", "5"]) == 0
    assert weighted_pick([0.4, 0.4], [None, None]) == 0  # no answer: never merged, ties -> first


def _scorer(tokenizer, aggregate):
    model = build_tiny_prm("llama", len(tokenizer), seed=3)
    return ProcessRewardScorer.from_model(model, tokenizer, SEP, aggregate)


def test_scorer_reads_p_good_at_each_separator(tokenizer):
    scorer = _scorer(tokenizer, "min")
    problem = make_problem(random.Random(0), 3)
    text = candidate(problem).text(SEP)
    ids, labels = tokenize_steps(tokenizer, problem.prompt, split_steps(text, SEP), [True] * 3, StepSettings(SEP))
    with torch.no_grad():
        logits = scorer.model(input_ids=torch.tensor([ids])).logits[0]
    positions = [i for i, label in enumerate(labels) if label != IGNORE]
    expected = torch.softmax(logits[positions], -1)[:, 1]
    got = scorer.step_scores([problem.prompt, problem.prompt], [text, "7 + 1 = 8" + SEP])
    np.testing.assert_allclose(got[0], expected.numpy(), rtol=1e-5)
    assert len(got[1]) == 1
    assert scorer([problem.prompt], [text])[0] == pytest.approx(float(expected.min()))


@pytest.mark.parametrize("weighted", [False, True])
def test_best_of_n_with_a_prm_picks_the_argmax_of_the_aggregate(tokenizer, weighted):
    scorer = _scorer(tokenizer, "prod")
    policy = build_tiny_model("llama", len(tokenizer), seed=1)
    from alignkit.config import SamplingOptions

    sampling = SamplingOptions(max_new_tokens=12, temperature=1.0, engine="hf")
    prompts = ["compute mod 10 : 7 + 5 - 3", "compute mod 10 : 1 - 2"]
    result = best_of_n(policy, tokenizer, prompts, scorer, BoNOptions(num_samples=6, weighted=weighted), sampling)
    from alignkit.rewards.verifiable.math import extract_answer

    for prompt, detail in zip(prompts, result.details):
        steps = scorer.step_scores([prompt] * 6, detail["candidates"])
        aggregates = [float(np.prod(s)) if s else 0.0 for s in steps]
        np.testing.assert_allclose(detail["candidate_rewards"], aggregates, rtol=1e-5)
        if weighted:
            answers = [extract_answer(c) for c in detail["candidates"]]
            assert detail["chosen_index"] == weighted_pick(aggregates, answers)
        else:
            assert detail["chosen_index"] == int(np.argmax(aggregates))


def test_arithmetic_task_labels_are_exact():
    rng = random.Random(0)
    for _ in range(200):
        problem = make_problem(rng, rng.randint(1, 5))
        right = solve(problem)
        assert all((b + x if op == "+" else b - x) % 10 == a for b, op, x, a in right)
        assert all(right[i][3] == right[i + 1][0] for i in range(len(right) - 1))  # each step starts from the last
        slip_step = rng.randrange(len(problem.operations))
        slip = rng.choice(SLIPS)
        wrong = candidate(problem, slip_step, slip)
        assert wrong.labels == [j < slip_step for j in range(len(right))]
        assert wrong.answer == (problem.answer + slip) % 10 != problem.answer  # a slip corrupts the final answer
        assert candidate(problem).correct and candidate(problem).answer == problem.answer
    assert stepwise_records(7, 20) == stepwise_records(7, 20)  # seeded
    drawn = [sample_candidate(make_problem(rng, 4), rng, p_correct=0.4).correct for _ in range(2000)]
    assert 0.36 < np.mean(drawn) < 0.44


def test_prm_spec_command_and_reload(tmp_path, tokenizer):
    model_dir = tmp_path / "start"
    save_prm(build_tiny_prm("llama", len(tokenizer), seed=0), tokenizer, model_dir, SEP)
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in stepwise_records(0, 8)))
    out = tmp_path / "run"
    assert main(["prm", "--model", str(model_dir), "--train_data", str(data), "--output_dir", str(out),
                 "--step_separator", ";", "--learning_rate", "0.001"]) == 0
    assert (out / "final" / "prm.json").exists() and len((out / "epochs.jsonl").read_text().splitlines()) == 1
    rows = len(load_stepwise(str(data), tokenizer, StepSettings(SEP)))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == -(-rows // 8)  # a line per optimizer step
    reward = load_reward(f"prm:{out / 'final'}", aggregate="min")
    assert isinstance(reward, ProcessRewardScorer) and reward.settings.step_separator == ";"
    text = candidate(make_problem(random.Random(1), 2)).text(SEP)
    steps = reward.step_scores(["compute"], [text])[0]
    assert len(steps) == 2 and reward(["compute"], [text])[0] == pytest.approx(min(steps))
    with pytest.raises(ConfigError, match="aggregate"):
        load_reward("synthetic", aggregate="min")
    with pytest.raises(ConfigError, match="aggregate"):
        load_reward(f"prm:{out / 'final'}", aggregate="mean")
    assert main(["prm", "--model", str(model_dir), "--train_data", str(data), "--epochs", "0"]) == 2


def test_prm_training_stopped_and_resumed_equals_the_straight_run(tmp_path, tokenizer, monkeypatch):
    """alignkit prm on the shared run lifecycle: stopped after a checkpoint in mid-epoch and run again, it ends with
    the straight run's weights, step losses and epoch records (the batches are a function of the epoch, the
    optimizer, schedule and RNG come back from the checkpoint)."""
    import alignkit.train.step as step_module

    records = stepwise_records(0, 24, (1, 2), 2, 10, 1)

    def run(out, **extra):
        cfg = PRMConfig(model="tiny", train_data=records, step_separator=SEP, epochs=2, batch_size=8,
                        learning_rate=1e-3, lr_schedule="cosine", output_dir=str(out), report_to=["jsonl"],
                        progress=False, **extra)
        return train_prm(cfg, build_tiny_prm("llama", len(tokenizer), seed=0), tokenizer)

    straight = run(tmp_path / "straight")
    original, calls = step_module.Stepper.step, []

    def stop_at_fifth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(step_module.Stepper, "step", stop_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", save_every=2)
    monkeypatch.setattr(step_module.Stepper, "step", original)
    saved = sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").glob("step-*"))
    assert saved == ["step-00000002", "step-00000004"]
    resumed = run(tmp_path / "stopped", save_every=2)
    steps = -(-len(load_stepwise(records, tokenizer, StepSettings(SEP))) // 8)
    assert steps > 4  # the stop falls inside the second epoch

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "stopped")) == 2 * steps
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    assert resumed.history == straight.history and len(resumed.history) == 2
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_prm_refuses_embedding_noise(tmp_path, tokenizer):
    cfg = PRMConfig(model="tiny", train_data=stepwise_records(0, 4), step_separator=SEP, neftune_alpha=5.0,
                    output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="neftune_alpha"):
        train_prm(cfg, build_tiny_prm("llama", len(tokenizer), seed=0), tokenizer)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_prm_trained_on_short_problems_ranks_right_above_slipped_on_longer_ones(tmp_path, tokenizer):
    """Trained on 1-2-step problems (+1 / -1 mod 10), a tiny PRM scores the right solution of held-out 3-step
    problems above a slipped one more often than chance; the same network untrained does not."""
    torch.manual_seed(0)
    model = build_tiny_prm("llama", len(tokenizer), seed=0, hidden=64, layers=2)
    untrained = ProcessRewardScorer.from_model(build_tiny_prm("llama", len(tokenizer), seed=0, hidden=64, layers=2),
                                               tokenizer, SEP, "min")
    cfg = PRMConfig(model="tiny", train_data=stepwise_records(0, 200, (1, 2), 2, 10, 1), step_separator=SEP,
                    epochs=40, batch_size=8, learning_rate=1e-3, output_dir=str(tmp_path))
    scorer = ProcessRewardScorer.from_model(train_prm(cfg, model, tokenizer).model, tokenizer, SEP, "min")
    rng = random.Random(1)
    prompts, pairs = [], []
    for _ in range(200):
        problem = make_problem(rng, 3, 10, 1)
        prompts += [problem.prompt] * 2
        pairs += [candidate(problem).text(SEP), candidate(problem, rng.randrange(3), rng.choice(SLIPS)).text(SEP)]

    def ranking(reward):
        scores = np.asarray(reward(prompts, pairs)).reshape(-1, 2)
        return float(np.mean((scores[:, 0] > scores[:, 1]) + 0.5 * (scores[:, 0] == scores[:, 1])))

    assert ranking(scorer) >= 0.58, ranking(scorer)
    assert ranking(untrained) < ranking(scorer) - 0.05

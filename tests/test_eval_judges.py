"""Evaluation (eval/judges.py, kl.py, evaluate.py, `alignkit eval`): a deliberately position-biased judge shows
a biased raw win rate and a calibrated one that recovers the truth; LLM judges and split-and-merge run; reward
accuracy, KL to the reference and length statistics by hand; report files exist and their numbers parse back
equal to the computed ones."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from alignkit.cli import main
from alignkit.config import SamplingOptions
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.decode.bon import BoNOptions, best_of_n
from alignkit.errors import AlignkitError
from alignkit.eval.evaluate import (
    SECTION_TITLES,
    EvalExtras,
    evaluate_responses,
    report_tables,
    reward_accuracy,
    write_eval_report,
)
from alignkit.eval.judges import (
    JUDGE_TEMPLATE,
    FunctionJudge,
    LLMJudge,
    RewardJudge,
    judge_both_orders,
    pairwise_win_rate,
    split_segments,
)
from alignkit.eval.kl import kl_summary, sequence_log_ratios
from alignkit.eval.metrics import length_stats, win_rate
from alignkit.generate.sample import sample
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.rewards.base import FunctionReward
from synthetic_task import SENTIMENT, aligned_model, prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny models run on one thread (tests/conftest.py)


def first_position_bias(bonus: float):
    """A judge that compares sentiment rewards but adds `bonus` to whichever answer it is shown first."""
    def judge(prompt, first, second):
        margin = SENTIMENT([prompt], [first])[0] + bonus - SENTIMENT([prompt], [second])[0]
        return 1.0 if margin > 0 else 0.0 if margin < 0 else 0.5
    return FunctionJudge(judge, name=f"first+{bonus}")


# ---- position bias ----


def test_biased_judge_raw_win_rate_is_biased_and_calibrated_recovers_the_truth():
    # 30 pairs where A is clearly better, 50 where B is, 20 true ties: truth = 0.3 + 0.2 / 2 = 0.4.
    clear_a, clear_b, tie = ("good good", "bad"), ("bad", "good good"), ("fine", "fine")
    pairs = [clear_a] * 30 + [clear_b] * 50 + [tie] * 20
    prompts_ = ["p"] * len(pairs)
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    truth = win_rate(SENTIMENT(prompts_, a), SENTIMENT(prompts_, b))
    assert truth == pytest.approx(0.4)
    result = pairwise_win_rate(first_position_bias(0.25), prompts_, a, b)
    assert result["win_rate_raw"] == pytest.approx(0.5)  # every tie goes to A, shown first
    assert result["win_rate_swapped"] == pytest.approx(0.3)  # every tie goes to B, shown first
    assert result["win_rate_calibrated"] == pytest.approx(truth)
    assert result["consistency_rate"] == pytest.approx(0.8)  # the ties flip with the order
    unbiased = pairwise_win_rate(RewardJudge(SENTIMENT), prompts_, a, b)
    assert unbiased["win_rate_raw"] == unbiased["win_rate_calibrated"] == pytest.approx(truth)
    assert unbiased["consistency_rate"] == 1.0


def test_position_bias_on_model_answers(task):
    questions = prompts(48, seed=7)
    cfg = SamplingOptions(max_new_tokens=10, batch_size=48)
    better = best_of_n(task.model, task.tokenizer, questions, SENTIMENT, BoNOptions(num_samples=4), cfg).responses
    plain = [s[0] for s in sample(task.model, task.tokenizer, questions, SamplingOptions(max_new_tokens=10), seed=9)]
    truth = win_rate(SENTIMENT(questions, better), SENTIMENT(questions, plain))
    # A tiny bonus only breaks exact ties (frequent with this reward) in favour of the first shown: exact recovery.
    tie_bias = pairwise_win_rate(first_position_bias(1e-9), questions, better, plain)
    assert tie_bias["win_rate_raw"] > truth + 0.05
    assert tie_bias["win_rate_calibrated"] == pytest.approx(truth)
    # A soft judge, P(first) = sigmoid(margin / 0.1 + 2), biased by +2 logits towards the first shown. Averaging
    # the orders gives (s(d + 2) + s(d - 2)) / 2, above 1/2 exactly when d > 0: the verdicts are the truth's.
    def soft(prompt, first, second):
        margin = SENTIMENT([prompt], [first])[0] - SENTIMENT([prompt], [second])[0]
        return float(torch.sigmoid(torch.tensor(margin / 0.1 + 2.0)))
    biased = pairwise_win_rate(FunctionJudge(soft), questions, better, plain)
    assert biased["win_rate_raw"] - truth > 0.1  # measured: 0.80 against 0.65
    assert biased["win_rate_swapped"] < truth - 0.1
    assert biased["win_rate_calibrated"] == pytest.approx(truth)
    assert biased["consistency_rate"] < 0.8


def test_llm_judge_and_split_and_merge():
    words = VOCABULARY + ["A", "B", "Which", "response", "Answer"]
    tokenizer = build_word_tokenizer(words)
    model = build_tiny_model("llama", len(tokenizer), seed=3, hidden=32, layers=1).eval()
    judge = LLMJudge(model, tokenizer, segments=2)
    questions = prompts(6)
    a = ["it was good . so good .", "bad", "the movie . was fine . really", "love", "it", "dull and sad"]
    b = ["it was bad", "good good", "fine", "hate it . so bad", "good", "bright"]
    probabilities = judge.prefer(questions, a, b)
    # each probability is the softmax over the A/B next-token logits of one unpadded forward of its own judge prompt
    # (the prompts differ in length, so the batch is left-padded: padding must change nothing)
    choice_a, choice_b = tokenizer.convert_tokens_to_ids(["A", "B"])
    lengths = set()
    for question, first, second, p in zip(questions, a, b, probabilities):
        ids = tokenizer(JUDGE_TEMPLATE.format(question=question, first=first, second=second),
                        add_special_tokens=False)["input_ids"]
        lengths.add(len(ids))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        expected = torch.softmax(logits[[choice_a, choice_b]], -1)[0]
        assert p == pytest.approx(float(expected), abs=1e-5)
    assert len(lengths) > 1
    judgement = judge_both_orders(judge, questions, a, b, split_merge=True)
    summary = judgement.summary()
    flipped = sum((p > 0.5) != (q > 0.5) for p, q in zip(judgement.a_first, judgement.a_second))
    assert summary["split_merge_pairs"] == flipped and 0.0 <= summary["win_rate_split_merge"] <= 1.0
    assert summary["consistency_rate"] == pytest.approx(1 - flipped / 6)
    with pytest.raises(AlignkitError, match="split_merge"):
        judge_both_orders(RewardJudge(SENTIMENT), questions, a, b, split_merge=True)
    with pytest.raises(AlignkitError, match="single token"):
        LLMJudge(model, tokenizer, choices=("A B", "B"))
    with pytest.raises(AlignkitError, match="vocabulary"):
        LLMJudge(model, build_word_tokenizer(VOCABULARY))  # "A" and "B" would both be <unk>


def test_split_segments():
    text = "One. Two two. Three three three. Four."
    parts = split_segments(text, 2)
    assert len(parts) == 2 and " ".join(parts) == text
    assert split_segments("just three words", 3) == ["just", "three", "words"]
    assert split_segments("two words", 3) == ["two", "", "words"]  # always k parts, so both answers have k


# ---- measures ----


def test_reward_accuracy_on_a_preference_set():
    records = preference_records(40, seed=4)
    assert reward_accuracy(SENTIMENT, records)["accuracy"] == 1.0  # the set is labelled by this reward
    flipped = FunctionReward(lambda p, r: -SENTIMENT([p], [r])[0])
    result = reward_accuracy(flipped, records)
    assert result["accuracy"] == 0.0 and result["margin"] < 0 and result["pairs"] == 40
    constant = reward_accuracy(FunctionReward(lambda p, r: 1.0), records)
    assert constant["accuracy"] == 0.5  # all ties count half


def test_kl_to_reference(task):
    aligned = aligned_model()
    questions = prompts(128, seed=8)
    answers = [s[0] for s in sample(aligned, task.tokenizer, questions, SamplingOptions(max_new_tokens=10), seed=2)]
    assert sequence_log_ratios(task.model, task.model, task.tokenizer, questions, answers) == [0.0] * 128
    ratios = sequence_log_ratios(aligned, task.model, task.tokenizer, questions, answers)
    # the aligned model's samples are likelier under it: measured 0.23-0.30 nats (standard error ~0.08) over seeds
    summary = kl_summary(ratios)
    assert summary["kl"] > 0.1 and summary["kl"] > summary["kl_sem"]

    def direct(model, prompt, answer):  # one unpacked forward per sequence, EOS appended as in training
        prompt_ids = task.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = task.tokenizer(answer + task.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([prompt_ids + answer_ids])).logits[0], -1)
        return sum(float(logps[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(answer_ids))

    expected = [direct(aligned, q, a) - direct(task.model, q, a) for q, a in zip(questions, answers)]
    np.testing.assert_allclose(ratios, expected, atol=1e-4)
    summary = kl_summary([1.0, 2.0, 3.0])
    assert summary["kl"] == 2.0 and summary["kl_sem"] == pytest.approx(1 / 3 ** 0.5)


def test_length_stats_by_hand():
    stats = length_stats(["a b c", "", "a b c d e f g"])
    assert stats["words_mean"] == pytest.approx(10 / 3) and stats["words_median"] == 3.0
    assert stats["words_max"] == 7.0 and stats["empty_share"] == pytest.approx(1 / 3)
    assert stats["words_p90"] == pytest.approx(np.quantile([3, 0, 7], 0.9))


# ---- report ----


class TableCells(HTMLParser):
    """(caption, [row cells]) of every <h2> + <table> in the report."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._caption, self._row, self._cell, self._in_h2 = None, None, None, False

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self._in_h2, self._caption = True, ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
            self.tables[self._caption] = []
        elif tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.tables[self._caption].append(self._row)

    def handle_data(self, data):
        if self._in_h2:
            self._caption += data
        elif self._cell is not None:
            self._cell += data


def test_report_files_hold_the_computed_numbers(task, tmp_path):
    aligned = aligned_model()
    questions = prompts(16, seed=12)
    cfg = SamplingOptions(max_new_tokens=10)
    answers_a = [s[0] for s in sample(aligned, task.tokenizer, questions, cfg, seed=3)]
    answers_b = [s[0] for s in sample(task.model, task.tokenizer, questions, cfg, seed=3)]
    answers_c = [s[0] for s in sample(task.model, task.tokenizer, questions, cfg, seed=4)]  # the URIAL row's place
    summary = evaluate_responses(questions, answers_a, SENTIMENT, answers_b, first_position_bias(0.1),
                                 EvalExtras(policy=aligned, reference=task.model, tokenizer=task.tokenizer,
                                            preferences=preference_records(20, seed=1), shift_base=task.model,
                                            urial_responses=answers_c, urial_name="sft"))
    paths = write_eval_report(tmp_path / "report", summary, ("aligned", "sft"))
    saved = json.loads(paths["json"].read_text())
    assert {k: v for k, v in saved.items() if k != "names"} == summary  # floats survive JSON exactly
    assert saved["names"] == {"a": "aligned", "b": "sft"}
    parser = TableCells()
    parser.feed(paths["html"].read_text())
    checked = 0
    for section, caption in SECTION_TITLES.items():
        rows = parser.tables[caption]
        assert rows[0] == ["key", "value"] and len(rows) == len(summary[section]) + 1
        for key, text in rows[1:]:
            value = summary[section][key]
            if isinstance(value, str):
                assert text == value
            else:
                assert float(text) == pytest.approx(value, abs=5e-7)
                checked += 1
    assert checked > 30 and report_tables(summary).keys() <= parser.tables.keys()
    baselines = parser.tables["A against each baseline"]
    assert [row[0] for row in baselines[1:]] == ["sft", "sft + URIAL (training-free)"]
    assert baselines[2][1] == f"{summary['urial']['mean_urial']:+.4f}"
    assert summary["reward"]["mean_a"] > summary["reward"]["mean_b"] and summary["kl"]["kl"] > 0
    for name in ("rewards_png", "win_rate_png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli(task, tmp_path):
    questions = prompts(8, seed=13)
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": q} for q in questions])
    write_jsonl_atomic(tmp_path / "prefs.jsonl", preference_records(10, seed=2))
    aligned_dir = tmp_path / "aligned"
    aligned_model().save_pretrained(aligned_dir)
    task.tokenizer.save_pretrained(aligned_dir)
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(aligned_dir), "--baseline", str(task.model_dir), "--prompts",
                 str(tmp_path / "prompts.jsonl"), "--preferences", str(tmp_path / "prefs.jsonl"), "--output_dir", str(out),
                 "--max_new_tokens", "8", "--seed", "5"])
    assert code == 0
    saved = json.loads((out / "eval.json").read_text())
    cfg = SamplingOptions(max_new_tokens=8)
    answers_a = [s[0] for s in sample(aligned_model(), task.tokenizer, questions, cfg, seed=5)]
    answers_b = [s[0] for s in sample(task.model, task.tokenizer, questions, cfg, seed=5)]
    assert saved["rewards_a"] == SENTIMENT(questions, answers_a) and saved["rewards_b"] == SENTIMENT(questions, answers_b)
    assert saved["reward_accuracy"]["accuracy"] == 1.0 and saved["judge"]["consistency_rate"] == 1.0
    assert saved["kl"]["samples"] == 8
    assert all((out / name).exists() for name in ("report.html", "rewards.png", "win_rate.png"))
    assert main(["eval", "--prompts", str(tmp_path / "prompts.jsonl"), "--output_dir", str(out)]) == 2  # no model A


def test_eval_cli_with_an_llm_judge_directory_and_split_merge(tmp_path):
    """`alignkit eval --judge llm:DIR --split_merge`: the judge section equals LLMJudge on that directory's model,
    both orders and split-and-merge; the reward section's numbers equal NumPy on the rewards."""
    tokenizer = build_word_tokenizer(VOCABULARY + ["A", "B", "Which", "response", "Answer"])
    judge_model = build_tiny_model("llama", len(tokenizer), seed=5, hidden=32, layers=1).eval()
    judge_model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    questions = prompts(6, seed=21)
    a = ["it was good . so good .", "bad", "the movie . was fine . really", "love it", "it", "dull and sad"]
    b = ["it was bad", "good good", "fine", "hate it . so bad", "good", "bright"]
    for name, responses in (("a", a), ("b", b)):
        write_jsonl_atomic(tmp_path / f"{name}.jsonl", [{"prompt": q, "completion": r} for q, r in zip(questions, responses)])
    out = tmp_path / "eval"
    assert main(["eval", "--responses", str(tmp_path / "a.jsonl"), "--baseline_responses", str(tmp_path / "b.jsonl"),
                 "--judge", f"llm:{tmp_path / 'judge'}", "--split_merge", "true", "--output_dir", str(out)]) == 0
    saved = json.loads((out / "eval.json").read_text())
    expected = judge_both_orders(LLMJudge(judge_model, tokenizer), questions, a, b, split_merge=True).summary()
    assert saved["judge"]["judge"].startswith("llm")
    for key, value in expected.items():
        assert saved["judge"][key] == pytest.approx(value, abs=1e-6), key
    assert saved["judge"]["split_merge_pairs"] > 0  # some answers flipped with the order, so merging ran
    ra, rb = np.array(SENTIMENT(questions, a)), np.array(SENTIMENT(questions, b))
    assert saved["reward"]["mean_a"] == pytest.approx(ra.mean()) and saved["reward"]["mean_b"] == pytest.approx(rb.mean())
    assert saved["reward"]["gain"] == pytest.approx((ra - rb).mean())
    assert saved["reward"]["win_rate"] == pytest.approx(((ra > rb) + 0.5 * (ra == rb)).mean())
    assert saved["reward"]["gain_ci_low"] < saved["reward"]["gain"] < saved["reward"]["gain_ci_high"]
    words = np.array([len(r.split()) for r in a])
    assert saved["length_a"]["words_mean"] == pytest.approx(words.mean())

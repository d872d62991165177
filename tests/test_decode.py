"""Decoding-time alignment (decode/) on the synthetic task, with its programmatic sentiment reward and fixed seeds:
best-of-n and ARGS raise the mean reward over plain sampling by a clear margin, more samples -> more reward,
calibrated best-of-n ranks against reference samples, DeAL and Transfer Q* beat greedy decoding, the zero-weight
searches are greedy decoding, compute is accounted, BoNBoN pairs train with `alignkit bonbon` / `alignkit dpo`,
and the BoNBoN loss matches its formula."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from alignkit.cli import main
from alignkit.config import SamplingOptions
from alignkit.data.load import load_records, write_jsonl_atomic
from alignkit.decode.args import ARGSOptions, args_decode
from alignkit.decode.base import Search, efficiency
from alignkit.decode.bon import BoNOptions, best_of_n, plain_sampling
from alignkit.decode.bonbon import BonBonPairsOptions, best_worst_pairs, bonbon_pairs, recommended_options
from alignkit.decode.calibrated import (
    CalibratedOptions,
    CalibratedReward,
    calibrated_best_of_n,
    empirical_cdf,
)
from alignkit.decode.deal import DeALOptions, deal_decode
from alignkit.decode.tq import TQOptions, implicit_values, tq_decode
from alignkit.errors import ConfigError
from alignkit.generate.engines import encode_prompts
from alignkit.generate.sample import sample
from alignkit.losses import build_options, get_loss
from alignkit.losses.base import LossInputs
from alignkit.losses.bonbon import BonBonOptions, bonbon_beta, bonbon_loss
from alignkit.losses.pairwise import IPOOptions, ipo_loss
from alignkit.rewards.base import FunctionReward, WeightedSum
from synthetic_task import SENTIMENT, aligned_model, prompts

SAMPLING = SamplingOptions(max_new_tokens=10, batch_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny models run on one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def questions():
    return prompts(32)


def mean(values) -> float:
    return sum(values) / len(values)


# ---- best-of-n ----


def test_best_of_n_beats_plain_sampling(task, questions):
    plain = plain_sampling(task.model, task.tokenizer, questions, SENTIMENT, SAMPLING)
    best = best_of_n(task.model, task.tokenizer, questions, SENTIMENT, BoNOptions(num_samples=8), SAMPLING)
    gain = best.summary()["mean_reward"] - plain.summary()["mean_reward"]
    assert gain > 0.15, (plain.summary(), best.summary())  # measured: +0.34 (-0.04 -> 0.31)
    report = efficiency(best, plain)
    assert report["reward_gain"] == pytest.approx(gain)
    assert report["compute_ratio_tokens"] == pytest.approx(8, rel=0.25)
    assert report["gain_per_1k_extra_tokens"] == pytest.approx(
        gain * 1000 / (best.summary()["generated_tokens_per_prompt"] - plain.summary()["generated_tokens_per_prompt"]))


def test_more_samples_more_reward(task, questions):
    means = {n: mean([best_of_n(task.model, task.tokenizer, questions, SENTIMENT, BoNOptions(num_samples=n, seed=seed),
                                SamplingOptions(max_new_tokens=10, batch_size=32)).summary()["mean_reward"]
                      for seed in (0, 1, 2)]) for n in (1, 2, 4, 8)}
    assert means[1] < means[2] < means[4] < means[8], means  # measured: 0.01, 0.15, 0.21, 0.30


def test_best_of_n_picks_the_max_and_counts_compute(task, questions):
    result = best_of_n(task.model, task.tokenizer, questions[:8], SENTIMENT, BoNOptions(num_samples=4), SAMPLING)
    for detail, response, reward in zip(result.details, result.responses, result.rewards):
        scores = detail["candidate_rewards"]
        assert reward == max(scores) and detail["chosen_index"] == scores.index(max(scores))  # first of ties
        assert response == detail["candidates"][detail["chosen_index"]]
    # exact: every token the engine sampled (each candidate up to and including its EOS, or all 10 when cut),
    # one sequence-step each, and one reward call per candidate
    from alignkit.generate.engines import encode_prompts, make_engine

    generation = make_engine(task.model, task.tokenizer, SAMPLING).generate(
        encode_prompts(task.tokenizer, questions[:8]), SAMPLING, 4)
    assert [d["candidates"] for d in result.details] == generation.texts
    tokens = sum(len(ids) for row in generation.ids for ids in row)
    assert tokens == sum(10 if r == "length" else len(ids) for rows, reasons in
                         zip(generation.ids, generation.finish_reasons) for ids, r in zip(rows, reasons))
    assert result.compute.generated_tokens == result.compute.forward_passes == tokens
    assert result.compute.reward_calls == 8 * 4
    summary = result.summary()
    assert summary["reward_per_1k_tokens"] == pytest.approx(summary["mean_reward"] * 1000
                                                            / summary["generated_tokens_per_prompt"])
    assert json.loads(json.dumps(result.records()))[0]["response"] == result.responses[0]


# ---- InfAlign-style calibration ----


def test_empirical_cdf_by_hand():
    reference = [0.1, 0.2, 0.2, 0.5]
    assert empirical_cdf(reference, 0.2) == pytest.approx((1 + 0.5 * 2) / 4)
    assert empirical_cdf(reference, 0.2, tie_weight=1.0) == pytest.approx(3 / 4)
    assert empirical_cdf(reference, 0.0) == 0.0 and empirical_cdf(reference, 0.9) == 1.0


def test_calibration_ignores_per_prompt_offsets_and_monotone_transforms():
    prompts_ = ["p1", "p2"]
    reference = [["a", "bb", "ccc"], ["a", "bb", "dddd"]]
    length = FunctionReward(lambda p, r: float(len(r)))
    shifted = FunctionReward(lambda p, r: math.exp(len(r)) + (100.0 if p == "p2" else 0.0))
    responses = ["bb", "ccc"]
    plain = CalibratedReward(length, prompts_, reference)(prompts_, responses)
    other = CalibratedReward(shifted, prompts_, reference)(prompts_, responses)
    assert plain == other == [pytest.approx(1.5 / 3), pytest.approx(2 / 3)]


def test_calibrating_components_puts_them_on_one_scale():
    # Part "big" ranges over 0..100, "small" over 0..1: the raw sum follows "big"; calibrated, each counts the same.
    big = FunctionReward(lambda p, r: 100.0 * r.count("x"), name="big")
    small = FunctionReward(lambda p, r: float(r.count("y")), name="small")
    reward = WeightedSum([(big, 1.0), (small, 1.0)])
    reference = [["", "x", "y", "yy", "yyy"]]
    candidates = ["x", "yyy"]  # raw sum: 100 vs 3; calibrated: x beats 3 of 5 on big, yyy 4.5 of 5 on small
    raw = reward(["p"] * 2, candidates)
    calibrated = CalibratedReward(reward, ["p"], reference, calibrate_components=True)(["p"] * 2, candidates)
    assert raw[0] > raw[1] and calibrated[1] > calibrated[0]


def test_calibrated_best_of_n(task, questions):
    result = calibrated_best_of_n(task.model, task.tokenizer, questions, SENTIMENT, CalibratedOptions(num_samples=4, num_reference=16), SAMPLING)
    plain = best_of_n(task.model, task.tokenizer, questions, SENTIMENT, BoNOptions(num_samples=4), SAMPLING)
    assert result.responses == plain.responses  # one reward: the calibrated argmax is the reward's argmax
    calibrated = [d["calibrated_reward"] for d in result.details]
    assert 0.6 < mean(calibrated) <= 1.0  # best of 4 beats most reference samples (4/5 for a continuous reward)
    own = [c for d in result.details for c in d["calibrated_rewards"]]  # the policy's own samples: ~ uniform
    assert abs(mean(own) - 0.5) < 0.1
    assert result.compute.generated_tokens > plain.compute.generated_tokens  # reference samples cost tokens
    assert result.compute.reward_calls == 32 * (16 + 4)


# ---- token-level search ----


def test_args_beats_plain_sampling(task, questions):
    plain = plain_sampling(task.model, task.tokenizer, questions, SENTIMENT, SAMPLING)
    guided = args_decode(task.model, task.tokenizer, questions, SENTIMENT, ARGSOptions(top_k=10, weight=4.0,
                                                                                       max_new_tokens=10))
    gain = guided.summary()["mean_reward"] - plain.summary()["mean_reward"]
    assert gain > 0.3, (plain.summary(), guided.summary())  # measured: +0.75 (-0.04 -> 0.71)
    assert guided.rewards == SENTIMENT(questions, guided.responses)
    assert guided.compute.reward_calls >= 10 * guided.compute.generated_tokens  # top-k candidates scored per token
    stochastic = args_decode(task.model, task.tokenizer, questions, SENTIMENT,
                             ARGSOptions(top_k=10, weight=4.0, max_new_tokens=10, mode="sample", seed=1))
    assert stochastic.summary()["mean_reward"] > plain.summary()["mean_reward"] + 0.1  # measured: +0.19


def test_zero_weight_searches_are_greedy_decoding(task, questions):
    greedy = [s[0] for s in sample(task.model, task.tokenizer, questions, SamplingOptions(max_new_tokens=10,
                                                                                        temperature=0.0))]
    args = args_decode(task.model, task.tokenizer, questions, SENTIMENT, ARGSOptions(top_k=1, weight=0.0,
                                                                                     max_new_tokens=10, batch_size=7))
    tq = tq_decode(task.model, task.tokenizer, questions, task.model, TQOptions(top_k=5, weight=0.0, max_new_tokens=10))
    assert args.responses == greedy  # the KV-cached stepping over a left-padded batch reproduces HF generate
    assert tq.responses == greedy
    assert tq.rewards == [0.0] * len(questions)  # implicit reward of a model against itself


def test_deal_lookahead_search_beats_greedy(task, questions):
    batch = questions[:12]
    base = deal_decode(task.model, task.tokenizer, batch, SENTIMENT, DeALOptions(beams=2, top_k=10, lookahead=2,
                                                                                 weight=0.0, max_new_tokens=8))
    search = deal_decode(task.model, task.tokenizer, batch, SENTIMENT, DeALOptions(beams=2, top_k=10, lookahead=2,
                                                                                   weight=5.0, max_new_tokens=8))
    assert search.summary()["mean_reward"] > base.summary()["mean_reward"] + 0.3  # measured: 0.00 -> 0.71
    assert all(len(d["beams"]) <= 2 for d in search.details)
    # Every step scores beams x top_k candidates, each with a lookahead: far more tokens than the answer has.
    assert search.compute.generated_tokens > 2 * 10 * sum(len(r.split()) for r in search.responses)


def test_transfer_q_star_beats_greedy(task, questions):
    aligned = aligned_model()
    batch = questions[:16]
    greedy = tq_decode(task.model, task.tokenizer, batch, aligned, TQOptions(top_k=8, weight=0.0, max_new_tokens=8),
                       SENTIMENT)
    guided = tq_decode(task.model, task.tokenizer, batch, aligned, TQOptions(top_k=8, weight=1.0, lookahead=3,
                                                                             max_new_tokens=8), SENTIMENT)
    assert guided.summary()["mean_reward"] > greedy.summary()["mean_reward"] + 0.2  # measured: 0.00 -> 0.55
    by_reward = tq_decode(task.model, task.tokenizer, batch, aligned, TQOptions(top_k=8, weight=4.0, lookahead=3,
                                                                                max_new_tokens=8, value="reward"), SENTIMENT)
    assert by_reward.summary()["mean_reward"] > greedy.summary()["mean_reward"] + 0.2


def test_implicit_values_equal_separate_forward_passes(task, questions):
    aligned = aligned_model()
    contexts = encode_prompts(task.tokenizer, questions[:5])
    continuations = [task.tokenizer(t, add_special_tokens=False)["input_ids"]
                     for t in ["good day", "the bad", "it was great fine", "so", ""]]
    search = Search.start(task.model, task.tokenizer, None, TQOptions(max_tokens_per_row=24), aligned=aligned)
    search.pad_id = 0
    values = implicit_values(search, contexts, continuations)

    def logp(model, context, continuation):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0].float(), -1)
        return sum(float(logps[len(context) - 1 + j, t]) for j, t in enumerate(continuation))

    expected = [logp(aligned, c, x) - logp(task.model, c, x) for c, x in zip(contexts, continuations)]
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-4)
    assert values[4] == 0.0


# ---- BoNBoN ----


def test_bonbon_pairs_train_with_bonbon_and_dpo(task, questions, tmp_path):
    pairs, result = bonbon_pairs(task.model, task.tokenizer, questions, SENTIMENT, BonBonPairsOptions(num_samples=8), SAMPLING)
    assert len(pairs) > len(questions) // 2
    assert all(p["chosen_reward"] > p["rejected_reward"] and p["n"] == 8 for p in pairs)
    groups = [d["candidates"] for d in result.details]
    assert pairs == best_worst_pairs(questions, groups, [d["candidate_rewards"] for d in result.details], n=8)
    best = {max(d["candidate_rewards"]) for d in result.details}
    assert all(p["chosen_reward"] in best for p in pairs)
    write_jsonl_atomic(tmp_path / "pairs.jsonl", pairs)
    assert len(load_records(tmp_path / "pairs.jsonl", shape="pairs")) == len(pairs)
    common = ["--model", str(task.model_dir), "--train_data", str(tmp_path / "pairs.jsonl"), "--max_steps", "1",
              "--max_length", "64", "--progress", "false", "--ref_cache", "false"]
    options = recommended_options(8)
    assert main(["bonbon", *common, "--output_dir", str(tmp_path / "bonbon"), "--alpha", str(options["alpha"]),
                 "--beta", str(options["beta"])]) == 0
    assert main(["dpo", *common, "--output_dir", str(tmp_path / "dpo")]) == 0


def test_best_worst_pairs_skip_ties_and_empty_answers():
    groups = [["a", "b", "c"], ["x", "x"], ["", "good", "bad"]]
    scores = [[0.1, 0.5, -0.2], [0.3, 0.3], [9.0, 0.4, 0.1]]
    pairs = best_worst_pairs(["p1", "p2", "p3"], groups, scores)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("p1", "b", "c"), ("p3", "good", "bad")]
    assert best_worst_pairs(["p1"], groups[:1], scores[:1], min_gap=0.8) == []


def test_bonbon_beta_matches_the_readme_value():
    assert bonbon_beta(8) == pytest.approx(0.0275482094, abs=1e-10)
    assert bonbon_beta(2) == pytest.approx(0.5)  # 1 / (2 * 1 * H_1)
    assert BonBonOptions().beta == pytest.approx(bonbon_beta(8))
    with pytest.raises(ValueError):
        bonbon_beta(1)


def loss_inputs(seed: int, requires_grad: bool = False) -> LossInputs:
    rng = np.random.default_rng(seed)
    logps = torch.tensor(-rng.uniform(5, 30, size=(6, 2)), dtype=torch.float64, requires_grad=requires_grad)
    ref = torch.tensor(logps.detach().numpy() + rng.normal(0, 3, size=(6, 2)), dtype=torch.float64)
    return LossInputs(logps=logps, lengths=torch.full((6, 2), 7.0, dtype=torch.float64), ref_logps=ref)


@pytest.mark.parametrize("alpha,beta", [(0.005, 0.0275482094), (0.3, 0.1), (0.0, 0.5), (1.0, 0.2)])
def test_bonbon_loss_value_matches_numpy(alpha, beta):
    inputs = loss_inputs(0)
    logps, ref = inputs.logps.numpy(), inputs.ref_logps.numpy()
    h = (logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])
    expected = alpha * -logps[:, 0] + (1 - alpha) * (h - 1 / (2 * beta)) ** 2
    losses, metrics = bonbon_loss(inputs, BonBonOptions(alpha=alpha, beta=beta))
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(metrics["bonbon/sft"].numpy(), -logps[:, 0])


def test_bonbon_loss_gradient_matches_autograd_of_a_naive_version():
    inputs, naive_inputs = loss_inputs(1, requires_grad=True), loss_inputs(1, requires_grad=True)
    opts = BonBonOptions(alpha=0.2, beta=0.1)
    bonbon_loss(inputs, opts)[0].sum().backward()
    lp, ref = naive_inputs.logps, naive_inputs.ref_logps
    naive = sum(0.2 * -lp[i, 0] + 0.8 * ((lp[i, 0] - ref[i, 0]) - (lp[i, 1] - ref[i, 1]) - 5.0) ** 2 for i in range(6))
    naive.backward()
    np.testing.assert_allclose(inputs.logps.grad.numpy(), naive_inputs.logps.grad.numpy(), rtol=1e-12)


def test_bonbon_loss_limits():
    inputs = loss_inputs(2)
    ipo, _ = ipo_loss(inputs, IPOOptions(beta=0.1))
    assert torch.allclose(bonbon_loss(inputs, BonBonOptions(alpha=0.0, beta=0.1))[0], ipo)  # alpha 0: IPO
    assert torch.allclose(bonbon_loss(inputs, BonBonOptions(alpha=1.0, beta=0.1))[0], -inputs.logps[:, 0])  # SFT
    spec = get_loss("bonbon")
    assert spec.data_shape == "pairs" and spec.needs_reference
    with pytest.raises(ConfigError, match="alpha"):
        build_options(spec, {"alpha": 1.5})


# ---- CLI ----


def test_decode_cli_writes_records_and_compute_summary(task, tmp_path):
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": q} for q in prompts(6)])
    common = ["--model", str(task.model_dir), "--prompts", str(tmp_path / "prompts.jsonl"), "--reward", "synthetic",
              "--max_new_tokens", "8"]
    assert main(["decode", "--method", "args", "--weight", "4", *common, "--output_dir", str(tmp_path / "args")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "args" / "decoded.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "args" / "summary.json").read_text())
    assert len(rows) == 6 and summary["mean_reward"] == pytest.approx(mean([r["reward"] for r in rows]))
    assert summary["efficiency"]["reward_gain"] == pytest.approx(
        summary["mean_reward"] - summary["efficiency"]["baseline_mean_reward"])
    assert summary["compute"]["generated_tokens"] > 0 and summary["compute"]["reward_calls"] > 0
    assert main(["decode", "--method", "bonbon", "--num_samples", "4", *common, "--output_dir", str(tmp_path / "bonbon")]) == 0
    assert load_records(tmp_path / "bonbon" / "pairs.jsonl", shape="pairs")
    bonbon_summary = json.loads((tmp_path / "bonbon" / "summary.json").read_text())
    assert bonbon_summary["train_with"] == {"loss": "bonbon", "loss_options": recommended_options(4)}
    assert main(["decode", "--method", "tq", *common, "--output_dir", str(tmp_path / "tq")]) == 2  # needs --aligned


class CountingReward(FunctionReward):
    """The task's reward, counting every (prompt, response) pair it scores."""

    def __init__(self):
        super().__init__(lambda prompt, response: SENTIMENT([prompt], [response])[0], name="counting")
        self.pairs = 0

    def score(self, prompts, responses):
        self.pairs += len(responses)
        return super().score(prompts, responses)


def rows_forwarded(model):
    """A forward hook counting the sequences of every forward call (one uncached call per step in DeAL)."""
    seen = [0]
    handle = model.register_forward_hook(lambda module, args, kwargs, out: seen.__setitem__(
        0, seen[0] + kwargs["input_ids"].shape[0]), with_kwargs=True)
    return seen, handle


def test_decode_compute_counts_are_exact(task, questions):
    batch = questions[:6]
    for run in (lambda r: best_of_n(task.model, task.tokenizer, batch, r, BoNOptions(num_samples=3), SAMPLING),
                lambda r: calibrated_best_of_n(task.model, task.tokenizer, batch, r, CalibratedOptions(num_samples=3, num_reference=5), SAMPLING),
                lambda r: args_decode(task.model, task.tokenizer, batch, r, ARGSOptions(top_k=4, weight=2.0,
                                                                                       max_new_tokens=6)),
                lambda r: deal_decode(task.model, task.tokenizer, batch, r, DeALOptions(beams=2, top_k=3, lookahead=2,
                                                                                        max_new_tokens=5))):
        reward = CountingReward()
        assert run(reward).compute.reward_calls == reward.pairs > 0
    # calibrated: the candidates' and the reference samples' tokens, each counted once (as the engine made them)
    from alignkit.decode.calibrated import REFERENCE_SEED_OFFSET
    from alignkit.generate.engines import make_engine

    result = calibrated_best_of_n(task.model, task.tokenizer, batch, SENTIMENT, CalibratedOptions(num_samples=3, num_reference=5), SAMPLING)
    ids = encode_prompts(task.tokenizer, batch)
    made = []
    for n, cfg, seed in ((5, SamplingOptions(max_new_tokens=10, batch_size=32), REFERENCE_SEED_OFFSET), (3, SAMPLING, 0)):
        made.append(make_engine(task.model, task.tokenizer, cfg).generate(ids, cfg, n, seed))
    assert [d["candidates"] for d in result.details] == made[1].texts
    tokens = sum(len(x) for g in made for row in g.ids for x in row)
    assert result.compute.generated_tokens == result.compute.forward_passes == tokens
    # DeAL without lookahead: one uncached forward over the live beams per step, top_k children of each
    seen, handle = rows_forwarded(task.model)
    try:
        deal = deal_decode(task.model, task.tokenizer, batch, SENTIMENT, DeALOptions(beams=2, top_k=3, lookahead=0,
                                                                                      max_new_tokens=5))
    finally:
        handle.remove()
    assert deal.compute.forward_passes == seen[0] > 0
    assert deal.compute.generated_tokens == 3 * seen[0]


def test_decode_cli_methods_equal_the_library(task, questions, tmp_path):
    """sample, bon, bon-calibrated and deal through `alignkit decode`: the written records and compute are the
    library call's on the same model, prompts, reward and seed."""
    from alignkit.rewards.spec import load_reward

    batch = questions[:6]
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": q} for q in batch])
    reward = load_reward("synthetic")
    sampling = SamplingOptions(max_new_tokens=8)
    expected = {
        "sample": best_of_n(task.model, task.tokenizer, batch, reward, BoNOptions(num_samples=1, seed=3), sampling),
        "bon": best_of_n(task.model, task.tokenizer, batch, reward, BoNOptions(num_samples=3, seed=3), sampling),
        "bon-calibrated": calibrated_best_of_n(task.model, task.tokenizer, batch, reward, CalibratedOptions(num_samples=3, num_reference=4, seed=3), sampling),
        "deal": deal_decode(task.model, task.tokenizer, batch, reward, DeALOptions(beams=2, top_k=3, lookahead=1,
                                                                                    weight=2.0, max_new_tokens=8)),
    }
    for method, result in expected.items():
        out = tmp_path / method
        code = main(["decode", "--method", method, "--model", str(task.model_dir), "--prompts",
                     str(tmp_path / "prompts.jsonl"), "--reward", "synthetic", "--num_samples", "3", "--num_reference", "4",
                     "--beams", "2", "--search_top_k", "3", "--lookahead", "1", "--weight", "2.0",
                     "--max_new_tokens", "8", "--seed", "3", "--output_dir", str(out)])
        assert code == 0, method
        rows = [json.loads(line) for line in (out / "decoded.jsonl").read_text().splitlines()]
        assert rows == json.loads(json.dumps(result.records())), method
        summary = json.loads((out / "summary.json").read_text())
        assert summary["compute"] == {"generated_tokens": result.compute.generated_tokens,
                                      "forward_passes": result.compute.forward_passes,
                                      "reward_calls": result.compute.reward_calls}, method
        assert summary["mean_reward"] == pytest.approx(mean(result.rewards)), method
        assert ("efficiency" in summary) == (method != "sample"), method

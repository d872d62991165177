"""The off-policy corrections (losses/offpolicy.py): TRL 1.16's four vllm_importance_sampling_modes, IcePop and
DeepSeek-V3.2's off-policy sequence mask, each against a NumPy transcription of its source and against TRL's own code
(its ratio block and `_compute_loss`, its `get_off_policy_mask`) on the same tensors; the option checks; `auto` on
exact and inexact engines; the mismatch metrics of a run."""

from __future__ import annotations

import copy
import inspect
import logging
import math
import textwrap

import numpy as np
import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.generate.engines import FastEngine, HFEngine
from alignkit.generate.engines.vllm import VLLMEngine
from alignkit.losses import LossInputs, build_options, get_loss
from alignkit.losses.offpolicy import (
    ICEPOP_BOUNDS,
    TRL_RATIO_MAX,
    correct_sequences,
    engine_ratio,
    engine_weights,
    resolve_correction,
)
from alignkit.losses.online import (
    CISPOOptions,
    GRPOOptions,
    PPOOptions,
    ReinforcePPOptions,
    RLOOOptions,
    cispo_loss,
    group_advantages,
    grpo_loss,
    leave_one_out_advantages,
    ppo_loss,
    reinforce_pp_loss,
    rloo_loss,
)
from alignkit.online import OnlineInputs, online_config, run_online
from conftest import import_trl
from synthetic_task import SENTIMENT, prompts
from test_online_math import B, K, T, _trl_batch, _trl_stub, grpo_inputs, numpy_aggregate, rollout_tensors

MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def engine_of(old, mask, seed, spread=0.6):
    """Engine log-probs off the behaviour policy's by up to a few tenths per token (some sequence ratios past 3)."""
    g = torch.Generator().manual_seed(seed)
    return (old + spread * torch.randn(old.shape, generator=g)) * mask


def numpy_trl_ratio(old, engine, mask, mode, low, high):
    """TRL 1.16 grpo_trainer (_generate_and_score_completions), transcribed: d = m (l_old - l_engine), NaN -> 0;
    sequence_*: exp(sum_t d); *_truncate: clip to [low, high]; *_mask: 0 outside [low, high]; None: unbounded."""
    d = np.nan_to_num((old - engine) * mask, nan=0.0)
    ratio = np.exp(d.sum(-1, keepdims=True) if mode.startswith("sequence") else d)
    lo, hi = -np.inf if low is None else low, np.inf if high is None else high
    if mode.endswith("truncate"):
        return np.clip(ratio, lo, hi)
    return np.where((ratio < lo) | (ratio > hi), 0.0, ratio)


def trl_ratio(mode, low, high, old, engine, mask):
    """TRL's own ratio code: the block of GRPOTrainer._generate_and_score_completions that computes
    vllm_importance_sampling_ratio, taken from the installed source and run on these tensors."""
    grpo_trainer = import_trl("trl.trainer.grpo_trainer")
    lines = inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions).splitlines()
    start = next(i for i, line in enumerate(lines) if "per_token_logps_diff = (old_per_token_logps" in line) - 2
    end = next(i for i in range(start, len(lines)) if "per-token log probabilities for the reference" in lines[i])
    block = textwrap.dedent("\n".join(lines[start:end]))
    assert block.startswith("if self.use_vllm and self.vllm_importance_sampling_correction:")
    stub = type("Stub", (), dict(use_vllm=True, vllm_importance_sampling_correction=True,
                                 vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=low,
                                 vllm_importance_sampling_clip_max=high))()
    scope = {"self": stub, "torch": torch, "math": math, "old_per_token_logps": old,
             "sampling_per_token_logps": engine, "completion_mask": mask.long(), "tool_mask": None}
    exec(block, scope)  # noqa: S102 - TRL's own code, from the installed package
    return scope["vllm_importance_sampling_ratio"]


# -- the four modes and IcePop against NumPy and TRL's ratio code ---------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bounds", [(None, TRL_RATIO_MAX), (0.7, 1.6)], ids=["trl-default", "both-bounds"])
def test_engine_weights_equal_numpy_and_trls_ratio_code(mode, bounds):
    logps, old, _, mask, _ = rollout_tensors(seed=21)
    engine = engine_of(old, mask, seed=22).double()
    engine[0, 1, 0] = float("nan")  # a token the engine could not score: ratio 1, as TRL
    old = old.double()
    ratio = engine_ratio(old, engine, mask, sequence=mode.startswith("sequence"))
    weights, outside = engine_weights(ratio, mode, *bounds)
    expected = numpy_trl_ratio(old.numpy(), engine.numpy(), mask.numpy(), mode, *bounds)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12)
    assert outside.any() and not outside.all()  # both sides of the bounds occur
    theirs = trl_ratio(mode, *bounds, old.reshape(B * K, T), engine.reshape(B * K, T), mask.reshape(B * K, T))
    width = 1 if mode.startswith("sequence") else T
    np.testing.assert_allclose(weights.reshape(B * K, width).numpy(), theirs.numpy(), rtol=1e-12)


def test_icepop_zeroes_tokens_outside_alpha_beta_and_keeps_the_ratio_inside():
    """IcePop (Ring-1T, arXiv 2510.18855): M(k) = k for k in [alpha, beta], else 0, k = pi_train / pi_infer per
    token, multiplying the clipped surrogate; alpha 0.5, beta 5 by default. It is TRL's token_mask with those bounds."""
    logps, old, ref, mask, scores = rollout_tensors(seed=23)
    engine = engine_of(old, mask, seed=24, spread=1.0)
    inputs, _ = grpo_inputs(logps, old, ref, mask, scores)
    inputs.engine_token_logps = engine
    losses, metrics = grpo_loss(inputs, GRPOOptions(kl_coef=0.0, engine_correction="icepop"))
    k = np.exp((old - engine).numpy())
    alpha, beta = ICEPOP_BOUNDS
    assert (alpha, beta) == (0.5, 5.0)
    m = mask.numpy()
    gate = np.where((k >= alpha) & (k <= beta), k, 0.0)
    ratio = np.exp((logps - old).numpy())
    adv = group_advantages(scores).numpy()[..., None]
    surrogate = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    expected = ((surrogate * gate * m).sum(-1) / m.sum(-1)).mean(1)
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-5)
    dropped = ((gate == 0) & m).sum((1, 2)) / m.sum((1, 2))
    np.testing.assert_allclose(metrics["engine_ratio_masked"].numpy(), dropped, rtol=1e-6)
    assert dropped.sum() > 0
    same, _ = grpo_loss(inputs, GRPOOptions(kl_coef=0.0, engine_correction="token_mask", engine_ratio_min=0.5,
                                            engine_ratio_max=5.0))
    torch.testing.assert_close(same, losses)


# -- DeepSeek-V3.2's off-policy sequence mask ---------------------------------------------------------------------

def numpy_off_policy_mask(adv, logps, behaviour, mask, delta):
    """DeepSeek-V3.2 (arXiv 2512.02556) eq. 9: M_i = 0 if A_i < 0 and (1/|o_i|) sum_t log(pi_old / pi_theta) > delta."""
    mean_kl = ((behaviour - logps) * mask).sum(-1, keepdims=True) / mask.sum(-1, keepdims=True)
    return np.where((adv < 0) & (mean_kl > delta), 0.0, 1.0)


def test_off_policy_mask_equals_the_paper_and_trls_get_off_policy_mask():
    grpo_trainer = import_trl("trl.trainer.grpo_trainer")
    logps, old, ref, mask, scores = rollout_tensors(seed=25)
    engine = engine_of(logps, mask, seed=26, spread=0.3) + 0.05 * mask  # some responses' mean KL past delta
    adv = group_advantages(scores)[..., None]
    delta = 0.05
    keep = numpy_off_policy_mask(adv.numpy(), logps.numpy(), engine.numpy(), mask.numpy(), delta)
    assert 0 < (keep == 0).sum() < (adv < 0).sum()  # some, not all, negative-advantage responses dropped
    theirs = grpo_trainer.GRPOTrainer.get_off_policy_mask(adv.reshape(B * K, 1), logps.reshape(B * K, T),
                                                          engine.reshape(B * K, T), mask.reshape(B * K, T).float(),
                                                          delta)
    np.testing.assert_array_equal(theirs.reshape(B, K, 1).numpy(), keep)
    inputs, _ = grpo_inputs(logps, old, ref, mask, scores)
    inputs.engine_token_logps = engine
    losses, metrics = grpo_loss(inputs, GRPOOptions(kl_coef=0.0, off_policy_mask_threshold=delta))
    ratio = np.exp((logps - old).numpy())
    a, m = adv.numpy(), mask.numpy()
    surrogate = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a) * keep
    np.testing.assert_allclose(losses.detach().numpy(), ((surrogate * m).sum(-1) / m.sum(-1)).mean(1), rtol=1e-5)
    np.testing.assert_allclose(metrics["off_policy_masked"].numpy(),
                               ((keep == 0) * m).sum((1, 2)) / m.sum((1, 2)), rtol=1e-6)
    # without engine log-probs the behaviour policy's stand in (TRL: old_per_token_logps)
    inputs.engine_token_logps = None
    _, without = grpo_loss(inputs, GRPOOptions(kl_coef=0.0, off_policy_mask_threshold=0.0))
    expected = numpy_off_policy_mask(a, logps.numpy(), old.numpy(), m, 0.0)
    np.testing.assert_allclose(without["off_policy_masked"].numpy(), ((expected == 0) * m).sum((1, 2)) / m.sum((1, 2)),
                               rtol=1e-6)


def test_off_policy_mask_edges_keep_a_zero_advantage_and_a_kl_of_exactly_delta():
    """Eq. 9 drops only A < 0 with KL > delta: A = 0, or KL = delta exactly, keeps the response (TRL's too)."""
    grpo_trainer = import_trl("trl.trainer.grpo_trainer")
    advantages = torch.tensor([[0.0], [-1.0], [-1.0], [1.0]])
    logps = torch.full((4, 2), -1.0)
    behaviour = logps + torch.tensor([[0.5], [0.25], [0.5], [0.5]])  # mean log(pi_old / pi) per response
    mask = torch.ones(4, 2)
    theirs = grpo_trainer.GRPOTrainer.get_off_policy_mask(advantages, logps, behaviour, mask, 0.25)
    assert theirs.flatten().tolist() == [1.0, 1.0, 0.0, 1.0]
    inputs = LossInputs(logps=logps.sum(-1).view(2, 2), lengths=torch.full((2, 2), 2.0),
                        old_logps=logps.sum(-1).view(2, 2), rewards=torch.zeros(2, 2),
                        engine_token_logps=behaviour.view(2, 2, 2))
    kept, _ = correct_sequences(torch.ones(2, 2), inputs, inputs.old_logps, advantages.view(2, 2),
                                RLOOOptions(off_policy_mask_threshold=0.25, engine_correction="none"))
    assert kept.flatten().tolist() == [1.0, 1.0, 0.0, 1.0]


# -- the whole loss against TRL's _compute_loss -------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_type,how", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean")])
def test_corrected_grpo_loss_equals_trl(mode, loss_type, how):
    """Value and gradient of grpo with each mode (TRL's default bounds), the off-policy mask and a bias-corrected KL
    term (not weighted, as in TRL), against TRL's _compute_loss given TRL's own ratio."""
    grpo_trainer = import_trl("trl.trainer.grpo_trainer")
    logps, old, ref, mask, scores = rollout_tensors(seed=27)
    engine = engine_of(old, mask, seed=28)
    inputs, policy = grpo_inputs(logps, old, ref, mask, scores)
    inputs.engine_token_logps = engine
    opts = GRPOOptions(epsilon=0.2, epsilon_high=0.28, kl_coef=0.04, kl_bias_correction=True, loss_aggregation=how,
                       engine_correction=mode, off_policy_mask_threshold=0.1)
    ours, _ = grpo_loss(inputs, opts)
    ours.mean().backward()

    def flat(x):
        return x.reshape(B * K, T)

    ratio = trl_ratio(mode, None, TRL_RATIO_MAX, flat(old), flat(engine), flat(mask))
    theirs_logps = flat(logps).clone().requires_grad_()
    stub = _trl_stub(theirs_logps, True, beta=0.04, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                     max_completion_length=T, use_vllm=True, vllm_importance_sampling_correction=True,
                     off_policy_mask_threshold=0.1,
                     get_off_policy_mask=grpo_trainer.GRPOTrainer.get_off_policy_mask)
    batch = _trl_batch(mask, advantages=group_advantages(scores).reshape(-1), old_per_token_logps=flat(old),
                       ref_per_token_logps=flat(ref), sampling_per_token_logps=flat(engine),
                       importance_sampling_ratio=ratio)
    theirs = grpo_trainer.GRPOTrainer._compute_loss(stub, None, batch)
    theirs.backward()
    assert float(ours.detach().mean()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    torch.testing.assert_close(flat(policy.grad) * flat(mask), theirs_logps.grad * flat(mask), atol=1e-6, rtol=1e-5)


# -- every online loss takes the same options ---------------------------------------------------------------------

def test_ppo_and_reinforce_pp_correct_the_policy_term_only():
    logps, old, ref, mask, _ = rollout_tensors(seed=29)
    engine = engine_of(old, mask, seed=30)
    g = torch.Generator().manual_seed(31)
    advantages, returns = (torch.randn(B, K, T, generator=g) * mask for _ in range(2))
    values = returns + 0.3 * torch.randn(B, K, T, generator=g) * mask
    inputs = LossInputs(logps=(logps * mask).sum(-1), lengths=mask.sum(-1).float(), token_logps=logps,
                        token_mask=mask, old_token_logps=old, ref_token_logps=ref, advantages=advantages,
                        returns=returns, values=values, old_values=values, engine_token_logps=engine,
                        rewards=torch.zeros(B, K))
    lp, lo, le, m, a = logps.numpy(), old.numpy(), engine.numpy(), mask.numpy(), advantages.numpy()
    gate = numpy_trl_ratio(lo, le, m, "token_mask", 0.5, 5.0)
    keep = np.where((a < 0) & (((le - lp) * m).sum(-1, keepdims=True) / m.sum(-1, keepdims=True) > 0.02), 0.0, 1.0)
    ratio = np.exp(lp - lo)
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2)) * gate * keep
    vf = 0.5 * (values - returns).numpy() ** 2
    losses, metrics = ppo_loss(inputs, PPOOptions(kl_reward_coef=0.05, vf_coef=0.1, engine_correction="icepop",
                                                  off_policy_mask_threshold=0.02))
    assert float(losses.mean()) == pytest.approx(numpy_aggregate(pg + 0.1 * vf, m, "token-mean"), abs=1e-6)
    assert {"engine_ratio_masked", "off_policy_masked", "mismatch_kl", "mismatch_kl_k3"} <= set(metrics)
    losses, _ = reinforce_pp_loss(inputs, ReinforcePPOptions(kl_coef=0.0, engine_correction="token_mask",
                                                             off_policy_mask_threshold=0.02))
    gate = numpy_trl_ratio(lo, le, m, "token_mask", None, TRL_RATIO_MAX)
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2)) * gate * keep
    assert float(losses.mean()) == pytest.approx(numpy_aggregate(pg, m, "token-mean"), abs=1e-6)


@pytest.mark.parametrize("mode", ["sequence_truncate", "sequence_mask"])
def test_rloo_takes_the_sequence_modes_and_the_off_policy_mask(mode):
    logps, old, ref, mask, scores = rollout_tensors(seed=32)
    engine = engine_of(old, mask, seed=33, spread=0.4)

    def seq(x):
        return (x * mask).sum(-1)

    inputs = LossInputs(logps=seq(logps), lengths=mask.sum(-1).float(), old_logps=seq(old), rewards=scores,
                        engine_token_logps=engine)
    losses, metrics = rloo_loss(inputs, RLOOOptions(kl_coef=0.0, engine_correction=mode, engine_ratio_min=0.5,
                                                    off_policy_mask_threshold=0.0))
    adv = leave_one_out_advantages(scores).numpy()
    ratio = np.exp(seq(logps).numpy() - seq(old).numpy())
    surrogate = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    weight = numpy_trl_ratio(old.numpy(), engine.numpy(), mask.numpy(), mode, 0.5, TRL_RATIO_MAX)[..., 0]
    lengths = mask.sum(-1).numpy()
    keep = np.where((adv < 0) & ((seq(engine).numpy() - seq(logps).numpy()) / lengths > 0.0), 0.0, 1.0)
    np.testing.assert_allclose(losses.numpy(), (surrogate * weight * keep).mean(1), rtol=1e-5)
    key = "engine_ratio_clipped" if mode.endswith("truncate") else "engine_ratio_masked"
    assert metrics[key].sum() > 0 and metrics["off_policy_masked"].sum() > 0
    np.testing.assert_allclose(metrics["mismatch_kl"].numpy(),
                               (seq(engine) - seq(old)).sum(1).numpy() / lengths.sum(1), rtol=1e-5)
    with pytest.raises(ConfigError, match="sequence_truncate or sequence_mask") as err:
        build_options(get_loss("rloo"), {"engine_correction": "token_truncate"})
    assert err.value.key == "loss_options.engine_correction"


def test_mismatch_metrics_and_the_shares_clipped_match_numpy():
    logps, old, ref, mask, scores = rollout_tensors(seed=34)
    engine = engine_of(old, mask, seed=35, spread=0.8)
    inputs, _ = grpo_inputs(logps, old, ref, mask, scores)
    inputs.engine_token_logps = engine
    _, metrics = cispo_loss(inputs, CISPOOptions(engine_correction="token_truncate", engine_ratio_min=0.8,
                                                 engine_ratio_max=1.25))
    lo, le, m = old.numpy(), engine.numpy(), mask.numpy()
    count = m.sum((1, 2))
    log_r = (lo - le) * m
    np.testing.assert_allclose(metrics["mismatch_kl"].numpy(), (-log_r).sum((1, 2)) / count, rtol=1e-5)
    np.testing.assert_allclose(metrics["mismatch_kl_k3"].numpy(),
                               ((np.exp(log_r) - 1 - log_r) * m).sum((1, 2)) / count, rtol=1e-5)
    r = np.exp(log_r)
    np.testing.assert_allclose(metrics["engine_ratio_clipped"].numpy(),
                               (((r < 0.8) | (r > 1.25)) & m).sum((1, 2)) / count, rtol=1e-6)


# -- options: defaults, errors, the old name ---------------------------------------------------------------------

def test_trl_defaults_are_the_ones_stated():
    grpo_config = import_trl("trl.trainer.grpo_config")
    config = grpo_config.GRPOConfig
    fields = config.__dataclass_fields__
    assert fields["vllm_importance_sampling_mode"].default == "sequence_mask"
    assert fields["vllm_importance_sampling_clip_max"].default == TRL_RATIO_MAX
    assert fields["vllm_importance_sampling_clip_min"].default is None
    assert fields["vllm_importance_sampling_correction"].default is True
    assert fields["off_policy_mask_threshold"].default is None


@pytest.mark.parametrize("values, key, words", [
    ({"engine_ratio_max": -1.0}, "engine_ratio_max", "> 0"),
    ({"engine_ratio_min": -0.5}, "engine_ratio_min", ">= 0"),
    ({"engine_correction": "icepop", "engine_ratio_min": 6.0}, "engine_ratio_min", "below engine_ratio_max"),
    ({"engine_ratio_min": 2.0, "engine_ratio_max": 1.5}, "engine_ratio_min", "below engine_ratio_max"),
    ({"engine_correction": "token_clip"}, "engine_correction", "one of auto, none, token_truncate"),
    ({"engine_ratio_max": float("nan")}, "engine_ratio_max", "finite"),
    ({"off_policy_mask_threshold": float("nan")}, "off_policy_mask_threshold", "finite"),
    ({"off_policy_mask_threshold": -0.1}, "off_policy_mask_threshold", ">= 0"),
    ({"engine_correction": "none", "engine_ratio_max": 2.0}, "engine_correction", "would do nothing"),
    ({"tis_cap": 2.0, "engine_correction": "token_mask"}, "tis_cap", "give one or the other"),
    ({"tis_cap": -1.0}, "tis_cap", ">= 0"),
])
@pytest.mark.parametrize("loss", ["grpo", "cispo", "reinforce++", "ppo", "rloo"])
def test_bad_options_are_one_line_errors_naming_the_key(loss, values, key, words):
    if loss == "ppo":
        values = {**values, "kl_reward_coef": 0.05}
    with pytest.raises(ConfigError, match=words) as err:
        build_options(get_loss(loss), values)
    assert err.value.key == f"loss_options.{key}" and "\n" not in str(err.value)


def test_tis_cap_is_token_truncate_below_the_cap(caplog):
    caplog.set_level(logging.INFO, logger="alignkit")
    old_name = build_options(get_loss("grpo"), {"tis_cap": 2.0})
    assert (old_name.engine_correction, old_name.engine_ratio_max, old_name.engine_ratio_min) == ("token_truncate",
                                                                                                 2.0, None)
    assert any("now loss_options.engine_correction" in r.getMessage() for r in caplog.records)
    assert build_options(get_loss("grpo"), {"tis_cap": 0.0}).engine_correction == "none"  # 0 meant off
    assert build_options(get_loss("grpo"), {}).engine_correction == "auto"


def test_auto_is_none_on_exact_engines_and_trls_default_elsewhere(task):
    opts = GRPOOptions()
    assert resolve_correction(opts, engine_exact=True).engine_correction == "none"
    assert resolve_correction(opts, engine_exact=False).engine_correction == "sequence_mask"
    explicit = GRPOOptions(engine_correction="icepop")
    assert resolve_correction(explicit, engine_exact=False) is explicit
    assert HFEngine(task.model, task.tokenizer).exact_logprobs
    assert FastEngine(task.model, task.tokenizer).exact_logprobs
    assert not FastEngine(task.model, task.tokenizer, "bf16").exact_logprobs
    assert not VLLMEngine.exact_logprobs
    # unresolved (a loss called directly), auto corrects nothing
    logps, old, ref, mask, scores = rollout_tensors(seed=36)
    inputs, _ = grpo_inputs(logps, old, ref, mask, scores)
    inputs.engine_token_logps = engine_of(old, mask, seed=37)
    plain, _ = grpo_loss(inputs, GRPOOptions(kl_coef=0.0, engine_correction="none"))
    torch.testing.assert_close(grpo_loss(inputs, GRPOOptions(kl_coef=0.0))[0], plain)


def one_round(task, tmp_path, **sampling):
    cfg = online_config(dict(method="grpo", model="tiny", prompts="-", output_dir=str(tmp_path), rounds=1,
                             prompts_per_round=4, num_samples=4, max_new_tokens=8, max_length=64, learning_rate=1e-3,
                             eval_before_after=False, progress=False, kl_coef=0.0, sampling={"engine": "fast",
                                                                                          **sampling}))
    return run_online(cfg, copy.deepcopy(task.model), task.tokenizer,
                      OnlineInputs(prompts(16, seed=9), prompts(2, seed=10), SENTIMENT)).rounds[0]


@pytest.mark.slow
def test_a_bf16_engine_run_is_corrected_by_default_and_an_fp32_one_is_not(task, tmp_path, caplog):
    """auto: on the bf16 fast engine TRL's sequence_mask is on and the round logs the mismatch and the share masked;
    on the fp32 engine no correction is made (the mismatch KL is ~0)."""
    caplog.set_level(logging.INFO, logger="alignkit")
    bf16 = one_round(task, tmp_path / "bf16", engine_precision="bf16")
    assert "engine_ratio_masked" in bf16 and 0 <= bf16["engine_ratio_masked"] <= 1
    assert bf16["mismatch_kl_k3"] > 1e-6 and bf16["engine_gap_mean"] > 1e-3
    assert any("engine_correction auto: sequence_mask" in r.getMessage() for r in caplog.records)
    fp32 = one_round(task, tmp_path / "fp32")
    assert "engine_ratio_masked" not in fp32 and "engine_ratio_clipped" not in fp32
    assert abs(fp32["mismatch_kl"]) < 1e-4 and fp32["mismatch_kl_k3"] < 1e-8

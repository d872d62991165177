"""What each loss logs, against NumPy: the per-example reward metrics of the pairwise losses (the implicit reward each
paper defines, its margin, and accuracy with a tie counting half), the list and unpaired metrics, the online clip
and KL diagnostics, and the options' checks. The losses' values are tested elsewhere; these are the numbers a user
reads in metrics.jsonl, and mutation testing showed nothing pinned them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import LossInputs, build_options, get_loss
from alignkit.losses.online import (
    CISPOOptions,
    GRPOOptions,
    PPOOptions,
    ReinforcePPOptions,
    RLOOOptions,
    aggregate,
    cispo_loss,
    grpo_loss,
    ppo_loss,
    reinforce_pp_loss,
    rloo_loss,
)

B = 5


@pytest.fixture
def rng():
    """Each test's own generator, seeded: its data does not depend on which tests ran before it."""
    return np.random.default_rng(0)


def pair_arrays(rng):
    """Summed log-probs [B, 2] with one exact tie (example 0: chosen and rejected alike), lengths from 1 token."""
    logps = rng.normal(-20, 4, (B, 2))
    ref = rng.normal(-20, 4, (B, 2))
    logps[0, 1], ref[0, 1] = logps[0, 0], ref[0, 0]
    lengths = np.array([[1, 1], [3, 7], [12, 2], [5, 5], [9, 30]], dtype=np.float64)
    return logps, ref, lengths


def inputs_of(logps, ref, lengths, **extra) -> LossInputs:
    return LossInputs(logps=torch.tensor(logps), lengths=torch.tensor(lengths),
                      ref_logps=None if ref is None else torch.tensor(ref), **extra)


# the implicit reward of each response as the loss's paper defines it (what rewards/chosen and /rejected log)
REWARDS = {
    "dpo": lambda o, lp, rf, n: o.beta * (lp - rf),
    "robust_dpo": lambda o, lp, rf, n: o.beta * (lp - rf),
    "ipo": lambda o, lp, rf, n: o.beta * (lp - rf),
    "hinge": lambda o, lp, rf, n: o.beta * (lp - rf),
    "exo_pair": lambda o, lp, rf, n: o.beta * (lp - rf),
    "dpop": lambda o, lp, rf, n: o.beta * (lp - rf),
    "rdpo": lambda o, lp, rf, n: o.beta * (lp - rf),
    "rpo": lambda o, lp, rf, n: o.beta * (lp - rf),
    "bonbon": lambda o, lp, rf, n: o.beta * (lp - rf),
    "modpo": lambda o, lp, rf, n: o.beta * (lp - rf),
    "cream": lambda o, lp, rf, n: o.beta * (lp - rf),
    "simpo": lambda o, lp, rf, n: o.beta * lp / n,
    "orpo": lambda o, lp, rf, n: o.beta * lp / n,
    "cpo": lambda o, lp, rf, n: o.beta * lp,
    "slic": lambda o, lp, rf, n: lp,
}


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_pairwise_reward_metrics_equal_numpy(name, rng):
    spec = get_loss(name)
    opts = build_options(spec, {})
    logps, ref, lengths = pair_arrays(rng)
    extra = {}
    if name == "cream":
        extra["consistency"] = torch.tensor(rng.random(B))
    if name == "modpo":
        extra["other_rewards"] = torch.tensor(rng.normal(0, 1, (B, 2, 2)))
    _, metrics = spec.fn(inputs_of(logps, ref if spec.needs_reference else None, lengths, **extra), opts)
    rewards = REWARDS[name](opts, logps, ref, lengths)
    margins = rewards[:, 0] - rewards[:, 1]
    expected = {"rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1], "rewards/margins": margins,
                "rewards/accuracy": (margins > 0) + 0.5 * (margins == 0)}
    assert margins[0] == 0 and (margins[1:] != 0).all()  # the tie and the rest
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key].numpy(), value, rtol=1e-6, atol=1e-9, err_msg=f"{name} {key}")
    assert not any(v.requires_grad for v in metrics.values())


def test_modpo_logs_the_weighted_margin_of_the_other_objectives(rng):
    spec, opts = get_loss("modpo"), build_options(get_loss("modpo"), {"weight": 0.4, "other_weights": [0.2, 0.4]})
    logps, ref, lengths = pair_arrays(rng)
    other = rng.normal(0, 1, (B, 2, 2))
    _, metrics = spec.fn(inputs_of(logps, ref, lengths, other_rewards=torch.tensor(other)), opts)
    np.testing.assert_allclose(metrics["modpo/margin"].numpy(), (other[:, 0] - other[:, 1]) @ np.array([0.2, 0.4]))
    even = build_options(spec, {"weight": 0.4})  # default other weights: (1 - w0) / K each
    _, metrics = spec.fn(inputs_of(logps, ref, lengths, other_rewards=torch.tensor(other)), even)
    np.testing.assert_allclose(metrics["modpo/margin"].numpy(), (other[:, 0] - other[:, 1]).sum(-1) * 0.3)


def test_d2o_metrics_equal_numpy(rng):
    spec = get_loss("d2o")
    opts = build_options(spec, {})
    logps, ref = rng.normal(-20, 4, (B, 4)), rng.normal(-20, 4, (B, 4))
    logps[0], ref[0] = logps[0, 0], ref[0, 0]  # example 0: every sample like the negative, margin 0
    lengths = np.full((B, 4), 5.0)
    _, metrics = spec.fn(inputs_of(logps, ref, lengths), opts)
    ratio = logps - ref
    samples = metrics["rewards/samples"].numpy()
    negative = metrics["rewards/negative"].numpy()
    np.testing.assert_allclose(metrics["rewards/margins"].numpy(), samples - negative)
    margins = samples - negative
    np.testing.assert_allclose(metrics["rewards/accuracy"].numpy(), (margins > 0) + 0.5 * (margins == 0))
    assert margins[0] == pytest.approx(0, abs=1e-12)
    # both terms are increasing in their log-ratios: the negative's term follows column 0 alone
    assert np.corrcoef(negative, ratio[:, 0])[0, 1] > 0.99


def test_list_metrics_equal_numpy(rng):
    spec = get_loss("lipo")
    opts = build_options(spec, {})
    logps, ref = rng.normal(-20, 4, (B, 4)), rng.normal(-20, 4, (B, 4))
    scores = rng.integers(0, 3, (B, 4)).astype(np.float64)  # ties in the scores: only strict pairs count
    scores[0] = [2, 1, 1, 0]
    logps[0, 1], ref[0, 1] = logps[0, 0], ref[0, 0]  # a reward tie on a strictly ordered pair: half right
    _, metrics = spec.fn(inputs_of(logps, ref, np.full((B, 4), 5.0), scores=torch.tensor(scores)), opts)
    rewards = opts.beta * (logps - ref)
    better = scores[:, :, None] > scores[:, None, :]
    gaps = rewards[:, :, None] - rewards[:, None, :]
    right = better * ((gaps > 0) + 0.5 * (gaps == 0))
    accuracy = right.sum((1, 2)) / np.maximum(better.sum((1, 2)), 1)
    np.testing.assert_allclose(metrics["rewards/accuracy"].numpy(), accuracy, rtol=1e-12)
    assert 0 < accuracy[0] < 1


def test_listwise_losses_rank_by_score_with_ties_kept_in_order(rng):
    """ListMLE's and LiPO's sorts are stable: tied scores keep the data's order, so the loss is deterministic and
    equals NumPy's stable sort."""
    logps, ref = rng.normal(-20, 4, (2, 4)), rng.normal(-20, 4, (2, 4))
    scores = np.array([[1.0, 2.0, 2.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    spec = get_loss("listmle")
    opts = build_options(spec, {})
    losses, _ = spec.fn(inputs_of(logps, ref, np.full((2, 4), 5.0), scores=torch.tensor(scores)), opts)
    r = opts.beta * (logps - ref)
    expected = []
    for row, s in zip(r, scores):
        order = np.argsort(-s, kind="stable")
        z = row[order]
        expected.append(-sum(z[i] - np.log(np.exp(z[i:]).sum()) for i in range(len(z))))
    np.testing.assert_allclose(losses.numpy(), np.array(expected), rtol=1e-9)


def test_kto_metrics_equal_numpy(rng):
    spec = get_loss("kto")
    opts = build_options(spec, {})
    logps, ref = rng.normal(-20, 4, (B, 1)), rng.normal(-20, 4, (B, 1))
    labels = np.array([1, 0, 1, 1, 0])
    kl_policy, kl_ref = rng.normal(-18, 4, B), rng.normal(-20, 4, B)
    _, metrics = spec.fn(inputs_of(logps, ref, np.full((B, 1), 5.0), labels=torch.tensor(labels),
                                   kl_logps=torch.tensor(kl_policy), ref_kl_logps=torch.tensor(kl_ref)), opts)
    rewards = opts.beta * (logps[:, 0] - ref[:, 0])
    np.testing.assert_allclose(metrics["rewards"].numpy(), rewards)
    np.testing.assert_allclose(metrics["rewards/desirable"].numpy(), np.where(labels == 1, rewards, 0.0))
    np.testing.assert_allclose(metrics["rewards/undesirable"].numpy(), np.where(labels == 0, rewards, 0.0))
    np.testing.assert_allclose(metrics["desirable"].numpy(), labels)
    # the reference point z0: the batch's mismatched-pair KL estimate, clamped at 0 (TRL's KTO)
    np.testing.assert_allclose(metrics["kto/kl"].numpy(), np.full(B, max(0.0, (kl_policy - kl_ref).mean())), rtol=1e-6)


# ---- online diagnostics ----


def rollout(k=4, t=6, seed=1):
    rng = np.random.default_rng(seed)
    logps = rng.normal(-1.5, 0.5, (3, k, t))
    old = logps + rng.normal(0, 0.3, logps.shape)  # ratios well away from 1 on both sides
    ref = logps + rng.normal(0, 0.2, logps.shape)
    mask = np.ones((3, k, t), dtype=bool)
    mask[0, min(1, k - 1), 4:] = False
    mask[2, k - 1, 1:] = False  # a one-token response
    scores = rng.normal(0, 1, (3, k))
    return logps, old, ref, mask, scores


def clip_numpy(ratio, adv, mask, low, high):
    high_hit = (ratio > high) & (adv > 0)
    low_hit = (ratio < low) & (adv < 0) if low is not None else np.zeros_like(high_hit)

    def per_example(x):  # the mean over every sampled token of the example's k responses
        return (x * mask).sum((1, 2)) / mask.sum((1, 2))
    return per_example(low_hit), per_example(high_hit), per_example(low_hit | high_hit)


def group_adv(scores):
    return (scores - scores.mean(1, keepdims=True)) / (scores.std(1, ddof=1, keepdims=True) + 1e-4)


def test_grpo_clip_and_kl_diagnostics_equal_numpy():
    logps, old, ref, mask, scores = rollout()
    opts = GRPOOptions(kl_coef=0.05, epsilon=0.1, epsilon_high=0.15)
    t = torch.tensor
    _, metrics = grpo_loss(LossInputs(logps=t(logps.sum(-1)), lengths=t(mask.sum(-1).astype(float)),
                                      token_logps=t(logps, requires_grad=True), token_mask=t(mask),
                                      old_token_logps=t(old), ref_token_logps=t(ref), rewards=t(scores)), opts)
    ratio = np.exp(logps - old)
    adv = np.broadcast_to(group_adv(scores)[..., None], ratio.shape)
    low, high, both = clip_numpy(ratio, adv, mask, 0.9, 1.15)
    np.testing.assert_allclose(metrics["clip_low"].numpy(), low, atol=1e-12)
    np.testing.assert_allclose(metrics["clip_high"].numpy(), high, atol=1e-12)
    np.testing.assert_allclose(metrics["clip_fraction"].numpy(), both, atol=1e-12)
    assert (low > 0).any() and (high > 0).any()
    d = ref - logps
    kl1, kl3 = (logps - ref), np.exp(d) - d - 1
    for key, per_token in (("kl", kl1), ("kl_k3", kl3)):
        np.testing.assert_allclose(metrics[key].numpy(), (per_token * mask).sum(-1).mean(1), rtol=1e-9)


def test_ppo_clip_fraction_and_kl_equal_numpy():
    logps, old, ref, mask, scores = rollout(k=1)
    rng = np.random.default_rng(3)
    adv, returns, values = (rng.normal(0, 1, logps.shape) for _ in range(3))
    t = torch.tensor
    opts = PPOOptions(cliprange=0.1)
    _, metrics = ppo_loss(LossInputs(logps=t(logps.sum(-1)), lengths=t(mask.sum(-1).astype(float)),
                                     token_logps=t(logps, requires_grad=True), token_mask=t(mask), old_token_logps=t(old),
                                     ref_token_logps=t(ref), advantages=t(adv), returns=t(returns),
                                     values=t(values, requires_grad=True), old_values=t(values)), opts)
    ratio = np.exp(logps - old)
    clipped = (ratio < 0.9) | (ratio > 1.1)
    np.testing.assert_allclose(metrics["clip_fraction"].numpy(), (clipped * mask).sum((1, 2)) / mask.sum((1, 2)),
                               atol=1e-12)
    assert 0 < metrics["clip_fraction"].mean() < 1
    np.testing.assert_allclose(metrics["kl"].numpy(), ((logps - ref) * mask).sum(-1).mean(1), rtol=1e-9)
    with pytest.raises(ValueError, match="value head"):
        ppo_loss(LossInputs(logps=t(logps.sum(-1)), lengths=t(mask.sum(-1).astype(float)), token_logps=t(logps),
                            token_mask=t(mask), advantages=t(adv), values=t(values)), opts)  # no returns


def test_ppo_kl_loss_term_is_off_at_zero_and_k3_otherwise():
    logps, old, ref, mask, _ = rollout(k=1)
    rng = np.random.default_rng(4)
    adv, returns, values = (rng.normal(0, 1, logps.shape) for _ in range(3))
    t = torch.tensor

    def loss(coef):
        return ppo_loss(LossInputs(logps=t(logps.sum(-1)), lengths=t(mask.sum(-1).astype(float)),
                                   token_logps=t(logps), token_mask=t(mask), old_token_logps=t(old),
                                   ref_token_logps=t(ref), advantages=t(adv), returns=t(returns), values=t(values),
                                   old_values=t(values)), PPOOptions(kl_coef=coef))[0]
    d = ref - logps
    k3 = np.exp(d) - d - 1
    expected = 0.5 * (k3 * mask).sum((-1, -2)) / mask.sum((-1, -2)).mean()  # token-mean over the batch's tokens
    np.testing.assert_allclose((loss(0.5) - loss(0.0)).numpy(), expected, rtol=1e-6)


def test_reinforce_pp_clip_and_kl_diagnostics_equal_numpy():
    logps, old, ref, mask, scores = rollout()
    adv = np.random.default_rng(5).normal(0, 1, logps.shape)
    t = torch.tensor
    opts = ReinforcePPOptions(epsilon=0.1, epsilon_high=0.2, kl_estimator="k2")
    _, metrics = reinforce_pp_loss(LossInputs(logps=t(logps.sum(-1)), lengths=t(mask.sum(-1).astype(float)),
                                              token_logps=t(logps, requires_grad=True), token_mask=t(mask),
                                              old_token_logps=t(old), ref_token_logps=t(ref), advantages=t(adv),
                                              rewards=t(scores)), opts)
    np.testing.assert_allclose(metrics["reward"].numpy(), scores.mean(1))
    ratio = np.exp(logps - old)
    low, high, both = clip_numpy(ratio, adv, mask, 0.9, 1.2)
    np.testing.assert_allclose(metrics["clip_low"].numpy(), low, atol=1e-12)
    np.testing.assert_allclose(metrics["clip_high"].numpy(), high, atol=1e-12)
    np.testing.assert_allclose(metrics["clip_fraction"].numpy(), both, atol=1e-12)
    k2 = 0.5 * (logps - ref) ** 2
    np.testing.assert_allclose(metrics["kl"].numpy(), ((logps - ref) * mask).sum(-1).mean(1), rtol=1e-9)
    np.testing.assert_allclose(metrics["kl_k2"].numpy(), (k2 * mask).sum(-1).mean(1), rtol=1e-9)


def test_rloo_normalised_advantages_equal_numpy():
    logps, old, ref, mask, scores = rollout()
    t = torch.tensor
    seq, ref_seq = (logps * mask).sum(-1), (ref * mask).sum(-1)
    shaped = scores - 0.05 * (seq - ref_seq)
    k = shaped.shape[1]
    adv = shaped - (shaped.sum(1, keepdims=True) - shaped) / (k - 1)
    for normalize, expected in ((False, adv), (True, (adv - adv.mean()) / (adv.std(ddof=1) + 1e-4))):
        policy = t(seq, requires_grad=True)
        losses, metrics = rloo_loss(LossInputs(logps=policy, lengths=t(mask.sum(-1).astype(float)),
                                               ref_logps=t(ref_seq), rewards=t(scores)),
                                    RLOOOptions(kl_coef=0.05, normalize_advantages=normalize))
        losses.sum().backward()  # ratio 1: d l_i / d log pi(y_i) = -A_i / k
        np.testing.assert_allclose(policy.grad.numpy(), -expected / k, rtol=1e-6)
        np.testing.assert_allclose(metrics["advantage_abs"].numpy(), np.abs(expected).mean(1), rtol=1e-6)
        np.testing.assert_allclose(metrics["kl"].numpy(), (seq - ref_seq).mean(1), rtol=1e-9)


def test_aggregations_count_a_one_token_response_as_one_token(rng):
    per_token = torch.tensor(rng.normal(0, 1, (2, 2, 4)))
    mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 1, 0]], [[1, 1, 1, 1], [1, 1, 0, 0]]], dtype=torch.bool)
    p, m = per_token.numpy(), mask.numpy()
    per_response = (p * m).sum(-1)
    np.testing.assert_allclose(aggregate(per_token, mask, "seq-mean-token-mean").numpy(),
                               (per_response / m.sum(-1)).mean(1))
    np.testing.assert_allclose(aggregate(per_token, mask, "token-mean").numpy(),
                               per_response.sum(1) / m.sum(-1).mean(0).sum())
    np.testing.assert_allclose(aggregate(per_token, mask, "const-norm").numpy(), per_response.sum(1) / (2 * 4))
    np.testing.assert_allclose(aggregate(per_token, mask, "const-norm", max_completion_length=10).numpy(),
                               per_response.sum(1) / (2 * 10))
    step = torch.tensor([3.0, 5.0])  # the whole step's mean tokens per column, not this batch's
    np.testing.assert_allclose(aggregate(per_token, mask, "token-mean", step).numpy(), per_response.sum(1) / 8.0)


@pytest.mark.parametrize("options, values, key", [
    (GRPOOptions, {"scale_rewards": "batch"}, "scale_rewards"),
    (GRPOOptions, {"loss_aggregation": "sum"}, "loss_aggregation"),
    (CISPOOptions, {"scale_rewards": "x"}, "scale_rewards"),
    (CISPOOptions, {"loss_aggregation": "x"}, "loss_aggregation"),
    (CISPOOptions, {"weight_min": 5.0, "weight_max": 5.0}, "weight_max"),
    (PPOOptions, {"loss_aggregation": "x"}, "loss_aggregation"),
    (PPOOptions, {"kl_estimator": "k9"}, "kl_estimator"),
    (ReinforcePPOptions, {"baseline": "x"}, "baseline"),
    (ReinforcePPOptions, {"loss_aggregation": "x"}, "loss_aggregation"),
    (ReinforcePPOptions, {"kl_estimator": "k1"}, "kl_estimator"),
])
def test_bad_online_options_name_their_key(options, values, key):
    with pytest.raises(ConfigError) as err:
        options(**values)
    assert err.value.key.endswith(key)


# ---- paths the other tests did not reach (found by mutation testing) ----


def group_inputs(seed=7, **extra):
    logps, old, ref, mask, scores = rollout(seed=seed)
    t = torch.tensor
    return logps, old, ref, mask, scores, LossInputs(
        logps=t(logps.sum(-1)), lengths=t(mask.sum(-1).astype(float)), token_logps=t(logps, requires_grad=True),
        token_mask=t(mask), old_token_logps=t(old), ref_token_logps=t(ref), rewards=t(scores), **extra)


@pytest.mark.parametrize("cap", [0.5, 2.0])
def test_grpo_truncated_importance_sampling_weights_the_surrogate(cap):
    """tis_cap: each token's surrogate times min(pi_old / pi_engine, cap) (a cap below 1 too), on the step's
    token-mean; the gradient is the weighted one."""
    rng = np.random.default_rng(11)
    logps, old, ref, mask, scores, inputs = group_inputs()
    engine = old + rng.normal(0, 0.5, old.shape)
    inputs.engine_token_logps = torch.tensor(engine)
    step = torch.tensor([5.0, 4.0, 6.0, 3.0])
    inputs.step_mean_lengths = step
    opts = GRPOOptions(kl_coef=0.0, epsilon=0.2, tis_cap=cap, loss_aggregation="token-mean")
    losses, _ = grpo_loss(inputs, opts)
    ratio = np.exp(logps - old)
    adv = group_adv(scores)[..., None]
    surrogate = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    weights = np.where(mask, np.minimum(np.exp(old - engine), cap), 1.0)
    expected = (surrogate * weights * mask).sum((1, 2)) / step.sum().item()
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-9)
    plain, _ = grpo_loss(group_inputs()[-1], GRPOOptions(kl_coef=0.0, tis_cap=0.0))  # off: no engine needed
    assert not torch.allclose(plain, losses)
    with pytest.raises(ValueError, match="engine"):
        grpo_loss(group_inputs()[-1], GRPOOptions(kl_coef=0.0, tis_cap=cap))


def test_cispo_uses_the_behaviour_policy_and_the_group_scale():
    logps, old, ref, mask, scores, inputs = group_inputs(seed=8)
    losses, _ = cispo_loss(
        inputs, CISPOOptions(scale_rewards="none", weight_max=1.5, loss_aggregation="token-mean"))
    ratio = np.exp(logps - old)
    adv = (scores - scores.mean(1, keepdims=True))[..., None]  # scale_rewards none: centred only
    per_token = -np.minimum(ratio, 1.5) * adv * logps
    expected = (per_token * mask).sum((1, 2)) / mask.sum((1, 2)).mean()
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-9)


def test_ppo_defaults_and_guards():
    logps, old, ref, mask, _ = rollout(k=1)
    rng = np.random.default_rng(6)
    adv, returns, values = (rng.normal(0, 1, logps.shape) for _ in range(3))
    t = torch.tensor

    def inputs(**over):
        base = dict(logps=t(logps.sum(-1)), lengths=t(mask.sum(-1).astype(float)), token_logps=t(logps),
                    token_mask=t(mask), old_token_logps=t(old), ref_token_logps=None, advantages=t(adv),
                    returns=t(returns), values=t(values), old_values=None)
        return LossInputs(**{**base, **over})
    no_old, metrics = ppo_loss(inputs(), PPOOptions(kl_coef=0.0))  # no reference needed without the KL term
    with_old, _ = ppo_loss(inputs(old_values=t(values)), PPOOptions(kl_coef=0.0))
    torch.testing.assert_close(no_old, with_old)  # old values default to the values themselves
    value_loss = 0.5 * (values - returns) ** 2  # unclipped: old values = values
    np.testing.assert_allclose(metrics["value_loss"].numpy(), (value_loss * mask).sum((1, 2)) / mask.sum((1, 2)))
    ratio = np.exp(logps - old)
    policy = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(metrics["policy_loss"].numpy(), (policy * mask).sum((1, 2)) / mask.sum((1, 2)))
    step = torch.tensor([3.0])
    stepped, _ = ppo_loss(inputs(step_mean_lengths=step), PPOOptions(kl_coef=0.0))
    torch.testing.assert_close(stepped * 3.0, no_old * mask.sum((1, 2)).mean())  # the step's length divides
    for missing in ("values", "advantages", "returns"):
        with pytest.raises(ValueError, match="value head"):
            ppo_loss(inputs(**{missing: None}), PPOOptions())


def test_group_losses_divide_by_the_steps_mean_length():
    logps, old, ref, mask, scores, inputs = group_inputs(seed=9)
    token_mean = GRPOOptions(kl_coef=0.0, loss_aggregation="token-mean")
    base, _ = grpo_loss(inputs, token_mean)
    inputs.step_mean_lengths = torch.tensor([10.0, 10.0, 10.0, 10.0])
    stepped, _ = grpo_loss(inputs, token_mean)
    torch.testing.assert_close(stepped * 40.0, base * float(mask.sum((1, 2)).mean()))
    adv = np.random.default_rng(2).normal(0, 1, logps.shape)
    inputs.advantages = torch.tensor(adv)
    r_base, _ = reinforce_pp_loss(LossInputs(**{**inputs.__dict__, "step_mean_lengths": None}),
                                  ReinforcePPOptions(kl_coef=0.0))
    r_step, _ = reinforce_pp_loss(inputs, ReinforcePPOptions(kl_coef=0.0))
    torch.testing.assert_close(r_step * 40.0, r_base * float(mask.sum((1, 2)).mean()))


def test_sft_token_mean_uses_the_steps_mean_length_and_one_token_responses_count_one():
    logps = torch.tensor([[-3.0], [-8.0], [-1.5]])
    lengths = torch.tensor([[1.0], [4.0], [1.0]])
    spec = get_loss("sft")
    losses, metrics = spec.fn(LossInputs(logps=logps, lengths=lengths), build_options(spec, {}))
    torch.testing.assert_close(losses, torch.tensor([3.0, 2.0, 1.5]))
    torch.testing.assert_close(metrics["nll"], torch.tensor([3.0, 2.0, 1.5]))
    token_mean = build_options(spec, {"token_mean": True})
    batch_mean, _ = spec.fn(LossInputs(logps=logps, lengths=lengths), token_mean)
    torch.testing.assert_close(batch_mean, -logps[:, 0] / 2.0)  # the batch's mean length
    stepped, _ = spec.fn(LossInputs(logps=logps, lengths=lengths, step_mean_lengths=torch.tensor([5.0, 1.0])),
                         token_mean)
    torch.testing.assert_close(stepped, -logps[:, 0] / 5.0)  # the step's, first column
    short, _ = spec.fn(LossInputs(logps=logps, lengths=lengths, step_mean_lengths=torch.tensor([1.0])), token_mean)
    torch.testing.assert_close(short, -logps[:, 0])


def test_registry_register_checks_and_uses_ref_model():
    from dataclasses import replace

    from alignkit.losses import LOSSES
    from alignkit.losses.registry import register, uses_ref_model

    spec = get_loss("dpo")
    for bad in (replace(spec, name="bad1", data_shape="nope"), replace(spec, name="bad2", output="nope")):
        with pytest.raises(AssertionError):
            register(bad)
    for output in ("logps", "rewards"):
        register(replace(spec, name=f"tmp_{output}", output=output))
        assert LOSSES.pop(f"tmp_{output}").output == output
    sparse = get_loss("sparsepo")
    assert uses_ref_model(sparse, build_options(sparse, {}))
    assert uses_ref_model(sparse, build_options(sparse, {"use_token_kl": False}))  # activations alone
    assert uses_ref_model(sparse, build_options(sparse, {"token_weights": "uniform"}))  # token KL alone
    assert not uses_ref_model(sparse, build_options(sparse, {"use_token_kl": False, "token_weights": "uniform"}))
    assert not uses_ref_model(spec, build_options(spec, {}))


def test_unknown_loss_options_list_the_known_ones():
    with pytest.raises(ConfigError) as err:
        build_options(get_loss("dpo"), {"nope": 1})
    assert err.value.key == "loss_options.nope" and "known: beta, " in err.value.reason
    spec = get_loss("sft")
    from dataclasses import replace

    from pydantic import create_model

    from alignkit.losses.options import LossOptions

    bare = replace(spec, options=create_model("NoOptions", __base__=LossOptions))
    with pytest.raises(ConfigError) as err:
        build_options(bare, {"x": 1})
    assert err.value.reason.endswith("known: none")


# ---- more paths mutation testing showed unpinned ----


def test_each_losses_own_metrics_are_logged_under_their_names(rng):
    logps, ref, lengths = pair_arrays(rng)
    t = torch.tensor
    checks = {
        "dpop": ("dpop/penalty", None), "rpo": ("nll", "nll"), "slic": ("slic/calibration", None),
        "cpo": ("nll", "nll"),
        "orpo": ("orpo/log_odds_ratio", None), "bonbon": ("bonbon/ipo", None),
    }
    for name, (key, value) in checks.items():
        spec = get_loss(name)
        _, metrics = spec.fn(inputs_of(logps, ref if spec.needs_reference else None, lengths), build_options(spec, {}))
        assert key in metrics, (name, sorted(metrics))
        if value == "nll":  # the chosen response's NLL, per sequence or token-mean as the option says
            opts = build_options(spec, {})
            nll = -logps[:, 0] * B / lengths[:, 0].sum() if opts.nll_token_mean else -logps[:, 0] / lengths[:, 0]
            np.testing.assert_allclose(metrics[key].numpy(), nll, rtol=1e-6, err_msg=name)
    spec = get_loss("orpo")
    _, metrics = spec.fn(inputs_of(logps, None, lengths), build_options(spec, {}))
    np.testing.assert_allclose(metrics["nll"].numpy(), -logps[:, 0] * B / lengths[:, 0].sum(), rtol=1e-6)
    spec = get_loss("simpo")
    _, metrics = spec.fn(inputs_of(logps, None, lengths), build_options(spec, {"nll_weight": 0.5}))
    np.testing.assert_allclose(metrics["nll"].numpy(), -logps[:, 0] * B / lengths[:, 0].sum(), rtol=1e-6)
    _, metrics = get_loss("bonbon").fn(inputs_of(logps, ref, lengths), build_options(get_loss("bonbon"), {}))
    np.testing.assert_allclose(metrics["bonbon/sft"].numpy(), -logps[:, 0], rtol=1e-6)  # the summed NLL
    spec = get_loss("lipo")
    scores = rng.integers(0, 3, (B, 2)).astype(float)
    scores[:, 0] += 5  # k = 2: exactly one strictly ordered pair per list
    _, metrics = spec.fn(inputs_of(logps, ref, lengths, scores=t(scores)), build_options(spec, {}))
    rewards = 0.1 * (logps - ref)
    np.testing.assert_allclose(metrics["rewards/mean"].numpy(), rewards.mean(1), rtol=1e-9)
    np.testing.assert_allclose(metrics["rewards/best"].numpy(), rewards[:, 0], rtol=1e-9)
    gap = rewards[:, 0] - rewards[:, 1]
    np.testing.assert_allclose(metrics["rewards/accuracy"].numpy(), (gap > 0) + 0.5 * (gap == 0))


def test_group_metrics_and_errors_name_the_method():
    logps, old, ref, mask, scores, inputs = group_inputs(seed=12)
    for fn, opts, name in ((grpo_loss, GRPOOptions(kl_coef=0.0), "grpo"),
                           (cispo_loss, CISPOOptions(), "cispo")):
        _, metrics = fn(inputs, opts)
        np.testing.assert_allclose(metrics["reward"].numpy(), scores.mean(1))
        bare = LossInputs(**{**inputs.__dict__, "ref_token_logps": None})
        with pytest.raises(ValueError, match=f"^{name} with kl_coef"):
            fn(bare, type(opts)(kl_coef=0.1))
        with pytest.raises(ValueError, match=f"^{name} with tis_cap"):
            fn(inputs, type(opts)(kl_coef=0.0, tis_cap=2.0))
    adv = torch.tensor(np.random.default_rng(1).normal(0, 1, logps.shape))
    bare = LossInputs(**{**inputs.__dict__, "ref_token_logps": None, "advantages": adv})
    with pytest.raises(ValueError, match=r"^reinforce\+\+ with kl_coef"):
        reinforce_pp_loss(bare, ReinforcePPOptions(kl_coef=0.1))
    rloo, metrics = rloo_loss(LossInputs(logps=torch.tensor(logps.sum(-1)), lengths=torch.ones(3, 4),
                                         rewards=torch.tensor(scores)), RLOOOptions(kl_coef=0.0))
    np.testing.assert_allclose(metrics["reward"].numpy(), scores.mean(1))


def test_cispo_truncated_importance_sampling_uses_the_behaviour_policy():
    rng = np.random.default_rng(13)
    logps, old, ref, mask, scores, inputs = group_inputs(seed=13)
    engine = old + rng.normal(0, 0.5, old.shape)
    inputs.engine_token_logps = torch.tensor(engine)
    opts = CISPOOptions(tis_cap=2.0, loss_aggregation="token-mean")
    losses, _ = cispo_loss(inputs, opts)
    ratio = np.minimum(np.exp(logps - old), 5.0)
    adv = group_adv(scores)[..., None]
    weights = np.where(mask, np.minimum(np.exp(old - engine), 2.0), 1.0)
    expected = ((-ratio * adv * logps) * weights * mask).sum((1, 2)) / mask.sum((1, 2)).mean()
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-9)


def test_defaults_of_the_shared_online_helpers(rng):
    from alignkit.losses.online import group_advantages, kl_estimate, leave_one_out_advantages

    scores = torch.tensor(rng.normal(0, 1, (3, 4)))
    torch.testing.assert_close(group_advantages(scores), group_advantages(scores, "group"))
    a, b = torch.tensor(rng.normal(-2, 1, 7)), torch.tensor(rng.normal(-2, 1, 7))
    torch.testing.assert_close(kl_estimate(a, b), kl_estimate(a, b, "k3"))
    two = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # k = 2 is enough for a leave-one-out baseline
    torch.testing.assert_close(leave_one_out_advantages(two), torch.tensor([[-2.0, 2.0], [0.0, 0.0]]))
    with pytest.raises(ValueError):
        leave_one_out_advantages(torch.tensor([[1.0], [2.0]]))


def test_clip_boundaries_count_only_beyond_the_bound_and_only_for_the_advantages_sign():
    """A ratio exactly at 1 +- epsilon is not clipped, nor is one whose advantage is 0."""
    from alignkit.losses.online import _clip_metrics

    high, low = 1.25, 0.75  # exactly representable, and exp(log(x)) == x for both in float64
    ratio = torch.tensor([[[high, low, 1.5, 0.5, 1.5, 0.5]]], dtype=torch.float64)
    assert ratio[0, 0, 0] == torch.exp(torch.log(torch.tensor(high, dtype=torch.float64)))
    adv = torch.tensor([[[1.0, -1.0, 0.0, 0.0, 1.0, -1.0]]], dtype=torch.float64)
    mask = torch.ones(1, 1, 6, dtype=torch.bool)
    metrics = _clip_metrics(ratio, adv, mask, low, high)
    assert float(metrics["clip_high"]) == pytest.approx(1 / 6) and float(metrics["clip_low"]) == pytest.approx(1 / 6)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 6)
    logps = torch.log(torch.tensor([[[1.25, 0.75, 1.0]]], dtype=torch.float64))
    old = torch.zeros(1, 1, 3, dtype=torch.float64)
    zeros = torch.zeros(1, 1, 3, dtype=torch.float64)
    _, ppo = ppo_loss(LossInputs(logps=logps.sum(-1), lengths=torch.full((1, 1), 3.0), token_logps=logps,
                                 token_mask=torch.ones(1, 1, 3, dtype=torch.bool), old_token_logps=old,
                                 advantages=zeros + 1, returns=zeros, values=zeros), PPOOptions(cliprange=0.25))
    assert float(ppo["clip_fraction"]) == 0.0  # both exactly at the bound


def test_one_token_responses_are_divided_by_one():
    from alignkit.losses.base import sft_nll
    from alignkit.losses.online import GSPOOptions, aggregate

    logps, lengths = torch.tensor([-3.0, -5.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(sft_nll(logps, lengths), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(sft_nll(logps[:1], lengths[:1], token_mean=True), torch.tensor([3.0]))
    per_token = torch.tensor([[[2.0, 0.0], [4.0, 0.0]]])
    mask = torch.tensor([[[True, False], [True, False]]])
    torch.testing.assert_close(aggregate(per_token[:, :1], mask[:, :1], "token-mean"), torch.tensor([2.0]))
    # GSPO's sequence ratio of one-token responses is the token's own ratio
    token = torch.tensor([[[-1.0, 0.0], [-2.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[[-1.5, 0.0], [-1.0, 0.0]]], dtype=torch.float64)
    inputs = LossInputs(logps=token.sum(-1), lengths=torch.ones(1, 2), token_logps=token, token_mask=mask,
                        old_token_logps=old, rewards=torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    from alignkit.losses.online import _ratio

    ratio = _ratio(token, old, mask, "sequence")
    torch.testing.assert_close(ratio[..., 0].detach(), torch.exp(token - old)[..., 0].detach())
    grpo_loss(inputs, GSPOOptions())  # runs with one-token responses


def test_shared_loss_helpers_edge_cases(rng):
    from alignkit.losses.base import RunningMean, needs
    from alignkit.losses.reference_free import _log1mexp

    class Bare:
        pass

    assert needs(Bare()) == frozenset()
    one = RunningMean().update(torch.tensor([2.0]))
    assert RunningMean.merge(None, [one]) == RunningMean(2.0, 1)  # a single absorbed value is a state
    x = torch.tensor([-1e-10, -0.3, -0.6931471805599453, -0.7, -5.0], dtype=torch.float64)
    torch.testing.assert_close(_log1mexp(x), torch.log(-torch.expm1(x)), rtol=1e-12, atol=0)
    spec = get_loss("kto")
    logps, ref = rng.normal(-20, 4, (B, 1)), rng.normal(-20, 4, (B, 1))
    labels = torch.tensor([1, 0, 1, 1, 0])
    with pytest.raises(ValueError):  # the KL estimate needs both sides of the mismatched pairs
        spec.fn(inputs_of(logps, ref, np.full((B, 1), 5.0), labels=labels, kl_logps=torch.zeros(B)),
                build_options(spec, {}))


def test_online_option_choices_accept_every_documented_value_and_name_bad_keys():
    for value in ("normalize", "scale", "none"):
        assert PPOOptions(reward_norm=value).reward_norm == value
    for value in ("group", "none"):
        assert ReinforcePPOptions(baseline=value).baseline == value
    for options, key in ((lambda: PPOOptions(reward_norm="x"), "reward_norm"),
                         (lambda: GRPOOptions(importance_sampling_level="x"), "importance_sampling_level")):
        with pytest.raises(ConfigError) as err:
            options()
        assert err.value.key.endswith(key)


def test_d2o_accuracy_counts_margins_between_zero_and_one():
    spec = get_loss("d2o")
    ref = np.zeros((2, 3))
    logps = np.array([[0.0, 3.0, 3.0], [0.0, -3.0, -3.0]])  # margins +0.3 and -0.3 (beta 0.1 x mean of samples)
    _, metrics = spec.fn(inputs_of(logps, ref, np.full((2, 3), 4.0)), build_options(spec, {}))
    np.testing.assert_allclose(metrics["rewards/margins"].numpy(), [0.3, -0.3])
    np.testing.assert_allclose(metrics["rewards/accuracy"].numpy(), [1.0, 0.0])


def test_cispo_lower_weight_bound():
    logps, old, ref, mask, scores, inputs = group_inputs(seed=14)
    losses, metrics = cispo_loss(inputs, CISPOOptions(weight_min=0.9, weight_max=1.1, loss_aggregation="token-mean"))
    ratio = np.exp(logps - old)
    low, high, _ = clip_numpy(ratio, np.broadcast_to(group_adv(scores)[..., None], ratio.shape), mask, 0.9, 1.1)
    np.testing.assert_allclose(metrics["clip_low"].numpy(), low, atol=1e-12)  # the lower bound is reported too
    assert (low > 0).any()
    weights = np.clip(np.exp(logps - old), 0.9, 1.1)
    expected = ((-weights * group_adv(scores)[..., None] * logps) * mask).sum((1, 2)) / mask.sum((1, 2)).mean()
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-9)

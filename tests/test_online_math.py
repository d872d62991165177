"""The math of the online methods against NumPy written from the formulas (shared/methods/online-decoding-eval.md):
KL estimators, GRPO's group advantages, RLOO's leave-one-out baselines, clipped surrogates, GAE, whitening, running
moments, PPO's reward scaling and advantage clip, the GRPO / RLOO / PPO / CREAM losses (values and gradients), and GRPO's /
RLOO's loss code in TRL."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import LossInputs, build_options, get_loss
from alignkit.losses.dpo import DPOOptions, dpo_loss
from alignkit.losses.online import (
    CISPOOptions,
    GRPOOptions,
    PPOOptions,
    ReinforcePPOptions,
    RLOOOptions,
    aggregate,
    cispo_loss,
    clipped_surrogate,
    clipped_value_loss,
    group_advantages,
    grpo_loss,
    kl_estimate,
    leave_one_out_advantages,
    ppo_loss,
    rloo_loss,
    truncated_is_weights,
)
from alignkit.losses.pairwise import CREAMOptions, cream_loss
from alignkit.online.advantages import (
    RunningMoments,
    gae,
    kl_shaped_rewards,
    masked_whiten,
    normalise_scores,
    ppo_advantages,
)
from alignkit.online.experience import preference_pairs
from alignkit.online.self_reward import consistency_weights, kendall_tau, parse_score
from conftest import import_trl

B, K, T = 3, 4, 5
ATOL = 1e-6


def rollout_tensors(seed: int = 0):
    """Per-token log-probs of a policy, behaviour policy and reference [B, K, T] with ragged response lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B, K), generator=g)
    mask = torch.arange(T)[None, None, :] < lengths[..., None]
    logps = -torch.rand(B, K, T, generator=g) * 2 * mask
    old = (logps + 0.3 * torch.randn(B, K, T, generator=g)) * mask  # ratios well outside [0.8, 1.2] too
    ref = (logps + 0.5 * torch.randn(B, K, T, generator=g)) * mask
    scores = torch.randn(B, K, generator=g)
    return logps, old, ref, mask, scores


# -- estimators and advantages -----------------------------------------------------------------------------------

def test_kl_estimators_match_numpy():
    logps, _, ref, _, _ = rollout_tensors()
    d = (logps - ref).numpy()
    np.testing.assert_allclose(kl_estimate(logps, ref, "k1").numpy(), d, atol=ATOL)
    np.testing.assert_allclose(kl_estimate(logps, ref, "k2").numpy(), d ** 2 / 2, atol=ATOL)
    np.testing.assert_allclose(kl_estimate(logps, ref, "k3").numpy(), np.exp(-d) - 1 + d, atol=ATOL)
    # k3 = pi_ref/pi - log(pi_ref/pi) - 1 >= 0, zero exactly where the two agree
    assert (kl_estimate(logps, ref, "k3") >= 0).all()
    assert float(kl_estimate(logps, logps, "k3").abs().max()) == 0.0


def test_k3_is_an_unbiased_kl_estimate_on_samples():
    """E_{y~p}[k3] = KL(p || q) for two categorical distributions (Monte Carlo, many samples)."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    y = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = kl_estimate(p.log()[y], q.log()[y], "k3").mean()
    exact = float((p * (p / q).log()).sum())
    assert abs(float(estimate) - exact) < 0.01


def test_group_advantages_match_numpy():
    _, _, _, _, scores = rollout_tensors()
    r = scores.numpy()
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)  # Bessel, as TRL
    np.testing.assert_allclose(group_advantages(scores).numpy(), expected, atol=ATOL)
    np.testing.assert_allclose(group_advantages(scores, "none").numpy(), r - r.mean(1, keepdims=True), atol=ATOL)
    # a group whose rewards are all equal has no signal, not a division by zero
    assert torch.equal(group_advantages(torch.ones(2, 4)), torch.zeros(2, 4))


def test_leave_one_out_advantages_match_numpy():
    _, _, _, _, scores = rollout_tensors()
    r = scores.numpy()
    expected = np.array([[r[b, i] - np.mean(np.delete(r[b], i)) for i in range(K)] for b in range(B)])
    advantages = leave_one_out_advantages(scores)
    np.testing.assert_allclose(advantages.numpy(), expected, atol=ATOL)
    # identities: they sum to 0 per prompt, and equal k / (k - 1) times the mean-centred rewards
    np.testing.assert_allclose(advantages.sum(1).numpy(), 0, atol=ATOL)
    np.testing.assert_allclose(advantages.numpy(), K / (K - 1) * (r - r.mean(1, keepdims=True)), atol=ATOL)
    with pytest.raises(ValueError):
        leave_one_out_advantages(torch.ones(2, 1))


def test_clipped_surrogate_matches_numpy_and_stops_gradient_when_clipped():
    ratio = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 0.5, 1.5], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0])
    loss = clipped_surrogate(ratio, advantages, 0.2, 0.3)
    r, a = ratio.detach().numpy(), advantages.numpy()
    expected = -np.minimum(r * a, np.clip(r, 0.8, 1.3) * a)
    np.testing.assert_allclose(loss.detach().numpy(), expected, atol=ATOL)
    loss.sum().backward()
    # A > 0 and rho > 1 + e_high, or A < 0 and rho < 1 - e_low: clipped, no gradient; otherwise -A
    np.testing.assert_allclose(ratio.grad.numpy(), [-1, -1, -1, 1, 0, 0, 1], atol=ATOL)


def test_clipped_value_loss_matches_numpy():
    g = torch.Generator().manual_seed(1)
    values, old_values, returns = (torch.randn(20, generator=g) for _ in range(3))
    v, vo, ret = values.numpy(), old_values.numpy(), returns.numpy()
    expected = 0.5 * np.maximum((v - ret) ** 2, (vo + np.clip(v - vo, -0.2, 0.2) - ret) ** 2)
    np.testing.assert_allclose(clipped_value_loss(values, old_values, returns, 0.2).numpy(), expected, atol=ATOL)


def numpy_gae(rewards, values, length, gamma, lam):
    """The backward recursion on one sequence of `length` tokens, V = 0 after its end."""
    advantages, running = np.zeros(length), 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values[:length]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (1.0, 0.0)])
def test_gae_matches_numpy(gamma, lam):
    logps, _, _, mask, _ = rollout_tensors()
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(B, K, T, generator=g), torch.randn(B, K, T, generator=g)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        for i in range(K):
            n = int(mask[b, i].sum())
            expected_a, expected_r = numpy_gae(rewards[b, i].numpy(), values[b, i].numpy(), n, gamma, lam)
            np.testing.assert_allclose(advantages[b, i, :n].numpy(), expected_a, atol=1e-5)
            np.testing.assert_allclose(returns[b, i, :n].numpy(), expected_r, atol=1e-5)
            assert float(advantages[b, i, n:].abs().sum()) == 0 and float(returns[b, i, n:].abs().sum()) == 0
    if (gamma, lam) == (1.0, 1.0):  # Monte Carlo: A_t = (sum of rewards from t) - V_t
        to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [-1]), -1), [-1])
        np.testing.assert_allclose((advantages * mask).numpy(), ((to_go - values) * mask).numpy(), atol=1e-5)


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    _, _, _, mask, scores = rollout_tensors()
    token_kl = torch.rand(B, K, T, generator=torch.Generator().manual_seed(1))
    shaped = kl_shaped_rewards(scores, token_kl, mask, 0.1)
    for b in range(B):
        for i in range(K):
            n = int(mask[b, i].sum())
            expected = -0.1 * token_kl[b, i, :n].numpy()
            expected[-1] += float(scores[b, i])
            np.testing.assert_allclose(shaped[b, i, :n].numpy(), expected, atol=ATOL)
            assert float(shaped[b, i, n:].abs().sum()) == 0


def test_masked_whiten_and_running_moments():
    _, _, _, mask, _ = rollout_tensors()
    values = torch.randn(B, K, T, generator=torch.Generator().manual_seed(1)) * 3 + 2
    whitened = masked_whiten(values, mask)
    kept = whitened[mask].numpy()
    np.testing.assert_allclose([kept.mean(), kept.std()], [0.0, 1.0], atol=1e-5)  # population variance
    assert float(whitened[~mask].abs().sum()) == 0
    moments, seen = RunningMoments(), []
    for seed in range(4):  # merged batch by batch = the statistics of everything at once
        batch = torch.randn(5 + seed, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        moments.update(batch)
        seen.extend(batch.tolist())
        np.testing.assert_allclose([moments.mean, moments.var, moments.std],
                                   [np.mean(seen), np.var(seen), np.std(seen, ddof=1)], rtol=1e-9)
    scores = torch.tensor([1.0, 2.0, 30.0])
    normalised = normalise_scores(scores, RunningMoments(), "normalize", clip=1.0)
    expected = np.clip((scores.numpy() - scores.numpy().mean()) / scores.numpy().std(ddof=1), -1, 1)
    np.testing.assert_allclose(normalised.numpy(), expected, atol=1e-6)


# -- losses -------------------------------------------------------------------------------------------------------

def numpy_aggregate(per_token, mask, how, max_length=0):
    per_token, mask = per_token * mask, mask.astype(float)
    if how == "seq-mean-token-mean":
        return float(np.mean(per_token.sum(-1) / mask.sum(-1)))
    if how == "token-mean":
        return float(per_token.sum() / mask.sum())
    return float(per_token.sum() / (per_token.shape[0] * per_token.shape[1] * (max_length or per_token.shape[-1])))


def grpo_inputs(logps, old, ref, mask, scores, with_old=True):
    policy = logps.clone().requires_grad_()
    inputs = LossInputs(logps=(policy * mask).sum(-1), lengths=mask.sum(-1).float(), token_logps=policy,
                        token_mask=mask, ref_token_logps=ref, rewards=scores, old_token_logps=old if with_old else None)
    return inputs, policy


@pytest.mark.parametrize("how", ["seq-mean-token-mean", "token-mean", "const-norm"])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_grpo_loss_matches_numpy(how, scale):
    logps, old, ref, mask, scores = rollout_tensors()
    opts = GRPOOptions(epsilon=0.2, epsilon_high=0.28, kl_coef=0.04, scale_rewards=scale, loss_aggregation=how,
                       max_completion_length=7)
    inputs, policy = grpo_inputs(logps, old, ref, mask, scores)
    losses, metrics = grpo_loss(inputs, opts)
    lp, lo, lr, m, r = logps.numpy(), old.numpy(), ref.numpy(), mask.numpy(), scores.numpy()
    adv = r - r.mean(1, keepdims=True)
    if scale == "group":
        adv = adv / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    ratio = np.exp(lp - lo)
    per_token = -np.minimum(ratio * adv[..., None], np.clip(ratio, 0.8, 1.28) * adv[..., None])
    per_token += 0.04 * (np.exp(lr - lp) - (lr - lp) - 1)
    assert float(losses.detach().mean()) == pytest.approx(numpy_aggregate(per_token, m, how, 7), abs=1e-6)
    # gradient: autograd of the same formula written naively on the flat [B*K, T] layout
    losses.mean().backward()
    naive = policy.detach().clone().requires_grad_()
    ratio_t = torch.exp(naive - old)
    adv_t = torch.tensor(adv, dtype=torch.float32)[..., None]
    tok = -torch.min(ratio_t * adv_t, ratio_t.clamp(0.8, 1.28) * adv_t) + 0.04 * (
        torch.exp(ref - naive) - (ref - naive) - 1)
    mf = mask.float()
    if how == "seq-mean-token-mean":
        total = ((tok * mf).sum(-1) / mf.sum(-1)).mean()
    elif how == "token-mean":
        total = (tok * mf).sum() / mf.sum()
    else:
        total = (tok * mf).sum() / (B * K * 7)
    total.backward()
    torch.testing.assert_close(policy.grad, naive.grad, atol=1e-6, rtol=1e-5)
    assert metrics["kl"].shape == (B,) and metrics["clip_fraction"].shape == (B,)


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_grpo_kl_estimators_match_numpy(estimator, bias_correction):
    """The KL term alone (advantages 0: the surrogate is 0): kl_coef * k(d) [* rho], d = log pi - log pi_ref,
    rho = pi / pi_old; its gradient with rho differentiated (TRL's use_bias_correction_kl) or without it."""
    logps, old, ref, mask, _ = rollout_tensors(seed=3)
    inputs, policy = grpo_inputs(logps, old, ref, mask, torch.zeros(B, K))
    opts = GRPOOptions(kl_coef=0.1, kl_estimator=estimator, kl_bias_correction=bias_correction,
                       loss_aggregation="token-mean")
    losses, metrics = grpo_loss(inputs, opts)
    lp, lo, lr, m = logps.numpy(), old.numpy(), ref.numpy(), mask.numpy()
    d = lp - lr
    k = {"k1": d, "k2": d ** 2 / 2, "k3": np.exp(-d) - 1 + d}[estimator]
    rho = np.exp(lp - lo)
    # d/dlp of k: 1, d, 1 - exp(-d); of k * rho: (dk + k) * rho
    dk = {"k1": np.ones_like(d), "k2": d, "k3": 1 - np.exp(-d)}[estimator]
    per_token, grad = (k * rho, (dk + k) * rho) if bias_correction else (k, dk)
    assert float(losses.detach().mean()) == pytest.approx(0.1 * float((per_token * m).sum() / m.sum()), abs=1e-6)
    losses.mean().backward()
    np.testing.assert_allclose(policy.grad.numpy(), 0.1 * grad * m / m.sum(), atol=1e-7, rtol=1e-5)
    assert set(metrics) >= {"kl", "kl_k3"} and (estimator != "k2" or "kl_k2" in metrics)


def test_kl_options_default_to_the_plain_k3_and_are_checked():
    opts = GRPOOptions()
    assert (opts.kl_estimator, opts.kl_bias_correction) == ("k3", False)
    for spec in ("grpo", "dapo", "gspo", "cispo"):
        assert build_options(get_loss(spec), {"kl_estimator": "k2", "kl_bias_correction": True}).kl_bias_correction
    with pytest.raises(ConfigError, match="loss_options.kl_estimator"):
        build_options(get_loss("grpo"), {"kl_estimator": "k4"})
    with pytest.raises(ConfigError, match="loss_options.kl_bias_correction"):
        build_options(get_loss("grpo"), {"kl_bias_correction": "yes"})


def test_trl_default_is_the_bias_corrected_kl():
    """What docs/online.md states of the installed TRL: GRPOConfig's use_bias_correction_kl defaults to True."""
    grpo_config = import_trl("trl.trainer.grpo_config")
    assert grpo_config.GRPOConfig.__dataclass_fields__["use_bias_correction_kl"].default is True


def test_cispo_bias_corrected_kl_is_rho_times_the_estimate_with_gradient():
    """CISPO's weights stop the ratio's gradient; its KL term's bias correction does not."""
    logps, old, ref, mask, _ = rollout_tensors(seed=4)
    inputs, policy = grpo_inputs(logps, old, ref, mask, torch.zeros(B, K))
    losses, _ = cispo_loss(inputs, CISPOOptions(kl_coef=0.1, kl_bias_correction=True))
    losses.mean().backward()
    d, rho, m = (logps - ref).numpy(), np.exp((logps - old).numpy()), mask.numpy()
    k3 = np.exp(-d) - 1 + d
    assert float(losses.detach().mean()) == pytest.approx(0.1 * float((k3 * rho * m).sum() / m.sum()), abs=1e-6)
    np.testing.assert_allclose(policy.grad.numpy(), 0.1 * (1 - np.exp(-d) + k3) * rho * m / m.sum(), atol=1e-7,
                               rtol=1e-5)


def test_grpo_with_one_update_is_the_policy_gradient():
    """pi_old = pi (detached): the loss value is -mean(A) and d loss / d log pi_t = -A_i / |o_i| / K per example."""
    logps, _, ref, mask, scores = rollout_tensors()
    inputs, policy = grpo_inputs(logps, None, ref, mask, scores, with_old=False)
    losses, _ = grpo_loss(inputs, GRPOOptions(kl_coef=0.0))
    adv = group_advantages(scores)
    torch.testing.assert_close(losses, -adv.mean(1), atol=1e-6, rtol=0)
    losses.sum().backward()
    expected = -adv[..., None] / mask.sum(-1, keepdim=True) / K * mask
    torch.testing.assert_close(policy.grad, expected, atol=1e-6, rtol=1e-5)


def test_token_mean_is_exact_under_gradient_accumulation():
    """With the step's mean lengths, per-example losses of micro-batches averaged over the step = the step's
    token-mean, however the examples are split."""
    logps, _, _, mask, _ = rollout_tensors()
    per_token = torch.randn(B, K, T, generator=torch.Generator().manual_seed(1))
    whole = float((per_token * mask).sum() / mask.sum())
    step_lengths = mask.sum(-1).float().mean(0)
    parts = [aggregate(per_token[s], mask[s], "token-mean", step_lengths) for s in (slice(0, 1), slice(1, 3))]
    assert float(torch.cat(parts).sum() / B) == pytest.approx(whole, abs=1e-6)


def test_rloo_loss_matches_numpy():
    logps, old, ref, mask, scores = rollout_tensors()
    seq, old_seq, ref_seq = ((x * mask).sum(-1) for x in (logps, old, ref))
    policy = seq.clone().requires_grad_()
    inputs = LossInputs(logps=policy, lengths=mask.sum(-1).float(), ref_logps=ref_seq, old_logps=old_seq,
                        rewards=scores)
    losses, metrics = rloo_loss(inputs, RLOOOptions(kl_coef=0.05, epsilon=0.2))
    r = scores.numpy() - 0.05 * (old_seq - ref_seq).numpy()  # KL of the behaviour policy, in the reward
    adv = np.array([[r[b, i] - np.delete(r[b], i).mean() for i in range(K)] for b in range(B)])
    ratio = np.exp(seq.numpy() - old_seq.numpy())
    per_sequence = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    np.testing.assert_allclose(losses.detach().numpy(), per_sequence.mean(1), atol=1e-5)
    losses.sum().backward()
    clipped = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    np.testing.assert_allclose(policy.grad.numpy(), np.where(clipped, 0, -adv * ratio / K), atol=1e-5)
    # one update per rollout (pi_old = pi): REINFORCE with the leave-one-out baseline, gradient -A / K
    fresh = seq.clone().requires_grad_()
    losses, _ = rloo_loss(LossInputs(logps=fresh, lengths=inputs.lengths, ref_logps=ref_seq, rewards=scores),
                          RLOOOptions(kl_coef=0.0))
    losses.sum().backward()
    np.testing.assert_allclose(fresh.grad.numpy(), -leave_one_out_advantages(scores).numpy() / K, atol=1e-6)


@pytest.mark.parametrize("how", ["token-mean", "seq-mean-token-mean"])
def test_ppo_loss_matches_numpy(how):
    logps, old, ref, mask, _ = rollout_tensors()
    g = torch.Generator().manual_seed(3)
    advantages, returns, old_values = (torch.randn(B, K, T, generator=g) * mask for _ in range(3))
    values = (old_values + 0.4 * torch.randn(B, K, T, generator=g)) * mask  # some beyond the value clip
    policy, value_param = logps.clone().requires_grad_(), values.clone().requires_grad_()
    opts = PPOOptions(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, kl_coef=0.02, loss_aggregation=how)
    inputs = LossInputs(logps=(policy * mask).sum(-1), lengths=mask.sum(-1).float(), token_logps=policy,
                        token_mask=mask, old_token_logps=old, ref_token_logps=ref, advantages=advantages,
                        returns=returns, values=value_param, old_values=old_values)
    losses, metrics = ppo_loss(inputs, opts)
    lp, lo, lr, m = logps.numpy(), old.numpy(), ref.numpy(), mask.numpy()
    a, ret, v, vo = advantages.numpy(), returns.numpy(), values.numpy(), old_values.numpy()
    ratio = np.exp(lp - lo)
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
    vf = 0.5 * np.maximum((v - ret) ** 2, (vo + np.clip(v - vo, -0.2, 0.2) - ret) ** 2)
    per_token = pg + 0.1 * vf + 0.02 * (np.exp(lr - lp) - (lr - lp) - 1)
    assert float(losses.detach().mean()) == pytest.approx(numpy_aggregate(per_token, m, how), abs=1e-6)
    losses.mean().backward()
    # the value gradient: c_v (V - R) where the unclipped term is the larger, 0 where the clipped one wins and V is
    # outside the clip range, over the aggregation's token weights
    unclipped_wins = (v - ret) ** 2 >= (vo + np.clip(v - vo, -0.2, 0.2) - ret) ** 2
    inside = np.abs(v - vo) <= 0.2
    dvf = np.where(unclipped_wins, v - ret, np.where(inside, vo + np.clip(v - vo, -0.2, 0.2) - ret, 0.0))
    weights = m / m.sum() if how == "token-mean" else m / m.sum(-1, keepdims=True) / (B * K)
    np.testing.assert_allclose(value_param.grad.numpy(), 0.1 * dvf * weights, atol=1e-6)


def test_cream_loss_is_dpo_at_full_consistency_and_matches_numpy():
    g = torch.Generator().manual_seed(4)
    logps, ref = -torch.rand(6, 2, generator=g) * 10, -torch.rand(6, 2, generator=g) * 10
    lengths = torch.full((6, 2), 5.0)
    consistency = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.75, 1.0])
    cream, metrics = cream_loss(LossInputs(logps=logps, lengths=lengths, ref_logps=ref, consistency=consistency),
                                CREAMOptions(beta=0.1))
    h = 0.1 * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])).numpy()
    c = consistency.numpy()
    expected = -c * np.log(1 / (1 + np.exp(-h))) - (1 - c) * np.log(1 / (1 + np.exp(h)))
    np.testing.assert_allclose(cream.numpy(), expected, atol=1e-6)
    assert float(cream[2]) >= math.log(2)  # C = 1/2: the label says nothing; the loss only pulls h towards 0
    dpo, _ = dpo_loss(LossInputs(logps=logps, lengths=lengths, ref_logps=ref), DPOOptions(beta=0.1))
    unweighted, _ = cream_loss(LossInputs(logps=logps, lengths=lengths, ref_logps=ref), CREAMOptions(beta=0.1))
    torch.testing.assert_close(unweighted, dpo)  # no consistency given: DPO
    torch.testing.assert_close(cream[[0, 5]], dpo[[0, 5]])  # C = 1: DPO
    assert metrics["consistency"].tolist() == consistency.tolist()


def test_online_losses_are_registered_and_options_are_checked():
    from alignkit.errors import ConfigError

    for name in ("grpo", "rloo", "ppo"):
        assert get_loss(name).data_shape == "rollouts"
    assert get_loss("cream").data_shape == "pairs"
    with pytest.raises(ConfigError, match="loss_aggregation"):
        build_options(get_loss("grpo"), {"loss_aggregation": "sum"})
    with pytest.raises(ConfigError, match="reward_norm"):
        build_options(get_loss("ppo"), {"reward_norm": "whiten"})
    assert build_options(get_loss("grpo"), {"kl_coef": 0.0}).kl_coef == 0.0  # no KL term is a legitimate GRPO


# -- pairs, judges, consistency -----------------------------------------------------------------------------------

def test_preference_pairs():
    rewards = torch.tensor([[0.1, 0.5, 0.5, -0.2], [0.3, 0.3, 0.3, 0.3], [float("nan"), 1.0, 0.0, 0.5]])
    assert preference_pairs(rewards) == [(0, 1, 3), (2, 1, 2)]  # ties for best: the first; all-equal: no pair
    assert len(preference_pairs(rewards, "all")) == 5 + 0 + 3


def test_kendall_consistency_and_score_parsing():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 1, 2], [1, 2, 2]) == 1.0  # ordinal ranks: ties broken by position in both
    current = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    previous = torch.tensor([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0]])
    torch.testing.assert_close(consistency_weights(current, previous), torch.tensor([1.0, 2 / 3]))
    torch.testing.assert_close(consistency_weights(current, previous, "toporder"), torch.tensor([1.0, 0.0]))
    assert parse_score("The answer is relevant (+1) and complete.\nScore: 4") == 4.0
    assert parse_score("Score: 2 at first ... Score: 3.5") == 3.5
    assert parse_score("no number here") is None


# -- TRL's loss code on the same tensors ---------------------------------------------------------------------------

class _Accelerator:
    sync_gradients = True
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_stub(per_token_logps, use_bias_correction_kl=False, **attributes):
    """Enough of a TRL trainer for its `_compute_loss`: the model's per-token log-probs are given."""
    entropies = torch.zeros_like(per_token_logps)
    return SimpleNamespace(**{
        "_get_per_token_logps_and_entropies": lambda *a, **k: (per_token_logps, entropies, None),
        "aux_loss_enabled": False, "top_entropy_quantile": 1.0, "off_policy_mask_threshold": None, "use_vllm": False,
        "importance_sampling_level": "token", "current_gradient_accumulation_steps": 1, "_entropy_bonus_enabled": False,
        "model": SimpleNamespace(training=True), "accelerator": _Accelerator(),
        "_metrics": defaultdict(lambda: defaultdict(list)),
        "args": SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=None), **attributes})


def _trl_batch(mask, **tensors):
    rows = B * K
    return {"prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
            "completion_ids": torch.zeros(rows, T, dtype=torch.long),
            "completion_mask": mask.reshape(rows, T).long(), **tensors}


@pytest.mark.parametrize("bias_correction", [False, True], ids=["plain-k3", "bias-corrected"])
@pytest.mark.parametrize("loss_type,how,level", [("grpo", "seq-mean-token-mean", "token"), ("bnpo", "token-mean", "token"),
                                                 ("dr_grpo", "const-norm", "token"),
                                                 ("grpo", "seq-mean-token-mean", "sequence")])
def test_grpo_loss_equals_trl(loss_type, how, level, bias_correction):
    """alignkit's kl_bias_correction is TRL's use_bias_correction_kl (TRL 1.16's default: True), in value and
    gradient; at the sequence level (GSPO) TRL broadcasts the sequence ratio onto the per-token KL, and so do we."""
    grpo_trainer = import_trl("trl.trainer.grpo_trainer")
    logps, old, ref, mask, scores = rollout_tensors(seed=5)
    inputs, policy = grpo_inputs(logps, old, ref, mask, scores)
    ours, _ = grpo_loss(inputs, GRPOOptions(epsilon=0.2, epsilon_high=0.28, kl_coef=0.04, loss_aggregation=how,
                                            max_completion_length=T, importance_sampling_level=level,
                                            kl_bias_correction=bias_correction))
    ours.mean().backward()
    theirs_logps = logps.reshape(B * K, T).clone().requires_grad_()
    stub = _trl_stub(theirs_logps, bias_correction, beta=0.04, loss_type=loss_type, epsilon_low=0.2,
                     epsilon_high=0.28, max_completion_length=T, importance_sampling_level=level)
    batch = _trl_batch(mask, advantages=group_advantages(scores).reshape(-1),
                       old_per_token_logps=old.reshape(B * K, T), ref_per_token_logps=ref.reshape(B * K, T))
    theirs = grpo_trainer.GRPOTrainer._compute_loss(stub, None, batch)
    theirs.backward()
    assert float(ours.detach().mean()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    torch.testing.assert_close(policy.grad.reshape(B * K, T) * mask.reshape(B * K, T),
                               theirs_logps.grad * mask.reshape(B * K, T), atol=1e-6, rtol=1e-5)


def test_rloo_loss_equals_trl():
    rloo_trainer = import_trl("trl.trainer.rloo_trainer")
    logps, old, ref, mask, scores = rollout_tensors(seed=6)
    old_seq, ref_seq = (old * mask).sum(-1), (ref * mask).sum(-1)
    policy = logps.clone().requires_grad_()
    ours, _ = rloo_loss(LossInputs(logps=(policy * mask).sum(-1), lengths=mask.sum(-1).float(), ref_logps=ref_seq,
                                   old_logps=old_seq, rewards=scores), RLOOOptions(kl_coef=0.05, epsilon=0.2))
    ours.mean().backward()
    # TRL's advantages (rloo_trainer.py, _generate_and_score_completions): r - beta * KL(old, ref), leave-one-out
    rewards = scores - 0.05 * (old_seq - ref_seq)
    baselines = (rewards.sum(1, keepdim=True) - rewards) / (K - 1)
    theirs_logps = logps.reshape(B * K, T).clone().requires_grad_()
    stub = _trl_stub(theirs_logps, epsilon_low=0.2, epsilon_high=0.2)
    batch = _trl_batch(mask, advantages=(rewards - baselines).reshape(-1), old_logps=old_seq.reshape(-1))
    theirs = rloo_trainer.RLOOTrainer._compute_loss(stub, None, batch)
    theirs.backward()
    assert float(ours.detach().mean()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    torch.testing.assert_close(policy.grad.reshape(B * K, T) * mask.reshape(B * K, T),
                               theirs_logps.grad * mask.reshape(B * K, T), atol=1e-6, rtol=1e-5)


def test_truncated_is_weights_are_the_capped_ratio_on_the_mask_and_one_off_it():
    rng = np.random.default_rng(0)
    trainer, engine = rng.normal(-2, 1, (2, 3, 5)), rng.normal(-2, 1, (2, 3, 5))
    mask = rng.random((2, 3, 5)) > 0.3
    trainer_t = torch.tensor(trainer, requires_grad=True)
    weights = truncated_is_weights(trainer_t, torch.tensor(engine), torch.tensor(mask), cap=2.0)
    expected = np.where(mask, np.minimum(np.exp(trainer - engine), 2.0), 1.0)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12)
    assert (weights[torch.tensor(mask)] < 2.0).any() and (weights == 2.0).any()  # both sides of the cap occur
    assert not weights.requires_grad  # a constant factor on the surrogate


@pytest.mark.parametrize("options", [GRPOOptions, CISPOOptions, ReinforcePPOptions, RLOOOptions])
def test_a_reference_is_needed_only_with_a_kl_term(options):
    assert options(kl_coef=0.1).needs() == {"reference"}
    assert options(kl_coef=0.0).needs() == set()


def test_ppo_always_needs_the_reference_and_the_value_head():
    assert PPOOptions(kl_reward_coef=0.0).needs() == PPOOptions().needs() == {"reference", "values"}


@pytest.mark.parametrize("norm,clip", [("scale", 0.0), ("normalize", 0.5)])
def test_ppo_reward_scale_and_advantage_clip(norm, clip):
    """reward_norm scale: r / sigma of the running moments (no shift); advantage_clip: |A| <= c after whitening."""
    g = torch.Generator().manual_seed(3)
    B, K, T = 2, 3, 5
    mask = torch.arange(T)[None, None] < torch.randint(2, T + 1, (B, K, 1), generator=g)
    scores = torch.randn(B, K, generator=g) * 3 + 1
    logps, ref, values = (torch.randn(B, K, T, generator=g) * mask for _ in range(3))
    opts = PPOOptions(reward_norm=norm, advantage_clip=clip, reward_clip=0.0, kl_reward_coef=0.05)
    rewards = normalise_scores(scores, RunningMoments(), opts.reward_norm, opts.reward_clip)
    out = ppo_advantages(rewards, logps, ref, values, mask, opts)
    s = scores.numpy().astype(np.float64)
    normalised = s / s.std(ddof=1) if norm == "scale" else (s - s.mean()) / s.std(ddof=1)
    shaped = kl_shaped_rewards(torch.tensor(normalised, dtype=torch.float32), (logps - ref) * mask, mask, 0.05)
    advantages, returns = gae(shaped, values, mask, opts.gamma, opts.lam)
    expected = masked_whiten(advantages, mask)
    if clip:
        expected = expected.clamp(-clip, clip) * mask
        assert float(expected.abs().max()) == pytest.approx(clip)  # the clip binds in this case
    torch.testing.assert_close(out["advantages"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["returns"], returns, atol=1e-5, rtol=1e-5)

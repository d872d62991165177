"""The GRPO family (DAPO, GSPO, CISPO, REINFORCE++-baseline) against NumPy written from the formulas
(shared/methods/rl-variants.md) and against TRL 1.16's GRPOTrainer._compute_loss where TRL has the loss type
(dapo, cispo, importance_sampling_level="sequence")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.losses import build_options, get_loss
from alignkit.losses.online import (
    CISPOOptions,
    DAPOOptions,
    GSPOOptions,
    ReinforcePPOptions,
    cispo_loss,
    group_advantages,
    grpo_loss,
    reinforce_pp_loss,
)
from alignkit.online.advantages import reinforce_pp_advantages
from alignkit.rewards.shaping import soft_overlong_penalty
from conftest import import_trl
from test_online_math import B, K, T, _trl_batch, _trl_stub, grpo_inputs, rollout_tensors


def numpy_group_advantages(r):
    return (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)


def grads_of(policy, fn):
    naive = policy.detach().clone().requires_grad_()
    fn(naive).backward()
    return naive.grad


# -- DAPO -----------------------------------------------------------------------------------------------------------

def test_dapo_is_clip_higher_token_mean_without_kl():
    logps, old, ref, mask, scores = rollout_tensors(seed=11)
    inputs, policy = grpo_inputs(logps, old, None, mask, scores)
    losses, metrics = grpo_loss(inputs, DAPOOptions())
    lp, lo, m = logps.numpy(), old.numpy(), mask.numpy()
    adv = numpy_group_advantages(scores.numpy())[..., None]
    ratio = np.exp(lp - lo)
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.28) * adv)
    assert float(losses.detach().mean()) == pytest.approx(float((per_token * m).sum() / m.sum()), abs=1e-6)
    high = ((ratio > 1.28) & (adv > 0) & m).sum() / m.sum()
    low = ((ratio < 0.8) & (adv < 0) & m).sum() / m.sum()
    per_example = lambda x: (x * m).sum((1, 2)) / m.sum((1, 2))  # noqa: E731
    np.testing.assert_allclose(metrics["clip_high"].numpy(), per_example((ratio > 1.28) & (adv > 0)), atol=1e-6)
    np.testing.assert_allclose(metrics["clip_low"].numpy(), per_example((ratio < 0.8) & (adv < 0)), atol=1e-6)
    assert high > 0 and low > 0  # the case exercises both bounds
    assert "reference" not in DAPOOptions().needs()


def test_soft_overlong_penalty_values():
    """DAPO eq. 13 with L_max = 20, L_cache = 5: 0 up to 15 tokens, then (15 - |y|) / 5, -1 at and past 20."""
    lengths = torch.tensor([0, 10, 15, 16, 18, 20, 25])
    expected = [0.0 if n <= 15 else (15 - n) / 5 if n <= 20 else -1.0 for n in lengths.tolist()]
    np.testing.assert_allclose(soft_overlong_penalty(lengths, 20, 5).numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(soft_overlong_penalty(lengths, 20, 5, factor=0.5).numpy(), np.array(expected) / 2,
                               atol=1e-7)
    with pytest.raises(ValueError, match="overlong cache"):
        soft_overlong_penalty(lengths, 20, 0)


def test_soft_overlong_penalty_equals_trl():
    rewards = import_trl("trl.rewards")
    punish = rewards.get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=5)
    lengths = [3, 15, 16, 19, 20, 23]
    theirs = punish(completion_ids=[[0] * n for n in lengths])
    np.testing.assert_allclose(soft_overlong_penalty(torch.tensor(lengths), 20, 5).numpy(), theirs, atol=1e-6)


# -- GSPO -----------------------------------------------------------------------------------------------------------

def test_gspo_sequence_ratio_matches_numpy():
    logps, old, _, mask, scores = rollout_tensors(seed=12)
    old = logps + (old - logps) * 0.01 * mask  # ratios near 1: some inside GSPO's tiny clip range, some outside
    inputs, policy = grpo_inputs(logps, old, None, mask, scores)
    losses, metrics = grpo_loss(inputs, GSPOOptions())
    lp, lo, m = logps.numpy(), old.numpy(), mask.numpy()
    adv = numpy_group_advantages(scores.numpy())
    s = np.exp(((lp - lo) * m).sum(-1) / m.sum(-1))  # geometric mean of the token ratios
    per_seq = -np.minimum(s * adv, np.clip(s, 1 - 3e-4, 1 + 4e-4) * adv)
    assert float(losses.detach().mean()) == pytest.approx(float(per_seq.mean()), abs=1e-6)
    clipped = ((s > 1 + 4e-4) & (adv > 0)) | ((s < 1 - 3e-4) & (adv < 0))
    assert 0 < clipped.mean() < 1
    losses.mean().backward()

    def naive(p):
        s_t = torch.exp(((p - old) * mask).sum(-1) / mask.sum(-1))
        a = torch.tensor(adv, dtype=torch.float32)
        return (-torch.min(s_t * a, s_t.clamp(1 - 3e-4, 1 + 4e-4) * a)).mean()

    torch.testing.assert_close(policy.grad, grads_of(policy, naive), atol=1e-6, rtol=1e-5)
    # every unclipped token of a response gets the same gradient: A s / |o| / (B K)
    unclipped = torch.tensor(~clipped)
    expected = -(torch.tensor(adv * s, dtype=torch.float32) / mask.sum(-1) / (B * K))[..., None] * mask
    torch.testing.assert_close((policy.grad * unclipped[..., None]), expected * unclipped[..., None], atol=1e-6,
                               rtol=1e-5)


# -- CISPO ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("low", [0.0, 0.9])
def test_cispo_keeps_a_gradient_on_every_token(low):
    logps, old, _, mask, scores = rollout_tensors(seed=13)
    inputs, policy = grpo_inputs(logps, old, None, mask, scores)
    losses, metrics = cispo_loss(inputs, CISPOOptions(weight_max=1.2, weight_min=low))
    lp, lo, m = logps.numpy(), old.numpy(), mask.numpy()
    adv = numpy_group_advantages(scores.numpy())[..., None]
    w = np.clip(np.exp(lp - lo), low if low else None, 1.2)
    per_token = -w * adv * lp
    assert float(losses.detach().mean()) == pytest.approx(float((per_token * m).sum() / m.sum()), abs=1e-6)
    losses.mean().backward()
    expected = torch.tensor(-w * adv / m.sum(), dtype=torch.float32) * mask  # d/d log pi: the clipped weight, no zero
    torch.testing.assert_close(policy.grad, expected, atol=1e-6, rtol=1e-5)
    assert bool((policy.grad[mask] != 0).all())
    assert float(metrics["clip_high"].mean()) > 0


# -- REINFORCE++ ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("baseline", ["group", "none"])
def test_reinforce_pp_advantages_are_whitened_over_the_batch(baseline):
    _, _, _, mask, scores = rollout_tensors(seed=14)
    ours = reinforce_pp_advantages(scores, mask, baseline).numpy()
    r, m = scores.numpy(), mask.numpy()
    centred = r - r.mean(1, keepdims=True) if baseline == "group" else r
    tokens = np.broadcast_to(centred[..., None], m.shape)[m]  # every response token carries its response's value
    expected = (np.broadcast_to(centred[..., None], m.shape) - tokens.mean()) / tokens.std()  # population std
    np.testing.assert_allclose(ours[m], expected[m], atol=1e-5)
    assert (ours[~m] == 0).all()
    assert abs(ours[m].mean()) < 1e-5 and ours[m].std() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_reinforce_pp_loss_matches_numpy(estimator):
    logps, old, ref, mask, scores = rollout_tensors(seed=15)
    advantages = reinforce_pp_advantages(scores, mask)
    inputs, policy = grpo_inputs(logps, old, ref, mask, scores)
    inputs.advantages = advantages
    losses, _ = reinforce_pp_loss(inputs, ReinforcePPOptions(kl_coef=0.1, kl_estimator=estimator))
    lp, lo, lr, m, a = logps.numpy(), old.numpy(), ref.numpy(), mask.numpy(), advantages.numpy()
    ratio = np.exp(lp - lo)
    d = lp - lr
    kl = d ** 2 / 2 if estimator == "k2" else np.exp(-d) - 1 + d
    per_token = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a) + 0.1 * kl
    assert float(losses.detach().mean()) == pytest.approx(float((per_token * m).sum() / m.sum()), abs=1e-6)
    with pytest.raises(ValueError, match="whitened advantages"):
        reinforce_pp_loss(grpo_inputs(logps, old, ref, mask, scores)[0], ReinforcePPOptions())


# -- TRL ------------------------------------------------------------------------------------------------------------

def _trl_loss(theirs_logps, mask, scores, old, ref, loss_type, eps_low, eps_high, beta=0.0, level="token",
              bias_correction=False):
    grpo_trainer = import_trl("trl.trainer.grpo_trainer")
    stub = _trl_stub(theirs_logps, bias_correction, beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
                     max_completion_length=T)
    stub.importance_sampling_level = level
    stub.args.steps_per_generation = 1
    batch = _trl_batch(mask, advantages=group_advantages(scores).reshape(-1), old_per_token_logps=old.reshape(B * K, T),
                       num_items_in_batch=mask.sum().float())
    if ref is not None:
        batch["ref_per_token_logps"] = ref.reshape(B * K, T)
    return grpo_trainer.GRPOTrainer._compute_loss(stub, None, batch)


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("name", ["dapo", "cispo", "gspo"])
def test_family_equals_trl(name, bias_correction):
    logps, old, ref, mask, scores = rollout_tensors(seed=16)
    if name == "gspo":
        old = logps + (old - logps) * 0.01 * mask
    inputs, policy = grpo_inputs(logps, old, ref, mask, scores)
    spec = get_loss(name)
    opts = build_options(spec, {"kl_coef": 0.04, "kl_bias_correction": bias_correction} if name != "gspo"
                         else {"kl_bias_correction": bias_correction})
    ours, _ = spec.fn(inputs, opts)
    ours.mean().backward()
    theirs_logps = logps.reshape(B * K, T).clone().requires_grad_()
    trl_args = {"dapo": ("dapo", 0.2, 0.28, 0.04, "token"), "cispo": ("cispo", 0.2, 5.0, 0.04, "token"),
                "gspo": ("grpo", 3e-4, 4e-4, 0.0, "sequence")}[name]
    theirs = _trl_loss(theirs_logps, mask, scores, old, ref, *trl_args, bias_correction=bias_correction)
    theirs.backward()
    assert float(ours.detach().mean()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    flat = mask.reshape(B * K, T)
    torch.testing.assert_close(policy.grad.reshape(B * K, T) * flat, theirs_logps.grad * flat, atol=1e-6, rtol=1e-5)


def test_family_options_are_named_errors():
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="importance_sampling_level"):
        build_options(get_loss("gspo"), {"importance_sampling_level": "word"})
    with pytest.raises(ConfigError, match="weight_max"):
        build_options(get_loss("cispo"), {"weight_min": 2.0, "weight_max": 1.0})
    with pytest.raises(ConfigError, match="kl_estimator"):
        build_options(get_loss("reinforce++"), {"kl_estimator": "k1"})

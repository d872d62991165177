"""Token-level losses (tokenlevel.py): SparsePO with activation-based masks. TRL 1.16 has no SparsePO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignkit.losses import tokenlevel as tl
from alignkit.losses.base import LossInputs
from alignkit.losses.dpo import DPOOptions, dpo_loss

B, T, V = 4, 7, 6


def np_log_softmax(x):
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_batch(seed: int = 0):
    """Full-vocabulary policy and reference distributions over [B, 2, T] positions, sampled tokens, masks, weights."""
    rng = np.random.default_rng(seed)
    policy_vocab = np_log_softmax(rng.normal(0.0, 1.5, size=(B, 2, T, V)))
    ref_vocab = np_log_softmax(policy_vocab + rng.normal(0.0, 0.5, size=(B, 2, T, V)))
    tokens = rng.integers(0, V, size=(B, 2, T))
    mask = (np.arange(T)[None, None, :] < rng.integers(2, T + 1, size=(B, 2, 1))).astype(np.float64)
    weights = rng.uniform(0.0, 1.0, size=(B, 2, T))
    return policy_vocab, ref_vocab, tokens, mask, weights


def as_inputs(policy_vocab, ref_vocab, tokens, mask, weights, kl_weights=None) -> LossInputs:
    """What the log-prob stage hands the loss: sampled-token log-probs, and KL(pi_ref || pi_theta) per position."""
    pick = lambda vocab: np.take_along_axis(vocab, tokens[..., None], -1)[..., 0]  # noqa: E731
    token_kl = (np.exp(ref_vocab) * (ref_vocab - policy_vocab)).sum(-1)
    token_logps = pick(policy_vocab) * mask
    return LossInputs(
        logps=torch.tensor(token_logps.sum(-1)),
        lengths=torch.tensor(mask.sum(-1)),
        ref_logps=torch.tensor((pick(ref_vocab) * mask).sum(-1)),
        token_logps=torch.tensor(token_logps),
        ref_token_logps=torch.tensor(pick(ref_vocab) * mask),
        token_mask=torch.tensor(mask).bool(),
        token_kl=torch.tensor(token_kl * mask),
        token_weights=torch.tensor(weights),
        kl_token_weights=None if kl_weights is None else torch.tensor(kl_weights),
    )


def np_sparsepo(policy_vocab, ref_vocab, tokens, mask, weights, beta, l1_u=0.0, l1_d=0.0, kl_weights=None):
    """The SparsePO code's form (mapo_loss): position_kl = sum_v p_ref (log p - log p_ref), i.e. minus the KL,
    and logits = (u_w - u_l) - (d_w - d_l) with d = sum_t m_t position_kl_t."""
    kl_weights = weights if kl_weights is None else kl_weights
    pick = lambda vocab: np.take_along_axis(vocab, tokens[..., None], -1)[..., 0]  # noqa: E731
    u = (weights * mask * (pick(policy_vocab) - pick(ref_vocab))).sum(-1)  # [B, 2]
    position_kl = (np.exp(ref_vocab) * (policy_vocab - ref_vocab)).sum(-1)
    d = (kl_weights * mask * position_kl).sum(-1)
    logits = (u[:, 0] - u[:, 1]) - (d[:, 0] - d[:, 1])
    penalty = l1_u * (weights * mask).sum((1, 2)) + l1_d * (kl_weights * mask).sum((1, 2))
    return -np_logsigmoid(beta * logits) + penalty


def test_value_matches_the_sparsepo_code_form():
    batch = make_batch(seed=1)
    opts = tl.SparsePOOptions(beta=0.8, l1_weight=0.01, kl_l1_weight=0.02)
    losses, metrics = tl.sparsepo_loss(as_inputs(*batch), opts)
    np.testing.assert_allclose(losses.numpy(), np_sparsepo(*batch, 0.8, 0.01, 0.02), rtol=1e-12)
    assert all(m.shape == (B,) and not m.requires_grad for m in metrics.values())


def test_value_with_independent_masks():
    batch = make_batch(seed=2)
    kl_weights = np.random.default_rng(3).uniform(0.0, 2.0, size=(B, 2, T))
    losses = tl.sparsepo_loss(as_inputs(*batch, kl_weights=kl_weights), tl.SparsePOOptions(beta=0.3, kl_l1_weight=0.1))[0]
    np.testing.assert_allclose(losses.numpy(), np_sparsepo(*batch, 0.3, 0.0, 0.1, kl_weights=kl_weights), rtol=1e-12)


def test_gradient_matches_finite_differences():
    inputs = as_inputs(*make_batch(seed=4))
    opts = tl.SparsePOOptions(beta=0.8, l1_weight=0.01)

    def per_example(token_logps, token_kl, token_weights):
        fields = {**vars(inputs), "token_logps": token_logps, "token_kl": token_kl, "token_weights": token_weights}
        return tl.sparsepo_loss(LossInputs(**fields), opts)[0]

    leaves = tuple(t.clone().requires_grad_() for t in (inputs.token_logps, inputs.token_kl, inputs.token_weights))
    assert torch.autograd.gradcheck(per_example, leaves, fast_mode=True)


def test_masked_positions_get_no_gradient():
    inputs = as_inputs(*make_batch(seed=5))
    inputs.token_logps = inputs.token_logps.clone().requires_grad_()
    tl.sparsepo_loss(inputs, tl.SparsePOOptions())[0].sum().backward()
    assert not inputs.token_logps.grad[~inputs.token_mask].any()


# ---- limits and identities ----


def test_unit_mask_without_kl_is_dpo():
    inputs = as_inputs(*make_batch(seed=6))
    inputs.token_weights = torch.ones_like(inputs.token_weights)
    losses = tl.sparsepo_loss(inputs, tl.SparsePOOptions(beta=0.3, use_token_kl=False))[0]
    torch.testing.assert_close(losses, dpo_loss(inputs, DPOOptions(beta=0.3))[0])


def test_zero_mask_costs_log_two_plus_nothing():
    inputs = as_inputs(*make_batch(seed=6))
    inputs.token_weights = torch.zeros_like(inputs.token_weights)
    losses = tl.sparsepo_loss(inputs, tl.SparsePOOptions(l1_weight=0.5, kl_l1_weight=0.5))[0]
    torch.testing.assert_close(losses, torch.full((B,), math.log(2), dtype=torch.float64))


def test_missing_token_inputs_are_named():
    inputs = as_inputs(*make_batch(seed=7))
    inputs.token_kl = None
    with pytest.raises(ValueError, match="token_kl"):
        tl.sparsepo_loss(inputs, tl.SparsePOOptions())
    assert tl.sparsepo_loss(inputs, tl.SparsePOOptions(use_token_kl=False))[0].shape == (B,)


# ---- the activation-based mask ----


def np_zn_rescale(activations, mask):
    """The SparsePO code's zn_rescale per module: z-normalise over response tokens, min-max to [0, 1], mask,
    then average the modules."""
    out = np.zeros(activations.shape[:-1])
    for index in np.ndindex(*activations.shape[:2]):
        on = mask[index].astype(bool)
        per_module = []
        for h in range(activations.shape[-1]):
            values = activations[index][:, h]
            z = (values - values[on].mean()) / (values[on].std(ddof=1) + 1e-12)
            per_module.append((z - z[on].min()) / (z[on].max() - z[on].min()) * on)
        out[index] = np.mean(per_module, axis=0)
    return out


def test_activation_weights_match_the_code_rescaling():
    rng = np.random.default_rng(8)
    _, _, _, mask, _ = make_batch(seed=8)
    activations = rng.normal(0.0, 3.0, size=(B, 2, T, 3))
    weights = tl.activation_token_weights(torch.tensor(activations), torch.tensor(mask).bool())
    np.testing.assert_allclose(weights.numpy(), np_zn_rescale(activations, mask), rtol=1e-5, atol=1e-6)
    assert not weights.requires_grad


def test_activation_weights_of_a_constant_sequence_are_one():
    mask = torch.ones(1, 2, T, dtype=torch.bool)
    mask[0, 1, 3:] = False
    weights = tl.activation_token_weights(torch.full((1, 2, T, 2), 0.7), mask)
    torch.testing.assert_close(weights, mask.float())


def test_logged_rewards_and_mask_mean_equal_numpy():
    """The logged reward of a response is beta (masked log-ratio - masked KL), as the SparsePO code logs it; the
    mask mean is the masks' mean over the example's response tokens."""
    policy_vocab, ref_vocab, tokens, mask, weights = make_batch(seed=5)
    _, metrics = tl.sparsepo_loss(as_inputs(policy_vocab, ref_vocab, tokens, mask, weights),
                                  tl.SparsePOOptions(beta=0.7))
    pick = lambda vocab: np.take_along_axis(vocab, tokens[..., None], -1)[..., 0]  # noqa: E731
    kl = (np.exp(ref_vocab) * (ref_vocab - policy_vocab)).sum(-1)
    rewards = 0.7 * ((weights * mask * (pick(policy_vocab) - pick(ref_vocab))).sum(-1) - (weights * mask * kl).sum(-1))
    np.testing.assert_allclose(metrics["rewards/chosen"].numpy(), rewards[:, 0], rtol=1e-10)
    np.testing.assert_allclose(metrics["rewards/rejected"].numpy(), rewards[:, 1], rtol=1e-10)
    np.testing.assert_allclose(metrics["sparsepo/mask_mean"].numpy(),
                               (weights * mask).sum((1, 2)) / mask.sum((1, 2)), rtol=1e-10)
    one = np.zeros_like(mask)
    one[:, :, 0] = 1.0  # one token per response: the mean is over 2 tokens, not clamped to more
    _, metrics = tl.sparsepo_loss(as_inputs(policy_vocab, ref_vocab, tokens, one, weights), tl.SparsePOOptions())
    np.testing.assert_allclose(metrics["sparsepo/mask_mean"].numpy(), weights[:, :, 0].sum(1) / 2, rtol=1e-10)

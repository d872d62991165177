"""Listwise losses (listwise.py): LiPO-lambda and ListMLE / Plackett-Luce on k scored responses.

TRL 1.16 has neither, so there is no TRL equality test here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignkit.losses import listwise as lw
from alignkit.losses.base import LossInputs
from alignkit.losses.dpo import DPOOptions, dpo_loss

B, K = 6, 5


def make_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(5.0, 40.0, size=(B, K))
    ref_logps = logps + rng.normal(0.0, 6.0, size=(B, K))
    scores = rng.integers(0, 4, size=(B, K)).astype(np.float64)  # graded 0..3, with ties
    return logps, ref_logps, scores


def as_inputs(logps, ref_logps, scores) -> LossInputs:
    return LossInputs(
        logps=torch.tensor(logps),
        lengths=torch.full(logps.shape, 10.0, dtype=torch.float64),
        ref_logps=torch.tensor(ref_logps),
        scores=torch.tensor(scores),
    )


# ---- NumPy references, written as plain loops over the formula ----


def np_lipo(logps, ref_logps, scores, beta):
    losses = []
    for s_row, psi in zip(beta * (logps - ref_logps), scores):
        order = np.argsort(-s_row, kind="stable")
        rank = np.empty(len(s_row))
        rank[order] = np.arange(1, len(s_row) + 1)
        gain, inv_discount = 2.0**psi - 1, 1 / np.log2(1 + rank)
        total = 0.0
        for i in range(len(s_row)):
            for j in range(len(s_row)):
                if psi[i] > psi[j]:
                    weight = abs(gain[i] - gain[j]) * abs(inv_discount[i] - inv_discount[j])
                    total += weight * math.log1p(math.exp(-(s_row[i] - s_row[j])))
        losses.append(total)
    return np.array(losses)


def np_listmle(logps, ref_logps, scores, beta):
    losses = []
    for s_row, psi in zip(beta * (logps - ref_logps), scores):
        ranked = s_row[np.argsort(-psi, kind="stable")]
        losses.append(-sum(ranked[k] - np.log(np.exp(ranked[k:]).sum()) for k in range(len(ranked))))
    return np.array(losses)


CASES = {
    "lipo": (lw.lipo_lambda_loss, lw.LiPOOptions(beta=0.3), lambda *a: np_lipo(*a, 0.3)),
    "listmle": (lw.listmle_loss, lw.ListMLEOptions(beta=0.3), lambda *a: np_listmle(*a, 0.3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_matches_numpy_formula(case):
    fn, opts, reference = CASES[case]
    logps, ref_logps, scores = make_batch(seed=1)
    losses, metrics = fn(as_inputs(logps, ref_logps, scores), opts)
    np.testing.assert_allclose(losses.numpy(), reference(logps, ref_logps, scores), rtol=1e-12)
    assert all(m.shape == (B,) and not m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_matches_finite_differences(case):
    fn, opts, _ = CASES[case]
    logps, ref_logps, scores = make_batch(seed=2)
    fixed = as_inputs(logps, ref_logps, scores)

    def per_example(policy_logps):
        return fn(LossInputs(logps=policy_logps, lengths=fixed.lengths, ref_logps=fixed.ref_logps,
                             scores=fixed.scores), opts)[0]

    # LiPO's lambda weights depend on the ranks only, which a finite-difference step does not change
    assert torch.autograd.gradcheck(per_example, (torch.tensor(logps, requires_grad=True),), fast_mode=True)


def test_lipo_lambda_weights_carry_no_gradient():
    logps, ref_logps, scores = make_batch(seed=3)
    inputs = as_inputs(logps, ref_logps, scores)
    inputs.logps.requires_grad_()
    lw.lipo_lambda_loss(inputs, lw.LiPOOptions(beta=0.3))[0].sum().backward()

    # the same with the weights frozen by hand from the NumPy ranks
    naive_logps = torch.tensor(logps, requires_grad=True)
    rewards = 0.3 * (naive_logps - torch.tensor(ref_logps))
    total = 0.0
    for b in range(B):
        rank = np.empty(K)
        rank[np.argsort(-rewards[b].detach().numpy(), kind="stable")] = np.arange(1, K + 1)
        gain, inv_discount = 2.0 ** scores[b] - 1, 1 / np.log2(1 + rank)
        for i in range(K):
            for j in range(K):
                if scores[b, i] > scores[b, j]:
                    weight = abs(gain[i] - gain[j]) * abs(inv_discount[i] - inv_discount[j])
                    total = total + weight * torch.nn.functional.softplus(rewards[b, j] - rewards[b, i])
    total.backward()
    torch.testing.assert_close(inputs.logps.grad, naive_logps.grad)


# ---- limits and identities ----


def pair_as_list(seed: int):
    logps, ref_logps, _ = make_batch(seed=seed)
    return logps[:, :2], ref_logps[:, :2], np.tile([1.0, 0.0], (B, 1))


def test_listmle_with_two_responses_is_dpo():
    logps, ref_logps, scores = pair_as_list(seed=4)
    inputs = as_inputs(logps, ref_logps, scores)
    torch.testing.assert_close(lw.listmle_loss(inputs, lw.ListMLEOptions(beta=0.3))[0],
                               dpo_loss(inputs, DPOOptions(beta=0.3))[0])


def test_lipo_with_two_responses_is_dpo_times_a_constant_weight():
    logps, ref_logps, scores = pair_as_list(seed=4)
    inputs = as_inputs(logps, ref_logps, scores)
    weight = 1.0 * (1 / math.log2(2) - 1 / math.log2(3))  # |G_1 - G_0| = 1; ranks 1 and 2
    torch.testing.assert_close(lw.lipo_lambda_loss(inputs, lw.LiPOOptions(beta=0.3))[0],
                               weight * dpo_loss(inputs, DPOOptions(beta=0.3))[0])


def test_tied_scores_give_lipo_nothing_to_learn():
    logps, ref_logps, _ = make_batch(seed=5)
    losses = lw.lipo_lambda_loss(as_inputs(logps, ref_logps, np.ones((B, K))), lw.LiPOOptions())[0]
    torch.testing.assert_close(losses, torch.zeros(B, dtype=torch.float64))


def test_listmle_with_equal_rewards_is_log_k_factorial():
    logps = np.full((B, K), -10.0)
    _, _, scores = make_batch(seed=5)
    losses = lw.listmle_loss(as_inputs(logps, logps.copy(), scores), lw.ListMLEOptions())[0]
    torch.testing.assert_close(losses, torch.full((B,), math.log(math.factorial(K)), dtype=torch.float64))


@pytest.mark.parametrize("case", sorted(CASES))
def test_reordering_the_list_changes_nothing(case):
    fn, opts, _ = CASES[case]
    logps, ref_logps, _ = make_batch(seed=6)
    scores = np.tile(np.arange(K, dtype=np.float64), (B, 1))  # distinct scores: the order is unambiguous
    permutation = np.random.default_rng(0).permutation(K)
    original = fn(as_inputs(logps, ref_logps, scores), opts)[0]
    shuffled = fn(as_inputs(logps[:, permutation], ref_logps[:, permutation], scores[:, permutation]), opts)[0]
    torch.testing.assert_close(original, shuffled)


def test_listwise_losses_need_scores():
    logps, ref_logps, _ = make_batch(seed=7)
    inputs = LossInputs(logps=torch.tensor(logps), lengths=torch.ones(B, K), ref_logps=torch.tensor(ref_logps))
    with pytest.raises(ValueError, match="scores"):
        lw.listmle_loss(inputs, lw.ListMLEOptions())

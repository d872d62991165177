"""Negative-only losses (negatives.py): D2O. TRL 1.16 has no D2O."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignkit.losses import negatives as ng
from alignkit.losses.base import LossInputs
from alignkit.losses.dpo import DPOOptions, dpo_loss

B, K = 6, 4  # K self-samples per prompt, plus the negative in column 0


def make_batch(seed: int = 0, samples: int = K):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(5.0, 40.0, size=(B, 1 + samples))
    ref_logps = logps + rng.normal(0.0, 6.0, size=(B, 1 + samples))
    return logps, ref_logps


def as_inputs(logps, ref_logps) -> LossInputs:
    return LossInputs(logps=torch.tensor(logps), lengths=torch.ones(logps.shape), ref_logps=torch.tensor(ref_logps))


def np_d2o(logps, ref_logps, beta, alpha):
    ratios = logps - ref_logps
    samples = ratios[:, 1:]
    z = beta / samples.shape[1] * samples.sum(1) - alpha * ratios[:, 0]
    return np.logaddexp(0.0, -z)


def test_value_matches_numpy_formula():
    logps, ref_logps = make_batch(seed=1)
    losses, metrics = ng.d2o_loss(as_inputs(logps, ref_logps), ng.D2OOptions(beta=0.2, alpha=0.05))
    np.testing.assert_allclose(losses.numpy(), np_d2o(logps, ref_logps, 0.2, 0.05), rtol=1e-12)
    assert all(m.shape == (B,) and not m.requires_grad for m in metrics.values())


def test_gradient_matches_finite_differences():
    logps, ref_logps = make_batch(seed=2)
    ref_t = torch.tensor(ref_logps)

    def per_example(policy_logps):
        inputs = LossInputs(logps=policy_logps, lengths=torch.ones_like(ref_t), ref_logps=ref_t)
        return ng.d2o_loss(inputs, ng.D2OOptions(beta=0.2, alpha=0.05))[0]

    assert torch.autograd.gradcheck(per_example, (torch.tensor(logps, requires_grad=True),), fast_mode=True)


def test_one_sample_with_alpha_equal_to_beta_is_dpo_against_the_negative():
    logps, ref_logps = make_batch(seed=3, samples=1)
    d2o = ng.d2o_loss(as_inputs(logps, ref_logps), ng.D2OOptions(beta=0.3, alpha=0.3))[0]
    as_pair = as_inputs(logps[:, ::-1].copy(), ref_logps[:, ::-1].copy())  # chosen = the sample, rejected = negative
    torch.testing.assert_close(d2o, dpo_loss(as_pair, DPOOptions(beta=0.3))[0])


def test_repeating_the_samples_changes_nothing():
    logps, ref_logps = make_batch(seed=4)
    repeated = np.concatenate([logps, logps[:, 1:]], axis=1), np.concatenate([ref_logps, ref_logps[:, 1:]], axis=1)
    opts = ng.D2OOptions()
    torch.testing.assert_close(ng.d2o_loss(as_inputs(*repeated), opts)[0], ng.d2o_loss(as_inputs(logps, ref_logps), opts)[0])


def test_policy_equal_to_reference_costs_log_two():
    logps = np.full((B, 1 + K), -12.0)
    losses = ng.d2o_loss(as_inputs(logps, logps.copy()), ng.D2OOptions())[0]
    torch.testing.assert_close(losses, torch.full((B,), math.log(2), dtype=torch.float64))


def test_needs_at_least_one_sample():
    logps, ref_logps = make_batch(seed=5)
    with pytest.raises(ValueError, match="self-sample"):
        ng.d2o_loss(as_inputs(logps[:, :1], ref_logps[:, :1]), ng.D2OOptions())

"""Multi-objective losses (multiobjective.py): MODPO. TRL 1.16 has no MODPO; the reference is the official
modpo_trainer.py::modpo_loss, transcribed to NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import build_options, get_loss
from alignkit.losses import multiobjective as mo
from alignkit.losses.base import LossInputs
from alignkit.losses.dpo import DPOOptions, dpo_loss

B, K = 6, 2


def make_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(5.0, 40.0, size=(B, 2))
    ref_logps = logps + rng.normal(0.0, 5.0, size=(B, 2))
    other_rewards = rng.normal(0.0, 1.0, size=(B, 2, K))
    return logps, ref_logps, other_rewards


def as_inputs(logps, ref_logps, other_rewards=None, margins=None, requires_grad=False) -> LossInputs:
    return LossInputs(logps=torch.tensor(logps, requires_grad=requires_grad), lengths=torch.ones(logps.shape),
                      ref_logps=torch.tensor(ref_logps),
                      other_rewards=None if other_rewards is None else torch.tensor(other_rewards),
                      margins=None if margins is None else torch.tensor(margins))


def np_modpo(logps, ref_logps, other_rewards, beta, w0, weights, hinge=False):
    """modpo_loss: logits = (1/w0) * (beta * (pi_logratios - ref_logratios) - margin_rewards @ w_k)."""
    pi_logratios = logps[:, 0] - logps[:, 1]
    ref_logratios = ref_logps[:, 0] - ref_logps[:, 1]
    margin = (other_rewards[:, 0, :] - other_rewards[:, 1, :]) @ np.asarray(weights)
    z = (beta * (pi_logratios - ref_logratios) - margin) / w0
    return np.maximum(0.0, 1 - z) if hinge else np.logaddexp(0.0, -z)


@pytest.mark.parametrize("hinge", [False, True])
def test_value_matches_numpy_formula(hinge):
    logps, ref_logps, other = make_batch(seed=1)
    opts = mo.MODPOOptions(beta=0.2, weight=0.4, other_weights=(0.35, 0.25), hinge=hinge)
    losses, metrics = mo.modpo_loss(as_inputs(logps, ref_logps, other), opts)
    np.testing.assert_allclose(losses.numpy(), np_modpo(logps, ref_logps, other, 0.2, 0.4, [0.35, 0.25], hinge),
                               rtol=1e-12)
    assert all(m.shape == (B,) and not m.requires_grad for m in metrics.values())


def test_default_other_weights_share_one_minus_w0():
    logps, ref_logps, other = make_batch(seed=2)
    losses = mo.modpo_loss(as_inputs(logps, ref_logps, other), mo.MODPOOptions(weight=0.5))[0]
    expected = np_modpo(logps, ref_logps, other, 0.1, 0.5, [0.25, 0.25])
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-12)


def test_a_weighted_margin_field_equals_the_other_rewards():
    logps, ref_logps, other = make_batch(seed=3)
    opts = mo.MODPOOptions(beta=0.3, weight=0.6, other_weights=(0.3, 0.1))
    margins = (other[:, 0, :] - other[:, 1, :]) @ np.array([0.3, 0.1])
    from_rewards = mo.modpo_loss(as_inputs(logps, ref_logps, other), opts)[0]
    from_margin = mo.modpo_loss(as_inputs(logps, ref_logps, margins=margins), opts)[0]
    torch.testing.assert_close(from_margin, from_rewards)


def test_gradient_matches_finite_differences():
    logps, ref_logps, other = make_batch(seed=4)

    def per_example(policy_logps):
        inputs = LossInputs(logps=policy_logps, lengths=torch.ones(B, 2), ref_logps=torch.tensor(ref_logps),
                            other_rewards=torch.tensor(other))
        return mo.modpo_loss(inputs, mo.MODPOOptions(beta=0.2, weight=0.4, other_weights=(0.35, 0.25)))[0]

    assert torch.autograd.gradcheck(per_example, (torch.tensor(logps, requires_grad=True),), fast_mode=True)


def test_one_objective_with_no_margin_is_dpo():
    logps, ref_logps, other = make_batch(seed=5)
    modpo = mo.modpo_loss(as_inputs(logps, ref_logps, margins=np.zeros(B)), mo.MODPOOptions(beta=0.2, weight=1.0))[0]
    torch.testing.assert_close(modpo, dpo_loss(as_inputs(logps, ref_logps), DPOOptions(beta=0.2))[0])


def test_missing_other_rewards_and_bad_options_are_named():
    logps, ref_logps, other = make_batch(seed=6)
    with pytest.raises(ValueError, match="other_rewards"):
        mo.modpo_loss(as_inputs(logps, ref_logps), mo.MODPOOptions())
    with pytest.raises(ValueError, match="other_weights"):
        mo.modpo_loss(as_inputs(logps, ref_logps, other), mo.MODPOOptions(other_weights=(1.0,)))
    spec = get_loss("modpo")
    with pytest.raises(ConfigError, match="weight"):
        build_options(spec, {"weight": 0.0})
    with pytest.raises(ConfigError, match="other_weights"):
        build_options(spec, {"other_weights": [0.5, "a"]})
    assert build_options(spec, {"other_weights": [0.5, 1]}).other_weights == (0.5, 1.0)

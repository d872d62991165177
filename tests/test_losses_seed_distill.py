"""The seed paper's distillation losses (arXiv 2502.17927; losses/distill.py, losses/divergence.py): DCKD's two
forward KLs (and its optional DPO term) and ADPA's expected advantage, against NumPy transcriptions of their
formulas, values and gradients; the chunked expected advantage against the unchunked one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.losses.base import LossInputs
from alignkit.losses.distill import ADPAOptions, DCKDOptions, adpa_loss, dckd_loss
from alignkit.losses.divergence import (
    AdvantageTeacher,
    DenseTeacher,
    DistillSettings,
    chunked_divergence,
    expected_advantage,
)

B, T = 4, 6


def pair_inputs(seed: int = 0):
    g = np.random.default_rng(seed)
    mask = np.arange(T)[None, None] < g.integers(1, T + 1, size=(B, 2, 1))
    divergence = g.uniform(0, 2, size=(B, 2, T)) * mask
    logps, ref_logps = -g.uniform(1, 9, size=(B, 2)), -g.uniform(1, 9, size=(B, 2))
    return mask, divergence, logps, ref_logps


def as_inputs(mask, divergence, logps, ref_logps):
    return LossInputs(logps=torch.tensor(logps, requires_grad=True), lengths=torch.tensor(mask.sum(-1), dtype=torch.float64),
                      ref_logps=torch.tensor(ref_logps), token_mask=torch.tensor(mask),
                      token_divergence=torch.tensor(divergence, requires_grad=True))


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("dpo_weight", (0.0, 0.5))
def test_dckd_equals_numpy(dpo_weight):
    """l_i = w_c sum_t KL_w / mean_i |y_w| + w_l sum_t KL_l / mean_i |y_l| - d log s(b (r_w - r_l)); its gradient in
    each token's KL is w / (B mean |y|) (the learner's mean over examples), in log pi(y_w) -d b s(-z) / B."""
    mask, divergence, logps, ref_logps = pair_inputs()
    inputs = as_inputs(mask, divergence, logps, ref_logps)
    opts = DCKDOptions(chosen_kd_weight=0.7, rejected_kd_weight=1.3, dpo_weight=dpo_weight, beta=0.2)
    losses, metrics = dckd_loss(inputs, opts)
    grad_divergence, grad_logps = torch.autograd.grad(losses.mean(), (inputs.token_divergence, inputs.logps),
                                                      allow_unused=True, materialize_grads=True)

    mean_lengths = mask.sum(-1).mean(0)  # [2]
    kl = (divergence * mask).sum(-1) / mean_lengths  # [B, 2]
    z = 0.2 * ((logps[:, 0] - ref_logps[:, 0]) - (logps[:, 1] - ref_logps[:, 1]))
    expected = 0.7 * kl[:, 0] + 1.3 * kl[:, 1] - dpo_weight * np_logsigmoid(z)
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(metrics["distill/chosen_kl"].numpy(), kl[:, 0], rtol=1e-12)
    expected_grad = mask * (np.array([0.7, 1.3]) / (B * mean_lengths))[None, :, None]
    np.testing.assert_allclose(grad_divergence.numpy(), expected_grad, rtol=1e-12)
    sig = 1 / (1 + np.exp(z))
    np.testing.assert_allclose(grad_logps.numpy(), np.stack([-dpo_weight * 0.2 * sig / B,
                                                            dpo_weight * 0.2 * sig / B], 1), atol=1e-15)


def test_dckd_uses_the_steps_token_counts_when_given():
    mask, divergence, logps, ref_logps = pair_inputs(1)
    inputs = as_inputs(mask, divergence, logps, ref_logps)
    inputs.step_mean_lengths = torch.tensor([3.0, 5.0], dtype=torch.float64)
    losses, _ = dckd_loss(inputs, DCKDOptions())
    expected = (divergence * mask)[:, 0].sum(-1) / 3.0 + (divergence * mask)[:, 1].sum(-1) / 5.0
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-12)


def test_adpa_is_the_token_mean_of_the_rejected_columns_term():
    mask, divergence, logps, ref_logps = pair_inputs(2)
    inputs = as_inputs(mask, divergence, logps, ref_logps)
    losses, metrics = adpa_loss(inputs, ADPAOptions())
    (grad,) = torch.autograd.grad(losses.mean(), inputs.token_divergence)
    expected = (divergence * mask)[:, 1].sum(-1) / mask[:, 1].sum(-1).mean()
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(metrics["distill/advantage"].numpy(), -expected, rtol=1e-12)
    assert (grad[:, 0] == 0).all()  # the chosen column carries no ADPA loss


def np_log_softmax(x):
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_expected_advantage(student_logits, teacher_logits, reference_logits, temperature):
    """-sum_a pi_S(a) (log pi_T(a) - log pi_ref(a)) (arXiv 2502.17927, ADPA's per-token loss)."""
    p = np.exp(np_log_softmax(student_logits / temperature))
    advantage = np_log_softmax(teacher_logits / temperature) - np_log_softmax(reference_logits / temperature)
    return -(p * advantage).sum(-1)


def test_expected_advantage_equals_numpy_values_and_gradients():
    g = np.random.default_rng(3)
    student, teacher, reference = (g.normal(size=(5, 7)) * 2 for _ in range(3))
    logits = torch.tensor(student, requires_grad=True)
    ours = expected_advantage(torch.log_softmax(logits / 0.9, -1), torch.log_softmax(torch.tensor(teacher) / 0.9, -1),
                              torch.log_softmax(torch.tensor(reference) / 0.9, -1))
    weights = g.uniform(0.5, 1.5, size=5)
    (grad,) = torch.autograd.grad((ours * torch.tensor(weights)).sum(), logits)
    np.testing.assert_allclose(ours.detach().numpy(), np_expected_advantage(student, teacher, reference, 0.9),
                               rtol=1e-12)
    step, numeric = 1e-6, np.zeros_like(student)
    for index in np.ndindex(*student.shape):
        bump = np.zeros_like(student)
        bump[index] = step
        up = (np_expected_advantage(student + bump, teacher, reference, 0.9) * weights).sum()
        down = (np_expected_advantage(student - bump, teacher, reference, 0.9) * weights).sum()
        numeric[index] = (up - down) / (2 * step)
    np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-6, atol=1e-8)


def test_chunked_expected_advantage_equals_unchunked_and_vanishes_without_an_advantage():
    g = torch.Generator().manual_seed(4)
    n, h, v = 9, 5, 11
    student = [t.double().requires_grad_() for t in (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g),
                                                     torch.randn(v, generator=g))]
    teacher = DenseTeacher(torch.randn(n, 8, generator=g).double(), torch.randn(v, 8, generator=g).double())
    reference = DenseTeacher(torch.randn(n, 8, generator=g).double(), torch.randn(v, 8, generator=g).double())
    chunked = chunked_divergence(*student, AdvantageTeacher(teacher, reference), DistillSettings(1.0, 1.2, 4))
    grads = torch.autograd.grad(chunked.sum(), student)
    logps = lambda hidden, weight, bias=0: torch.log_softmax((hidden @ weight.T + bias) / 1.2, -1)  # noqa: E731
    plain = expected_advantage(logps(*student), logps(teacher.hidden, teacher.head_weight),
                               logps(reference.hidden, reference.head_weight))
    plain_grads = torch.autograd.grad(plain.sum(), student)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
    for mine, expected in zip(grads, plain_grads):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12)
    same = chunked_divergence(*student, AdvantageTeacher(teacher, teacher), DistillSettings(1.0, 1.2, 4))
    assert float(same.detach().abs().max()) == 0.0

"""Distillation losses (losses/divergence.py, losses/distill.py): the chunked generalized JSD against TRL 1.16's
generalized_jsd_loss and a NumPy transcription of GKD's formula (values and gradients), chunked against unchunked,
top-k with k = vocabulary against the full vocabulary, the on-policy distillation advantage and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import build_options, get_loss
from alignkit.losses.base import LossInputs
from alignkit.losses.distill import GKDOptions, OPDOptions, distill_advantages, gkd_loss, opd_loss
from alignkit.losses.divergence import (
    DenseTeacher,
    DistillSettings,
    TopKTeacher,
    chunked_divergence,
    generalized_jsd,
    teacher_topk,
)
from conftest import import_trl

N, H, H_TEACHER, V = 11, 6, 9, 17
BETAS, TEMPERATURES = (0.0, 0.5, 1.0), (1.0, 0.7)


def heads(seed: int = 0, dtype=torch.float32):
    """Student (hidden, weight, bias) with gradients and a wider teacher's (hidden, weight, bias) over N tokens."""
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g)]
    teacher = [torch.randn(N, H_TEACHER, generator=g), torch.randn(V, H_TEACHER, generator=g) * 0.5,
               torch.randn(V, generator=g)]
    return [t.to(dtype).requires_grad_() for t in student], DenseTeacher(*[t.to(dtype) for t in teacher])


def upstream(dtype=torch.float32):
    return torch.rand(N, generator=torch.Generator().manual_seed(7)).to(dtype) + 0.5


def np_log_softmax(x):
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_jsd(student_logits, teacher_logits, beta, temperature):
    """GKD eq. 1 per token: b KL(p_T || M) + (1 - b) KL(p_S || M), M = b p_T + (1 - b) p_S; b = 0 forward KL(p_T ||
    p_S), b = 1 reverse KL(p_S || p_T) (the end points TRL and the GKD paper's ablations use)."""
    s, t = np.exp(np_log_softmax(student_logits / temperature)), np.exp(np_log_softmax(teacher_logits / temperature))
    kl = lambda p, q: (p * (np.log(p) - np.log(q))).sum(-1)  # noqa: E731
    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    m = beta * t + (1 - beta) * s
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_chunked_jsd_equals_trl_generalized_jsd_loss(beta, temperature):
    gkd = import_trl("trl.experimental.gkd.gkd_trainer")
    student, teacher = heads()
    settings = DistillSettings(beta, temperature, chunk_size=4)
    ours = chunked_divergence(*student, teacher, settings)
    ours_grads = torch.autograd.grad((ours * upstream()).sum(), student)

    student_logits = (student[0] @ student[1].T + student[2])[None]
    teacher_logits = (teacher.hidden @ teacher.head_weight.T + teacher.head_bias)[None]
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=beta, temperature=temperature,
                                                 reduction="none").sum(-1)[0]
    their_grads = torch.autograd.grad((theirs * upstream()).sum(), student)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for mine, trl_grad in zip(ours_grads, their_grads):
        torch.testing.assert_close(mine, trl_grad, rtol=1e-5, atol=1e-5)
    assert settings.chunk_size < N  # several chunks were walked


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", (*BETAS, 0.2))
def test_jsd_values_and_gradients_equal_numpy(beta, temperature):
    g = np.random.default_rng(1)
    student_logits, teacher_logits = g.normal(size=(N, V)) * 2, g.normal(size=(N, V)) * 2
    weights = g.uniform(0.5, 1.5, size=N)
    logits = torch.tensor(student_logits, requires_grad=True)
    ours = generalized_jsd(torch.log_softmax(logits / temperature, -1),
                           torch.log_softmax(torch.tensor(teacher_logits) / temperature, -1), beta)
    (grad,) = torch.autograd.grad((ours * torch.tensor(weights)).sum(), logits)
    np.testing.assert_allclose(ours.detach().numpy(), np_jsd(student_logits, teacher_logits, beta, temperature),
                               rtol=1e-10, atol=1e-12)
    # the gradient of the NumPy formula by central differences
    step, numeric = 1e-6, np.zeros_like(student_logits)
    for index in np.ndindex(*student_logits.shape):
        bump = np.zeros_like(student_logits)
        bump[index] = step
        up = (np_jsd(student_logits + bump, teacher_logits, beta, temperature) * weights).sum()
        down = (np_jsd(student_logits - bump, teacher_logits, beta, temperature) * weights).sum()
        numeric[index] = (up - down) / (2 * step)
    np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-6, atol=1e-8)


def test_divergence_limits():
    """0 where the student is the teacher; >= 0 otherwise; beta = 0 / 1 are the forward / reverse KLs."""
    logps = torch.log_softmax(torch.randn(N, V, generator=torch.Generator().manual_seed(3)), -1)
    other = torch.log_softmax(torch.randn(N, V, generator=torch.Generator().manual_seed(4)), -1)
    for beta in (0.0, 0.3, 1.0):
        torch.testing.assert_close(generalized_jsd(logps, logps, beta), torch.zeros(N))
        assert (generalized_jsd(logps, other, beta) > 0).all()
    forward = (other.exp() * (other - logps)).sum(-1)
    torch.testing.assert_close(generalized_jsd(logps, other, 0.0), forward)
    torch.testing.assert_close(generalized_jsd(other, logps, 1.0), forward)


@pytest.mark.parametrize("beta", BETAS)
def test_chunked_equals_unchunked_in_float64(beta):
    student, teacher = heads(2, torch.float64)
    results = []
    for chunk_size in (3, N):
        out = chunked_divergence(*student, teacher, DistillSettings(beta, 0.8, chunk_size))
        results.append((out, torch.autograd.grad((out * upstream(torch.float64)).sum(), student)))
    plain = generalized_jsd(torch.log_softmax((student[0] @ student[1].T + student[2]) / 0.8, -1),
                            torch.log_softmax((teacher.hidden @ teacher.head_weight.T + teacher.head_bias) / 0.8, -1),
                            beta)
    plain_grads = torch.autograd.grad((plain * upstream(torch.float64)).sum(), student)
    for out, grads in results:
        torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
        for mine, reference in zip(grads, plain_grads):
            torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tail", (True, False))
@pytest.mark.parametrize("beta", BETAS)
def test_topk_with_k_the_vocabulary_equals_the_full_vocabulary(beta, tail):
    student, teacher = heads(5, torch.float64)
    settings = DistillSettings(beta, 1.3, chunk_size=4)
    full = chunked_divergence(*student, teacher, settings)
    full_grads = torch.autograd.grad((full * upstream(torch.float64)).sum(), student)
    top = teacher_topk(teacher, V, 1.3, chunk_size=5)
    sparse = chunked_divergence(*student, TopKTeacher(top.logps.double(), top.token_ids, tail), settings)
    sparse_grads = torch.autograd.grad((sparse * upstream(torch.float64)).sum(), student)
    # the tail bucket of a complete top-k holds TRL's floor of 1e-7 for both models: a difference of that order
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-5)
    for mine, reference in zip(sparse_grads, full_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def test_topk_with_tail_equals_numpy():
    """k < V: both models' probabilities of the teacher's k tokens plus 1 - their sum, then the JSD on k + 1."""
    student, teacher = heads(6, torch.float64)
    k, beta, temperature = 4, 0.5, 0.9
    top = teacher_topk(teacher, k, temperature)
    ours = chunked_divergence(*student, top, DistillSettings(beta, temperature, 5)).detach().numpy()
    s = np.exp(np_log_softmax((student[0] @ student[1].T + student[2]).detach().numpy() / temperature))
    t = np.exp(np_log_softmax((teacher.hidden @ teacher.head_weight.T + teacher.head_bias).numpy() / temperature))
    ids = np.argsort(-t, axis=1)[:, :k]
    np.testing.assert_array_equal(np.sort(top.token_ids.numpy(), 1), np.sort(ids, 1))
    pick = lambda p: np.concatenate([np.take_along_axis(p, ids, 1), 1 - np.take_along_axis(p, ids, 1).sum(1, keepdims=True)], 1)  # noqa: E731,E501
    s_k, t_k = pick(s), pick(t)
    m = beta * t_k + (1 - beta) * s_k
    expected = (beta * (t_k * np.log(t_k / m)).sum(1) + (1 - beta) * (s_k * np.log(s_k / m)).sum(1))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)


def test_settings_and_options_refuse_bad_values():
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta must be in"):
            DistillSettings(beta)
        with pytest.raises(ConfigError, match="loss_options.beta"):
            build_options(get_loss("gkd"), {"beta": beta})
    with pytest.raises(ConfigError, match="loss_options.beta"):
        build_options(get_loss("gkd"), {"beta": float("nan")})
    with pytest.raises(ConfigError, match="loss_options.temperature"):
        GKDOptions(temperature=0.0)
    with pytest.raises(ValueError, match="top-k"):
        teacher_topk(heads()[1], V + 1)


def rollout_inputs(seed: int = 0):
    """[B=3, k=2, T=5] student and teacher log-probs of sampled tokens, a ragged mask, task rewards."""
    g = torch.Generator().manual_seed(seed)
    student = -torch.rand(3, 2, 5, generator=g) * 3
    teacher = -torch.rand(3, 2, 5, generator=g) * 3
    mask = torch.arange(5)[None, None] < torch.tensor([[5, 3], [2, 4], [1, 5]])[..., None]
    rewards = torch.rand(3, 2, generator=g)
    return student, teacher, mask, rewards


def test_opd_advantage_is_the_per_token_log_ratio():
    student, teacher, _, _ = rollout_inputs()
    torch.testing.assert_close(distill_advantages(student, teacher), teacher - student)
    torch.testing.assert_close(distill_advantages(student, teacher, 0.5), 0.5 * (teacher - student))


@pytest.mark.parametrize("task_reward_coef", (0.0, 0.7))
def test_opd_loss_equals_numpy(task_reward_coef):
    """One update per rollout (ratio 1): loss = -sum_t A_t / tokens, d loss / d log pi_t = -A_t / tokens, A_t =
    -c (log pi_S - log pi_T) + w (r_i - mean r) / (std r + 1e-4), token-mean over the batch's tokens (1 example per
    row of the mean: the learner's mean over examples)."""
    student, teacher, mask, rewards = rollout_inputs(1)
    logps = student.clone().requires_grad_()
    inputs = LossInputs(logps=logps.sum(-1), lengths=mask.sum(-1).float(), token_logps=logps, token_mask=mask,
                        rewards=rewards, teacher_token_logps=teacher)
    opts = OPDOptions(distill_coef=0.8, task_reward_coef=task_reward_coef)
    losses, metrics = opd_loss(inputs, opts)
    (grad,) = torch.autograd.grad(losses.mean(), logps)

    s, t, m, r = student.numpy(), teacher.numpy(), mask.numpy(), rewards.numpy()
    task = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    advantages = (-0.8 * (s - t) + task_reward_coef * task[..., None]) * m
    tokens_per_example = m.sum() / m.shape[0]
    np.testing.assert_allclose(losses.detach().numpy(), -advantages.sum((1, 2)) / tokens_per_example, rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), -advantages / m.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["distill/reverse_kl"].numpy(), ((s - t) * m).sum((1, 2)) / m.sum((1, 2)),
                               rtol=1e-5)


def test_opd_loss_needs_the_teacher():
    student, _, mask, rewards = rollout_inputs()
    inputs = LossInputs(logps=student.sum(-1), lengths=mask.sum(-1).float(), token_logps=student, token_mask=mask,
                        rewards=rewards)
    with pytest.raises(ValueError, match="teacher"):
        opd_loss(inputs, OPDOptions())


def test_gkd_loss_is_the_token_mean_of_the_divergence():
    _, _, mask, _ = rollout_inputs()
    divergence = torch.rand(3, 2, 5, generator=torch.Generator().manual_seed(9)) * mask
    inputs = LossInputs(logps=torch.zeros(3, 2), lengths=mask.sum(-1).float(), token_mask=mask,
                        token_divergence=divergence)
    losses, metrics = gkd_loss(inputs, GKDOptions())
    torch.testing.assert_close(losses.mean(), divergence.sum() / mask.sum())
    torch.testing.assert_close(metrics["distill/divergence"], divergence.sum((1, 2)) / mask.sum((1, 2)))
    with pytest.raises(ValueError, match="teacher"):
        gkd_loss(LossInputs(logps=torch.zeros(3, 2), lengths=mask.sum(-1).float(), token_mask=mask), GKDOptions())

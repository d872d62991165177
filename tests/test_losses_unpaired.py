"""Unpaired losses (unpaired.py): KTO and BCO on (completion, label) examples."""

from __future__ import annotations

import collections
import math
import types

import numpy as np
import pytest
import torch

from alignkit.losses import unpaired as up
from alignkit.losses.base import LossInputs, RunningMean
from conftest import import_trl

B, T = 8, 10


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_batch(seed: int = 0):
    """Summed log-probs [B] of the completions and of mismatched completions, with a mix of labels (float64)."""
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(5.0, 40.0, size=B)
    ref_logps = logps + rng.normal(0.0, 5.0, size=B)
    kl_logps = -rng.uniform(10.0, 60.0, size=B)
    ref_kl_logps = kl_logps - rng.normal(2.0, 1.0, size=B)  # kl - ref_kl is about +2: a positive z0
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=np.float64)
    return logps, ref_logps, kl_logps, ref_kl_logps, labels


def as_inputs(logps, ref_logps, kl_logps=None, ref_kl_logps=None, labels=None, requires_grad=False) -> LossInputs:
    return LossInputs(
        logps=torch.tensor(logps[:, None], requires_grad=requires_grad),
        lengths=torch.full((len(logps), 1), 10.0, dtype=torch.float64),
        ref_logps=torch.tensor(ref_logps[:, None]),
        kl_logps=None if kl_logps is None else torch.tensor(kl_logps),
        ref_kl_logps=None if ref_kl_logps is None else torch.tensor(ref_kl_logps),
        labels=None if labels is None else torch.tensor(labels),
    )


# ---- NumPy references ----


def np_kto(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta, desirable_weight, undesirable_weight):
    z0 = max(0.0, float(np.mean(kl_logps - ref_kl_logps)))
    r = logps - ref_logps
    desirable = desirable_weight * (1 - np_sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - np_sigmoid(beta * (z0 - r)))
    return np.where(labels == 1, desirable, undesirable)


def np_bco(logps, ref_logps, labels, beta, prior_mean, prior_count):
    rewards = beta * (logps - ref_logps)
    delta = (prior_mean * prior_count + rewards.sum()) / (prior_count + len(rewards))
    return np.where(labels == 1, -np_logsigmoid(rewards - delta), -np_logsigmoid(-(rewards - delta)))


def test_kto_value_matches_numpy_formula():
    logps, ref_logps, kl_logps, ref_kl_logps, labels = make_batch(seed=1)
    opts = up.KTOOptions(beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    losses, metrics = up.kto_loss(as_inputs(logps, ref_logps, kl_logps, ref_kl_logps, labels), opts)
    expected = np_kto(logps, ref_logps, kl_logps, ref_kl_logps, labels, 0.2, 1.3, 0.8)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-12)
    assert metrics["kto/kl"][0] > 0
    assert all(m.shape == (B,) and not m.requires_grad and torch.isfinite(m).all() for m in metrics.values())


def test_kto_reference_point_is_clamped_at_zero():
    logps, ref_logps, kl_logps, _, labels = make_batch(seed=1)
    ref_kl_logps = kl_logps + 5.0  # the estimated KL is negative
    opts = up.KTOOptions(beta=0.2)
    with_kl = up.kto_loss(as_inputs(logps, ref_logps, kl_logps, ref_kl_logps, labels), opts)[0]
    without = up.kto_loss(as_inputs(logps, ref_logps, labels=labels), up.KTOOptions(beta=0.2, use_kl_estimate=False))[0]
    torch.testing.assert_close(with_kl, without)


def test_bco_value_matches_numpy_formula():
    logps, ref_logps, _, _, labels = make_batch(seed=2)
    inputs = as_inputs(logps, ref_logps, labels=labels)
    inputs.loss_state = RunningMean(mean=0.3, count=20)
    losses, metrics = up.bco_loss(inputs, up.BCOOptions(beta=0.2))
    np.testing.assert_allclose(losses.numpy(), np_bco(logps, ref_logps, labels, 0.2, 0.3, 20), rtol=1e-12)
    assert all(m.shape == (B,) and not m.requires_grad for m in metrics.values())


def test_kto_gradient_matches_finite_differences():
    logps, ref_logps, kl_logps, ref_kl_logps, labels = make_batch(seed=3)
    opts = up.KTOOptions(beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    fixed = as_inputs(logps, ref_logps, kl_logps, ref_kl_logps, labels)

    def per_example(policy_logps):
        return up.kto_loss(LossInputs(**{**vars(fixed), "logps": policy_logps}), opts)[0]

    assert torch.autograd.gradcheck(per_example, (torch.tensor(logps[:, None], requires_grad=True),), fast_mode=True)


def test_kto_reference_point_carries_no_gradient():
    logps, ref_logps, kl_logps, ref_kl_logps, labels = make_batch(seed=3)
    inputs = as_inputs(logps, ref_logps, kl_logps, ref_kl_logps, labels, requires_grad=True)
    inputs.kl_logps = inputs.kl_logps.clone().requires_grad_()
    up.kto_loss(inputs, up.KTOOptions())[0].sum().backward()
    assert inputs.kl_logps.grad is None or not inputs.kl_logps.grad.any()


def test_bco_gradient_treats_the_shift_as_a_constant():
    logps, ref_logps, _, _, labels = make_batch(seed=4)
    inputs = as_inputs(logps, ref_logps, labels=labels, requires_grad=True)
    up.bco_loss(inputs, up.BCOOptions(beta=0.2))[0].sum().backward()

    naive_logps = torch.tensor(logps, requires_grad=True)
    rewards = 0.2 * (naive_logps - torch.tensor(ref_logps))
    shifted = rewards - rewards.mean().detach()
    desirable = torch.tensor(labels) == 1
    logsigmoid = torch.nn.functional.logsigmoid
    torch.where(desirable, -logsigmoid(shifted), -logsigmoid(-shifted)).sum().backward()
    torch.testing.assert_close(inputs.logps.grad[:, 0], naive_logps.grad)


# ---- limits and identities ----


def test_kto_at_the_reference_point_costs_half_the_weight():
    logps = np.full(B, -20.0)
    labels = np.array([1, 0] * (B // 2), dtype=np.float64)
    opts = up.KTOOptions(desirable_weight=2.0, undesirable_weight=0.6, use_kl_estimate=False)
    losses = up.kto_loss(as_inputs(logps, logps.copy(), labels=labels), opts)[0]
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.3] * (B // 2), dtype=torch.float64))


def test_kto_needs_the_kl_inputs_unless_told_otherwise():
    logps, ref_logps, _, _, labels = make_batch(seed=5)
    with pytest.raises(ValueError, match="kl_logps"):
        up.kto_loss(as_inputs(logps, ref_logps, labels=labels), up.KTOOptions())
    with pytest.raises(ValueError, match="labels"):
        up.kto_loss(as_inputs(logps, ref_logps), up.KTOOptions(use_kl_estimate=False))


def test_bco_with_equal_rewards_costs_log_two():
    logps = np.full(B, -20.0)
    labels = np.array([1, 0] * (B // 2), dtype=np.float64)
    losses = up.bco_loss(as_inputs(logps, logps - 3.0, labels=labels), up.BCOOptions())[0]
    torch.testing.assert_close(losses, torch.full((B,), math.log(2), dtype=torch.float64))


def test_bco_shift_is_the_running_mean_of_every_reward():
    state, seen = RunningMean(), []
    for seed in (6, 7, 8):
        logps, ref_logps, _, _, labels = make_batch(seed=seed)
        seen.extend(0.2 * (logps - ref_logps))
        inputs = as_inputs(logps, ref_logps, labels=labels)
        inputs.loss_state = state
        _, metrics = up.bco_loss(inputs, up.BCOOptions(beta=0.2))
        state = RunningMean.from_metrics(metrics)
        assert state.mean == pytest.approx(np.mean(seen), rel=1e-12)
        assert state.count == len(seen)


# ---- equality with TRL 1.16 (KTOTrainer._compute_loss on the same per-token log-probs) ----


def trl_kto_loss(token_logps, token_mask, ref_logps, kl_logps, ref_kl_logps, labels, beta, desirable, undesirable):
    """TRL's own KTOTrainer._compute_loss with a stand-in model that returns the given per-token log-probs.

    Rows are one prompt token then T completion positions; reference and KL log-probs come precomputed.
    """
    trl_kto = import_trl("trl.trainer.kto_trainer")
    rows = token_logps.shape[0]
    per_token_logps = token_logps * token_mask
    zeros = torch.zeros_like(per_token_logps)
    outputs = types.SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros)
    completion_mask = torch.cat([torch.zeros(rows, 1), token_mask], dim=1).long()
    batch = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "label": labels.bool(),
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    same = lambda value: value  # noqa: E731 - single process: gathers are the identity
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable,
        undesirable_weight=undesirable,
        _compute_kl_logps=lambda model, batch: kl_logps,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    return trl_kto.KTOTrainer._compute_loss(trainer, lambda **kwargs: outputs, batch, return_outputs=False)


def test_kto_value_and_gradient_match_trl():
    rng = np.random.default_rng(9)
    token_logps = -rng.uniform(0.05, 3.0, size=(B, T))
    mask = (np.arange(T)[None, :] < rng.integers(3, T + 1, size=(B, 1))).astype(np.float64)
    logps = (token_logps * mask).sum(-1)
    _, ref_logps, kl_logps, ref_kl_logps, labels = make_batch(seed=9)
    ref_logps = logps + rng.normal(0.0, 5.0, size=B)
    tensors = {k: torch.tensor(v) for k, v in dict(ref=ref_logps, kl=kl_logps, ref_kl=ref_kl_logps, labels=labels).items()}

    trl_leaf = torch.tensor(token_logps, requires_grad=True)
    trl_loss = trl_kto_loss(trl_leaf, torch.tensor(mask), tensors["ref"], tensors["kl"], tensors["ref_kl"],
                            tensors["labels"], beta=0.2, desirable=1.3, undesirable=0.8)
    trl_loss.backward()

    our_leaf = torch.tensor(token_logps, requires_grad=True)
    inputs = LossInputs(
        logps=(our_leaf * torch.tensor(mask)).sum(-1, keepdim=True),
        lengths=torch.tensor(mask).sum(-1, keepdim=True),
        ref_logps=tensors["ref"][:, None],
        kl_logps=tensors["kl"],
        ref_kl_logps=tensors["ref_kl"],
        labels=tensors["labels"],
    )
    our_loss = up.kto_loss(inputs, up.KTOOptions(beta=0.2, desirable_weight=1.3, undesirable_weight=0.8))[0].mean()
    our_loss.backward()

    torch.testing.assert_close(our_loss, trl_loss.double(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_leaf.grad, trl_leaf.grad, rtol=1e-10, atol=1e-12)

"""Pairwise losses with a reference (pairwise.py): NumPy values, gradients, limits, and TRL 1.16's DPOTrainer."""

from __future__ import annotations

import collections
import math
import types

import numpy as np
import pytest
import torch

from alignkit.losses import build_options, get_loss
from alignkit.losses import pairwise as pw
from alignkit.losses.base import LossInputs, RunningMean
from alignkit.losses.dpo import DPOOptions, dpo_loss
from conftest import import_trl

B, T = 8, 12


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_batch(seed: int = 0, batch: int = B, tokens: int = T):
    """Per-token log-probs [B, 2, T] with ragged masks, and reference sums [B, 2], in float64."""
    rng = np.random.default_rng(seed)
    token_logps = -rng.uniform(0.05, 3.0, size=(batch, 2, tokens))
    lengths = rng.integers(3, tokens + 1, size=(batch, 2))
    mask = (np.arange(tokens)[None, None, :] < lengths[..., None]).astype(np.float64)
    logps = (token_logps * mask).sum(-1)
    # reference sums near the policy's, so beta * h lands where the losses are not saturated
    ref_logps = np.minimum(logps + rng.normal(0.0, 4.0, size=(batch, 2)), -0.5)
    return token_logps, mask, logps, ref_logps, lengths.astype(np.float64)


def as_inputs(logps, ref_logps, lengths, requires_grad: bool = False) -> LossInputs:
    logps_t = torch.tensor(logps, dtype=torch.float64, requires_grad=requires_grad)
    return LossInputs(logps=logps_t, lengths=torch.tensor(lengths), ref_logps=torch.tensor(ref_logps))


# ---- NumPy references of the paper formulas (never call the torch code) ----


def np_parts(logps, ref_logps, lengths):
    lw, ll = logps[:, 0], logps[:, 1]
    rw, rl = lw - ref_logps[:, 0], ll - ref_logps[:, 1]
    return lw, ll, rw, rl, lengths[:, 0], lengths[:, 1]


def np_robust(logps, ref, lengths, beta, eps):
    _, _, rw, rl, _, _ = np_parts(logps, ref, lengths)
    z = beta * (rw - rl)
    return ((1 - eps) * -np_logsigmoid(z) - eps * -np_logsigmoid(-z)) / (1 - 2 * eps)


def np_ipo(logps, ref, lengths, tau, normalize):
    _, _, rw, rl, nw, nl = np_parts(logps, ref, lengths)
    h = rw / nw - rl / nl if normalize else rw - rl
    return (h - 1 / (2 * tau)) ** 2


def np_hinge(logps, ref, lengths, beta):
    _, _, rw, rl, _, _ = np_parts(logps, ref, lengths)
    return np.maximum(0.0, 1 - beta * (rw - rl))


def np_slic(logps, ref, lengths, margin, lam):
    lw, ll, _, _, _, _ = np_parts(logps, ref, lengths)
    return np.maximum(0.0, margin - lw + ll) + lam * -lw


def np_nca(logps, ref, lengths, beta):
    _, _, rw, rl, _, _ = np_parts(logps, ref, lengths)
    return -np_logsigmoid(beta * rw) - 0.5 * np_logsigmoid(-beta * rw) - 0.5 * np_logsigmoid(-beta * rl)


def np_exo(logps, ref, lengths, beta, eps):
    _, _, rw, rl, _, _ = np_parts(logps, ref, lengths)
    # q = softmax over {w, l} of beta * r, p = (1 - eps, eps); KL(q || p)
    scaled = np.stack([beta * rw, beta * rl], axis=1)
    q = np.exp(scaled - scaled.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    p = np.array([1 - eps, eps])
    return (q * (np.log(q) - np.log(p))).sum(1)


def np_dpop(logps, ref, lengths, beta, lam):
    _, _, rw, rl, _, _ = np_parts(logps, ref, lengths)
    return -np_logsigmoid(beta * (rw - rl - lam * np.maximum(0.0, -rw)))


def np_rdpo(logps, ref, lengths, beta, alpha):
    _, _, rw, rl, nw, nl = np_parts(logps, ref, lengths)
    return -np_logsigmoid(beta * (rw - rl) + alpha * (nw - nl))


def np_bco_pair(logps, ref, lengths, beta, prior_mean, prior_count):
    _, _, rw, rl, _, _ = np_parts(logps, ref, lengths)
    batch_mean = np.concatenate([beta * rw, beta * rl]).mean()
    delta = (prior_mean * prior_count + batch_mean) / (prior_count + 1)
    return -np_logsigmoid(beta * rw - delta) - np_logsigmoid(-(beta * rl - delta))


def np_rpo(logps, ref, lengths, beta, alpha, token_mean):
    lw, _, rw, rl, nw, _ = np_parts(logps, ref, lengths)
    nll = np.full(len(lw), -lw.sum() / nw.sum()) if token_mean else -lw / nw  # token-mean: a batch quantity
    return -np_logsigmoid(beta * (rw - rl)) + alpha * nll


CASES = {
    "robust_dpo": (pw.robust_dpo_loss, pw.RobustDPOOptions(beta=0.3, label_smoothing=0.2), lambda *a: np_robust(*a, 0.3, 0.2)),
    "ipo": (pw.ipo_loss, pw.IPOOptions(beta=0.5), lambda *a: np_ipo(*a, 0.5, False)),
    "ipo_normalized": (pw.ipo_loss, pw.IPOOptions(beta=0.5, length_normalize=True), lambda *a: np_ipo(*a, 0.5, True)),
    "hinge": (pw.hinge_loss, pw.HingeOptions(beta=0.1), lambda *a: np_hinge(*a, 0.1)),
    "slic": (pw.slic_loss, pw.SLiCOptions(margin=3.0, nll_weight=0.1), lambda *a: np_slic(*a, 3.0, 0.1)),
    "nca_pair": (pw.nca_pair_loss, pw.NCAOptions(beta=0.3), lambda *a: np_nca(*a, 0.3)),
    "exo_pair": (pw.exo_pair_loss, pw.EXOOptions(beta=0.3, label_smoothing=0.01), lambda *a: np_exo(*a, 0.3, 0.01)),
    "dpop": (pw.dpop_loss, pw.DPOPOptions(beta=0.3, dpop_lambda=2.0), lambda *a: np_dpop(*a, 0.3, 2.0)),
    "rdpo": (pw.rdpo_loss, pw.RDPOOptions(beta=0.3, alpha=0.05), lambda *a: np_rdpo(*a, 0.3, 0.05)),
    "bco_pair": (pw.bco_pair_loss, pw.BCOPairOptions(beta=0.3), lambda *a: np_bco_pair(*a, 0.3, 0.0, 0.0)),
    "rpo": (pw.rpo_loss, pw.RPOOptions(beta=0.3, nll_weight=0.5), lambda *a: np_rpo(*a, 0.3, 0.5, False)),
    "rpo_token_mean": (
        pw.rpo_loss,
        pw.RPOOptions(beta=0.3, nll_weight=0.5, nll_token_mean=True),
        lambda *a: np_rpo(*a, 0.3, 0.5, True),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_matches_numpy_formula(case):
    fn, opts, reference = CASES[case]
    _, _, logps, ref_logps, lengths = make_batch(seed=1)
    losses, metrics = fn(as_inputs(logps, ref_logps, lengths), opts)
    expected = reference(logps, ref_logps, lengths)
    np.testing.assert_allclose(losses.mean().item(), expected.mean(), rtol=1e-10)
    if case != "rpo_token_mean":  # a token-mean NLL is a batch quantity: only the batch mean is defined
        np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert losses.shape == (B,)
    assert all(m.shape == (B,) and not m.requires_grad for m in metrics.values())


def test_inputs_exercise_both_branches_of_the_kinked_losses():
    _, _, logps, ref_logps, lengths = make_batch(seed=1)
    chosen_logratio = logps[:, 0] - ref_logps[:, 0]
    assert (chosen_logratio > 0).any() and (chosen_logratio < 0).any()  # DPOP's penalty on and off
    hinge = np_hinge(logps, ref_logps, lengths, 0.1)
    assert (hinge > 0).any() and (hinge == 0).any()
    calibration = 3.0 - logps[:, 0] + logps[:, 1]
    assert (calibration > 0).any() and (calibration < 0).any()


@pytest.mark.parametrize("case", sorted(set(CASES) - {"bco_pair"}))
def test_gradient_matches_finite_differences(case):
    fn, opts, _ = CASES[case]
    _, _, logps, ref_logps, lengths = make_batch(seed=2)
    ref_t, lengths_t = torch.tensor(ref_logps), torch.tensor(lengths)

    def per_example(policy_logps):
        return fn(LossInputs(logps=policy_logps, lengths=lengths_t, ref_logps=ref_t), opts)[0]

    assert torch.autograd.gradcheck(per_example, (torch.tensor(logps, requires_grad=True),), fast_mode=True)


def test_bco_pair_gradient_treats_the_shift_as_a_constant():
    _, _, logps, ref_logps, lengths = make_batch(seed=3)
    opts = pw.BCOPairOptions(beta=0.3)
    state = RunningMean(mean=0.4, count=5)
    inputs = as_inputs(logps, ref_logps, lengths, requires_grad=True)
    inputs.loss_state = state
    pw.bco_pair_loss(inputs, opts)[0].sum().backward()

    naive_logps = torch.tensor(logps, requires_grad=True)
    rewards = 0.3 * (naive_logps - torch.tensor(ref_logps))
    delta = ((0.4 * 5 + rewards.mean()) / 6).detach()
    naive = -torch.nn.functional.logsigmoid(rewards[:, 0] - delta) - torch.nn.functional.logsigmoid(delta - rewards[:, 1])
    naive.sum().backward()
    torch.testing.assert_close(inputs.logps.grad, naive_logps.grad)


# ---- limits and identities ----


def equal_inputs(value: float = -20.0) -> LossInputs:
    logps = torch.full((B, 2), value, dtype=torch.float64)
    return LossInputs(logps=logps, lengths=torch.full((B, 2), 7.0), ref_logps=logps.clone())


def test_equal_logps_give_the_known_constants():
    log2 = math.log(2)
    inputs = equal_inputs()
    expected = {
        "robust_dpo": log2,  # both label hypotheses cost log 2, whatever the flip rate
        "ipo": 1 / (4 * 0.5**2),
        "ipo_normalized": 1 / (4 * 0.5**2),
        "hinge": 1.0,
        "nca_pair": 2 * log2,
        "exo_pair": 0.5 * math.log(0.5 / 0.99) + 0.5 * math.log(0.5 / 0.01),
        "dpop": log2,
        "rdpo": log2,  # equal lengths
        "bco_pair": 2 * log2,  # rewards 0, so the shift is 0 too
    }
    for case, value in expected.items():
        fn, opts, _ = CASES[case]
        torch.testing.assert_close(fn(inputs, opts)[0], torch.full((B,), value, dtype=torch.float64), msg=case)


@pytest.mark.parametrize(
    "case, opts",
    [
        ("robust_dpo", pw.RobustDPOOptions(beta=0.3, label_smoothing=0.0)),
        ("dpop", pw.DPOPOptions(beta=0.3, dpop_lambda=0.0)),
        ("rdpo", pw.RDPOOptions(beta=0.3, alpha=0.0)),
        ("rpo", pw.RPOOptions(beta=0.3, nll_weight=0.0)),
    ],
)
def test_zero_extra_parameter_reduces_to_dpo(case, opts):
    _, _, logps, ref_logps, lengths = make_batch(seed=4)
    inputs = as_inputs(logps, ref_logps, lengths)
    torch.testing.assert_close(CASES[case][0](inputs, opts)[0], dpo_loss(inputs, DPOOptions(beta=0.3))[0])


def test_dpop_equals_dpo_while_the_chosen_logratio_is_positive():
    _, _, logps, ref_logps, lengths = make_batch(seed=4)
    ref_logps[:, 0] = logps[:, 0] - 1.0  # r_w = 1 > 0 everywhere
    inputs = as_inputs(logps, ref_logps, lengths)
    torch.testing.assert_close(pw.dpop_loss(inputs, pw.DPOPOptions(beta=0.3))[0], dpo_loss(inputs, DPOOptions(beta=0.3))[0])


def test_ipo_is_zero_at_the_target_margin():
    inputs = equal_inputs()
    inputs.ref_logps = inputs.ref_logps.clone()
    inputs.ref_logps[:, 0] -= 1 / (2 * 0.5)  # h = 1 / (2 tau)
    torch.testing.assert_close(pw.ipo_loss(inputs, pw.IPOOptions(beta=0.5))[0], torch.zeros(B, dtype=torch.float64))


def test_exo_is_zero_where_the_model_matches_the_target():
    eps, beta = 0.01, 0.3
    inputs = equal_inputs()
    inputs.ref_logps = inputs.ref_logps.clone()
    inputs.ref_logps[:, 0] -= math.log((1 - eps) / eps) / beta  # softmax(b r) = (1 - eps, eps)
    losses = pw.exo_pair_loss(inputs, pw.EXOOptions(beta=beta, label_smoothing=eps))[0]
    torch.testing.assert_close(losses, torch.zeros(B, dtype=torch.float64))


def test_slic_leaves_only_the_nll_once_the_margin_is_met():
    inputs = equal_inputs()
    inputs.logps = inputs.logps.clone()
    inputs.logps[:, 1] -= 5.0  # chosen beats rejected by 5 > margin 1
    losses = pw.slic_loss(inputs, pw.SLiCOptions())[0]
    torch.testing.assert_close(losses, 0.1 * 20.0 * torch.ones(B, dtype=torch.float64))


def test_bco_pair_shift_is_the_running_mean_of_batch_means():
    opts = pw.BCOPairOptions(beta=0.3)
    batches = [make_batch(seed=s) for s in (5, 6, 7)]
    state, batch_means = RunningMean(), []
    for _, _, logps, ref_logps, lengths in batches:
        batch_means.append((0.3 * (logps - ref_logps)).mean())
        inputs = as_inputs(logps, ref_logps, lengths)
        inputs.loss_state = state
        _, metrics = pw.bco_pair_loss(inputs, opts)
        state = RunningMean.from_metrics(metrics)
        # the batch is absorbed before use: the shift already includes it
        assert state.mean == pytest.approx(np.mean(batch_means), rel=1e-12)
        assert state.count == len(batch_means)
    without_shift = pw.bco_pair_loss(as_inputs(*batches[0][2:]), pw.BCOPairOptions(beta=0.3, use_reward_shift=False))
    assert "bco/reward_shift" not in without_shift[1]


def test_options_are_validated_at_load():
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="label_smoothing"):
        build_options(get_loss("exo_pair"), {"label_smoothing": 0.0})
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_options(get_loss("robust_dpo"), {"label_smoothing": 0.5})
    with pytest.raises(ConfigError, match="length_normalize"):
        build_options(get_loss("ipo"), {"length_normalize": 1})
    assert build_options(get_loss("ipo"), {"length_normalize": True}).length_normalize


# ---- equality with TRL 1.16 (DPOTrainer._compute_loss on the same per-token log-probs) ----


def trl_dpo_loss(token_logps, token_mask, ref_logps, loss_types, beta, label_smoothing=0.0, loss_weights=None):
    """TRL's own DPOTrainer._compute_loss, driven by a stand-in model that returns the given per-token log-probs.

    The batch is [chosen; rejected] rows of one prompt token followed by T completion positions, with
    precomputed reference log-probs, so everything TRL computes after the forward pass runs unmodified.
    """
    trl_dpo = import_trl("trl.trainer.dpo_trainer")
    batch = token_logps.shape[0]
    rows_mask = torch.cat([token_mask[:, 0], token_mask[:, 1]])
    per_token_logps = torch.cat([token_logps[:, 0], token_logps[:, 1]]) * rows_mask
    zeros = torch.zeros_like(per_token_logps)
    outputs = types.SimpleNamespace(
        log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
    )
    completion_mask = torch.cat([torch.zeros(2 * batch, 1), rows_mask], dim=1).long()
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_logps[:, 0],
        "ref_rejected_logps": ref_logps[:, 1],
    }
    same = lambda value: value  # noqa: E731 - single process: gathers are the identity
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=0.05),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    return trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)


TRL_CASES = [
    # (our loss, our options, TRL loss_type(s), TRL beta, TRL label_smoothing, TRL loss_weights)
    ("dpo", DPOOptions(beta=0.3), ["sigmoid"], 0.3, 0.0, None),
    ("robust_dpo", pw.RobustDPOOptions(beta=0.3, label_smoothing=0.2), ["robust"], 0.3, 0.2, None),
    ("ipo", pw.IPOOptions(beta=0.5, length_normalize=True), ["ipo"], 0.5, 0.0, None),
    ("hinge", pw.HingeOptions(beta=0.1), ["hinge"], 0.1, 0.0, None),
    ("nca_pair", pw.NCAOptions(beta=0.3), ["nca_pair"], 0.3, 0.0, None),
    ("exo_pair", pw.EXOOptions(beta=0.3, label_smoothing=0.01), ["exo_pair"], 0.3, 0.01, None),
    ("bco_pair", pw.BCOPairOptions(beta=0.3, use_reward_shift=False), ["bco_pair"], 0.3, 0.0, None),
    ("rpo", pw.RPOOptions(beta=0.3, nll_weight=0.5, nll_token_mean=True), ["sigmoid", "sft"], 0.3, 0.0, [1.0, 0.5]),
]


@pytest.mark.parametrize("case", TRL_CASES, ids=[c[0] + "-" + "+".join(c[2]) for c in TRL_CASES])
def test_value_and_gradient_match_trl(case):
    name, opts, loss_types, beta, label_smoothing, loss_weights = case
    token_logps, mask, _, ref_logps, _ = make_batch(seed=8)
    mask_t = torch.tensor(mask)
    trl_leaf = torch.tensor(token_logps, requires_grad=True)
    trl_loss = trl_dpo_loss(trl_leaf, mask_t, torch.tensor(ref_logps), loss_types, beta, label_smoothing, loss_weights)
    trl_loss.backward()

    our_leaf = torch.tensor(token_logps, requires_grad=True)
    inputs = LossInputs(logps=(our_leaf * mask_t).sum(-1), lengths=mask_t.sum(-1), ref_logps=torch.tensor(ref_logps))
    our_loss = get_loss(name).fn(inputs, opts)[0].mean()
    our_loss.backward()

    torch.testing.assert_close(our_loss, trl_loss.to(our_loss.dtype), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(our_leaf.grad, trl_leaf.grad, rtol=1e-6, atol=1e-8)


def test_ipo_default_is_the_summed_form_not_trls():
    token_logps, mask, logps, ref_logps, lengths = make_batch(seed=8)
    trl_loss = trl_dpo_loss(torch.tensor(token_logps), torch.tensor(mask), torch.tensor(ref_logps), ["ipo"], 0.5)
    ours = pw.ipo_loss(as_inputs(logps, ref_logps, lengths), pw.IPOOptions(beta=0.5))[0].mean()
    assert not torch.isclose(ours, trl_loss.double())


def test_bco_pair_default_keeps_the_authors_shift_that_trl_dropped():
    token_logps, mask, logps, ref_logps, lengths = make_batch(seed=8)
    trl_loss = trl_dpo_loss(torch.tensor(token_logps), torch.tensor(mask), torch.tensor(ref_logps), ["bco_pair"], 0.3)
    ours = pw.bco_pair_loss(as_inputs(logps, ref_logps, lengths), pw.BCOPairOptions(beta=0.3))[0].mean()
    assert not torch.isclose(ours, trl_loss.double())

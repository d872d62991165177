"""Reference-free pairwise losses (reference_free.py): ORPO, SimPO, CPO, and the shared NLL helper."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from alignkit.losses import get_loss
from alignkit.losses import reference_free as rf
from alignkit.losses.base import LossInputs, sft_nll
from conftest import import_trl

B = 8


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_batch(seed: int = 0):
    """Summed response log-probs [B, 2] and token counts [B, 2], in float64 (average log-prob in (-3, -0.05))."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 30, size=(B, 2)).astype(np.float64)
    logps = -rng.uniform(0.05, 3.0, size=(B, 2)) * lengths
    return logps, lengths


def as_inputs(logps, lengths) -> LossInputs:
    return LossInputs(logps=torch.tensor(logps), lengths=torch.tensor(lengths))


# ---- NumPy references ----


def np_nll(logps, lengths, token_mean):
    if token_mean:
        return np.full(len(logps), -logps[:, 0].sum() / lengths[:, 0].sum())  # the batch token-mean, per example
    return -logps[:, 0] / lengths[:, 0]


def np_orpo(logps, lengths, lam, token_mean):
    avg = logps / lengths
    p = np.exp(avg)
    log_odds = np.log(p / (1 - p))
    odds_ratio_loss = -np_logsigmoid(log_odds[:, 0] - log_odds[:, 1])
    return np_nll(logps, lengths, token_mean) + lam * odds_ratio_loss


def np_simpo(logps, lengths, beta, ratio, eps=0.0, hinge=False, nll_weight=0.0, token_mean=True):
    avg = logps / lengths
    z = beta * (avg[:, 0] - avg[:, 1]) - ratio * beta
    loss = np.maximum(0.0, 1 - z) if hinge else -(1 - eps) * np_logsigmoid(z) - eps * np_logsigmoid(-z)
    return loss + nll_weight * np_nll(logps, lengths, token_mean)


def np_cpo(logps, lengths, beta, eps, alpha, token_mean):
    z = beta * (logps[:, 0] - logps[:, 1])
    return -(1 - eps) * np_logsigmoid(z) - eps * np_logsigmoid(-z) + alpha * np_nll(logps, lengths, token_mean)


CASES = {
    "orpo": (rf.orpo_loss, rf.ORPOOptions(beta=0.2), lambda lp, n: np_orpo(lp, n, 0.2, True)),
    "orpo_per_sequence_nll": (
        rf.orpo_loss,
        rf.ORPOOptions(beta=0.2, nll_token_mean=False),
        lambda lp, n: np_orpo(lp, n, 0.2, False),
    ),
    "simpo": (rf.simpo_loss, rf.SimPOOptions(), lambda lp, n: np_simpo(lp, n, 2.0, 0.25)),
    "simpo_smoothed": (
        rf.simpo_loss,
        rf.SimPOOptions(beta=2.5, gamma_beta_ratio=0.55, label_smoothing=0.1),
        lambda lp, n: np_simpo(lp, n, 2.5, 0.55, eps=0.1),
    ),
    "simpo_hinge": (
        rf.simpo_loss,
        rf.SimPOOptions(beta=2.0, gamma_beta_ratio=0.5, hinge=True),
        lambda lp, n: np_simpo(lp, n, 2.0, 0.5, hinge=True),
    ),
    "cpo_simpo": (
        rf.simpo_loss,
        rf.SimPOOptions(beta=10.0, gamma_beta_ratio=0.54, nll_weight=0.05),
        lambda lp, n: np_simpo(lp, n, 10.0, 0.54, nll_weight=0.05),
    ),
    "cpo": (rf.cpo_loss, rf.CPOOptions(beta=0.1), lambda lp, n: np_cpo(lp, n, 0.1, 0.0, 1.0, True)),
    "cpo_smoothed_per_sequence": (
        rf.cpo_loss,
        rf.CPOOptions(beta=0.1, label_smoothing=0.2, nll_weight=0.5, nll_token_mean=False),
        lambda lp, n: np_cpo(lp, n, 0.1, 0.2, 0.5, False),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_matches_numpy_formula(case):
    fn, opts, reference = CASES[case]
    logps, lengths = make_batch(seed=1)
    losses, metrics = fn(as_inputs(logps, lengths), opts)
    expected = reference(logps, lengths)
    np.testing.assert_allclose(losses.mean().item(), expected.mean(), rtol=1e-6)  # ORPO runs in float32
    if not getattr(opts, "nll_token_mean", False) or not getattr(opts, "nll_weight", 1.0):
        # a token-mean NLL is a batch quantity: only the batch mean is defined by the formula
        np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-6)
    assert losses.shape == (B,)
    assert all(m.shape == (B,) and not m.requires_grad for m in metrics.values())


# ORPO computes the odds in float32 (as TRL does): its gradient is checked against float64 autograd and TRL below
@pytest.mark.parametrize("case", sorted(c for c in CASES if not c.startswith("orpo")))
def test_gradient_matches_finite_differences(case):
    fn, opts, _ = CASES[case]
    logps, lengths = make_batch(seed=2)
    lengths_t = torch.tensor(lengths)

    def per_example(policy_logps):
        return fn(LossInputs(logps=policy_logps, lengths=lengths_t), opts)[0]

    assert torch.autograd.gradcheck(per_example, (torch.tensor(logps, requires_grad=True),), fast_mode=True)


def test_orpo_gradient_matches_naive_float64_autograd():
    logps, lengths = make_batch(seed=2)
    leaf = torch.tensor(logps, requires_grad=True)
    rf.orpo_loss(LossInputs(logps=leaf, lengths=torch.tensor(lengths)), rf.ORPOOptions(beta=0.2))[0].sum().backward()

    naive_leaf = torch.tensor(logps, requires_grad=True)
    avg = naive_leaf / torch.tensor(lengths)
    log_odds = avg - torch.log(1 - torch.exp(avg))
    nll = -naive_leaf[:, 0].sum() / lengths[:, 0].sum()
    naive = nll * B - 0.2 * torch.nn.functional.logsigmoid(log_odds[:, 0] - log_odds[:, 1]).sum()
    naive.backward()
    torch.testing.assert_close(leaf.grad, naive_leaf.grad, rtol=1e-5, atol=1e-7)


# ---- limits and identities ----


def test_equal_average_logps_give_the_known_constants():
    logps = torch.full((B, 2), -14.0, dtype=torch.float64)
    lengths = torch.full((B, 2), 7.0, dtype=torch.float64)  # average -2 per token
    inputs = LossInputs(logps=logps, lengths=lengths)
    gamma = 0.25 * 2.0
    torch.testing.assert_close(
        rf.simpo_loss(inputs, rf.SimPOOptions())[0], torch.full((B,), math.log1p(math.exp(gamma)), dtype=torch.float64)
    )
    torch.testing.assert_close(
        rf.simpo_loss(inputs, rf.SimPOOptions(hinge=True))[0], torch.full((B,), 1 + gamma, dtype=torch.float64)
    )
    torch.testing.assert_close(
        rf.cpo_loss(inputs, rf.CPOOptions(nll_weight=0.0))[0], torch.full((B,), math.log(2), dtype=torch.float64)
    )
    orpo = rf.orpo_loss(inputs, rf.ORPOOptions(beta=0.2))[0]
    torch.testing.assert_close(orpo, torch.full((B,), 2.0 + 0.2 * math.log(2), dtype=orpo.dtype))


def test_simpo_is_length_invariant_where_cpo_is_not():
    logps, lengths = make_batch(seed=3)
    simpo = rf.simpo_loss(as_inputs(logps, lengths), rf.SimPOOptions())[0]
    doubled = rf.simpo_loss(as_inputs(2 * logps, 2 * lengths), rf.SimPOOptions())[0]
    torch.testing.assert_close(simpo, doubled)
    cpo = rf.cpo_loss(as_inputs(logps, lengths), rf.CPOOptions(nll_weight=0.0))[0]
    assert not torch.allclose(cpo, rf.cpo_loss(as_inputs(2 * logps, 2 * lengths), rf.CPOOptions(nll_weight=0.0))[0])


def test_orpo_is_stable_near_probability_one():
    logps = torch.tensor([[-1e-9, -5.0]], dtype=torch.float64)
    lengths = torch.tensor([[10.0, 10.0]], dtype=torch.float64)
    losses = rf.orpo_loss(LossInputs(logps=logps, lengths=lengths), rf.ORPOOptions())[0]
    assert torch.isfinite(losses).all()


def test_sft_nll_token_mean_averages_to_the_batch_token_mean():
    logps, lengths = make_batch(seed=4)
    chosen, chosen_lengths = torch.tensor(logps[:, 0]), torch.tensor(lengths[:, 0])
    token_mean = sft_nll(chosen, chosen_lengths, token_mean=True).mean()
    torch.testing.assert_close(token_mean, -chosen.sum() / chosen_lengths.sum())
    torch.testing.assert_close(sft_nll(chosen, chosen_lengths), -chosen / chosen_lengths)


# ---- equality with TRL 1.16 (CPOTrainer / ORPOTrainer loss code, driven by a stand-in model's logits) ----

VOCAB, WIDTH = 11, 9  # one prompt token, then up to 8 response tokens, right-padded


def make_token_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2 * B, WIDTH), generator=generator)
    response_lengths = torch.randint(2, WIDTH, (2 * B,), generator=generator)
    attention = (torch.arange(WIDTH)[None, :] <= response_lengths[:, None]).long()  # prompt + response
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, 0] = -100  # the prompt token is not scored
    logits = torch.randn(2 * B, WIDTH, VOCAB, generator=generator, dtype=torch.float64) * 2
    batch = {}
    for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        batch[f"{side}_input_ids"] = ids[rows]
        batch[f"{side}_attention_mask"] = attention[rows]
        batch[f"{side}_labels"] = labels[rows]
    return batch, logits


def our_inputs(batch, logits):
    """Summed response log-probs and counts from the same logits, computed the plain way."""
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    scored = labels != -100
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums, counts = (token_logps * scored).sum(-1), scored.sum(-1).to(logits.dtype)
    return LossInputs(logps=torch.stack([sums[:B], sums[B:]], 1), lengths=torch.stack([counts[:B], counts[B:]], 1))


def trl_trainer(module_name: str, class_name: str, **attributes):
    module = import_trl(module_name)
    cls = getattr(module, class_name)
    same = lambda value: value  # noqa: E731 - single process: gathers are the identity
    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=same),
        is_encoder_decoder=False,
        aux_loss_enabled=False,
        pad_token_id=0,
        padding_value=0,
        concatenated_inputs=cls.concatenated_inputs,
        get_batch_logps=cls.get_batch_logps,
        **attributes,
    )
    for method in ("concatenated_forward", "cpo_loss", "odds_ratio_loss"):
        if hasattr(cls, method):
            setattr(trainer, method, types.MethodType(getattr(cls, method), trainer))
    return cls, trainer


TRL_CASES = [
    # (id, our loss, our options, TRL module, class, TRL attributes)
    ("cpo", "cpo", rf.CPOOptions(beta=0.3, label_smoothing=0.1, nll_weight=0.7), "trl.experimental.cpo.cpo_trainer",
     "CPOTrainer", dict(loss_type="sigmoid", beta=0.3, label_smoothing=0.1, cpo_alpha=0.7, alpha=0.0, simpo_gamma=0.5)),
    ("simpo", "simpo", rf.SimPOOptions(beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.1),
     "trl.experimental.cpo.cpo_trainer", "CPOTrainer",
     dict(loss_type="simpo", beta=2.0, label_smoothing=0.1, cpo_alpha=0.0, alpha=0.0, simpo_gamma=0.5)),
    ("cpo_simpo", "simpo", rf.SimPOOptions(beta=10.0, gamma_beta_ratio=0.54, nll_weight=0.05),
     "trl.experimental.cpo.cpo_trainer", "CPOTrainer",
     dict(loss_type="simpo", beta=10.0, label_smoothing=0.0, cpo_alpha=0.05, alpha=0.0, simpo_gamma=5.4)),
    ("orpo", "orpo", rf.ORPOOptions(beta=0.2), "trl.experimental.orpo.orpo_trainer", "ORPOTrainer", dict(beta=0.2)),
]


@pytest.mark.parametrize("case", TRL_CASES, ids=[c[0] for c in TRL_CASES])
def test_value_and_gradient_match_trl(case, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    _, name, opts, module_name, class_name, attributes = case
    cls, trainer = trl_trainer(module_name, class_name, **attributes)
    batch, logits = make_token_batch(seed=5)

    trl_leaf = logits.clone().requires_grad_()
    model = lambda input_ids, **kwargs: types.SimpleNamespace(logits=trl_leaf)  # noqa: E731
    trl_loss, _ = cls.get_batch_loss_metrics(trainer, model, batch)
    trl_loss.backward()

    our_leaf = logits.clone().requires_grad_()
    our_loss = get_loss(name).fn(our_inputs(batch, our_leaf), opts)[0].mean()
    our_loss.backward()

    # ORPO's odds are computed in float32 by both, so compare at float32 precision there
    rtol = 1e-5 if name == "orpo" else 1e-9
    torch.testing.assert_close(our_loss.double(), trl_loss.double(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(our_leaf.grad, trl_leaf.grad, rtol=rtol, atol=rtol)

"""Every registered loss: default options build, it runs on its data shape, and docs/losses.md names it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignkit.losses import LOSSES, LossInputs, build_options

B, T = 4, 6
COLUMNS = {"pairs": 2, "unpaired": 1, "lists": 4, "sft": 1, "rollouts": 4, "negatives": 4, "rejections": 3}


def synthetic_inputs(data_shape: str, needs_token_logps: bool) -> LossInputs:
    generator = torch.Generator().manual_seed(0)
    k = COLUMNS[data_shape]
    token_mask = torch.ones(B, k, T, dtype=torch.bool)
    token_mask[:, :, T - 2 :] = torch.rand(B, k, 2, generator=generator) > 0.5
    token_logps = -torch.rand(B, k, T, generator=generator) * token_mask
    ref_token_logps = -torch.rand(B, k, T, generator=generator) * token_mask
    inputs = LossInputs(
        logps=token_logps.sum(-1).requires_grad_(),
        lengths=token_mask.sum(-1).float(),
        ref_logps=ref_token_logps.sum(-1),
        labels=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        scores=torch.rand(B, k, generator=generator),
        kl_logps=-torch.rand(B, generator=generator) * 5,
        ref_kl_logps=-torch.rand(B, generator=generator) * 5,
        predicted_rewards=torch.randn(B, k, generator=generator).requires_grad_(),
        # Online losses (rollouts): PPO's advantages, value targets and value-head outputs; CREAM's pair weights.
        advantages=torch.randn(B, k, T, generator=generator) * token_mask,
        returns=torch.randn(B, k, T, generator=generator) * token_mask,
        values=torch.randn(B, k, T, generator=generator) * token_mask,
        old_values=torch.randn(B, k, T, generator=generator) * token_mask,
        consistency=torch.rand(B, generator=generator),
        other_rewards=torch.randn(B, k, 2, generator=generator),  # MODPO: two other objectives' rewards
    )
    inputs.rewards = inputs.scores  # a rollout's rewards: the same graded values online losses read
    if needs_token_logps:
        inputs.token_logps = token_logps.requires_grad_()
        inputs.ref_token_logps, inputs.token_mask = ref_token_logps, token_mask
        inputs.token_weights = torch.rand(B, k, T, generator=generator)
        inputs.token_kl = torch.rand(B, k, T, generator=generator) * token_mask
        # Distillation: a teacher's log-probs of the tokens, and a divergence to it that depends on the policy (as
        # the loop's chunked one does)
        inputs.teacher_token_logps = -torch.rand(B, k, T, generator=generator) * token_mask
        inputs.token_divergence = (inputs.token_logps - inputs.teacher_token_logps).pow(2) * token_mask
        inputs.group_divergence, inputs.group_mask = inputs.token_divergence, token_mask  # ULD: one token a group
    return inputs


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registered_loss_runs_with_default_options(name):
    spec = LOSSES[name]
    inputs = synthetic_inputs(spec.data_shape, spec.needs_token_logps)
    losses, metrics = spec.fn(inputs, build_options(spec, {}))
    assert losses.shape == (B,) and torch.isfinite(losses).all()
    losses.mean().backward()
    policy = inputs.token_logps if spec.needs_token_logps else inputs.predicted_rewards if spec.output == "rewards" else inputs.logps
    assert policy.grad is not None and torch.isfinite(policy.grad).all()
    for key, value in metrics.items():
        assert value.shape == (B,) and not value.requires_grad and torch.isfinite(value).all(), key


def test_every_registered_loss_is_documented():
    docs = (Path(__file__).parents[1] / "docs" / "losses.md").read_text()
    missing = [name for name in LOSSES if f"| `{name}` |" not in docs]
    assert not missing, f"add these losses to the table in docs/losses.md: {missing}"

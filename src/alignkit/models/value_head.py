"""PPO's critic: a value head on the policy's last hidden states, and the policy + head as one module, so the
shared step (train/step.py) trains both (the head in its own parameter group, with its own learning rate) and
response_logprobs returns the values from the same forward as the log-probs."""

from __future__ import annotations

import torch


class ValueHead(torch.nn.Module):
    """V(s_t): a linear map of the hidden state that predicts token t (so the state is prompt + y_<t). Starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


class PolicyWithValueHead(torch.nn.Module):
    """The policy (a causal LM, possibly with LoRA) and its value head. Saved apart: the policy in HF format, the
    head as its own file."""

    def __init__(self, policy, value_head: ValueHead | None = None):
        super().__init__()
        self.policy = policy
        hidden = policy.get_output_embeddings().weight.shape[1]
        self.value_head = value_head if value_head is not None else ValueHead(hidden)
        self.value_head.to(next(policy.parameters()).device)

    def parameter_groups(self, value_learning_rate: float | None) -> list[dict]:
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]
        head = {"params": list(self.value_head.parameters())}
        return groups + [{**head, "lr": value_learning_rate} if value_learning_rate else head]


def policy_of(model):
    """The causal LM inside `model` (itself when it has no value head)."""
    return model.policy if isinstance(model, PolicyWithValueHead) else model

"""The CHES score of a preference pair (Razin et al., "Unintentional Unalignment", arXiv 2410.08847): how alike the
chosen and rejected responses' hidden embeddings are, which is what drives the chosen log-prob down under DPO
(likelihood displacement)."""

from __future__ import annotations

import torch

from alignkit.models.inference import eval_mode


def ches_score(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor) -> float:
    """The paper's length-normalised CHES of one pair, from the hidden embeddings h_{x, y<k} [len(y), H] at the
    positions that predict each response token:
    <mean_k h(x, y+_<k), mean_k h(x, y-_<k)> - ||mean_k h(x, y+_<k)||^2 (in float64)."""
    chosen_mean, rejected_mean = chosen_hidden.double().mean(0), rejected_hidden.double().mean(0)
    return float(chosen_mean @ rejected_mean - chosen_mean @ chosen_mean)


def response_hidden(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """The final hidden states (what the unembedding reads) at the positions predicting each response token: after
    the prompt and the response before it, [len(response), H]."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids[:-1]], device=device)
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    with eval_mode(model):
        hidden = base.base_model(input_ids=ids).last_hidden_state[0]
    return hidden[len(prompt_ids) - 1:].float()


def pair_ches(model, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> float:
    """CHES of one tokenised pair under `model` (a pair with an empty response scores 0: nothing to compare)."""
    if not chosen_ids or not rejected_ids:
        return 0.0
    return ches_score(response_hidden(model, prompt_ids, chosen_ids), response_hidden(model, prompt_ids, rejected_ids))

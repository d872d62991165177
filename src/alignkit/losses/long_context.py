"""Long-context preference losses.

LOGO (Tang et al., arXiv 2410.18533 eqs. 2-3; the authors' LOGOTrainer in ZetangForward/Long-Context-Alignment,
training/logo_train.py): reference-free like SimPO, so no second long forward; one preferred response against the
mean of M dis-preferred ones. Columns of logps [B, 1 + M]: column 0 is y_w, columns 1..M the y_l^(j).

LongPO (Chen et al., arXiv 2502.13922 eqs. 12 and 14; DAMO-NLP-SG/LongPO train/longdpo_trainer.py): DPO where the
policy reads the long context and the reference the short one, r(y) = beta log pi(y | x_long) / pi_ref(y | x_short)
(the short-to-long KL constraint enters only through that reference), plus an NLL on the chosen response.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput, logratios, pair_reward_metrics, sft_nll
from alignkit.losses.options import Beta, LossOptions


class LOGOOptions(LossOptions):
    beta: Beta = Field(10.0, description="the paper's Llama-3 setting (Mistral 2.5, Llama-2 3)")
    gamma: float = Field(3.0, description="margin in reward units (the code's beta * gamma_beta_ratio: 10 * 0.3)")
    sft_weight: float = Field(0.1, ge=0, description="lambda on the chosen response's NLL (0 drops it)")



def logo_loss(inputs: LossInputs, opts: LOGOOptions) -> LossOutput:
    """l = -log s(beta a(y_w) - (beta / M) sum_j a(y_l^(j)) - gamma) + lambda NLL(y_w), a(y) = log pi(y|x) / |y|.

    Each response is normalised by its own length (as the code's average_log_prob); the M negatives are averaged
    inside one sigmoid (M = 1 is SimPO). The NLL is the token-mean over the batch's chosen tokens, the code's
    cross-entropy (shifted here: the code's is off by one, its labels unshifted against the logits)."""
    if inputs.logps.shape[1] < 2:
        raise ValueError("logo needs the chosen response (column 0) and at least one rejection (columns 1..M)")
    average = inputs.logps / inputs.lengths.clamp(min=1)
    chosen = opts.beta * average[:, 0]
    rejected = opts.beta * average[:, 1:].mean(dim=1)
    losses = -F.logsigmoid(chosen - rejected - opts.gamma)
    if opts.sft_weight > 0:
        losses = losses + opts.sft_weight * sft_nll(inputs.logps[:, 0], inputs.lengths[:, 0], token_mean=True)
    return losses, pair_reward_metrics(chosen, rejected)


class LongPOOptions(LossOptions):
    beta: Beta = Field(0.1, description="the paper's; the released training script uses 0.01")
    dpo_weight: float = Field(0.01, gt=0, description="lambda: the weight of the preference term (the NLL's is 1)")
    nll: bool = Field(True, description="the NLL on the chosen response under the long context")



def longpo_loss(inputs: LossInputs, opts: LongPOOptions) -> LossOutput:
    """l = NLL(y_w | x_long) - lambda log s(beta [log pi(y_w|x_long) / pi_ref(y_w|x_short)
                                                  - log pi(y_l|x_long) / pi_ref(y_l|x_short)]).

    inputs.ref_logps are the reference's log-probs with each record's short context (the loop scores the
    reference on `short_prompt`). The NLL is the token-mean over the batch's chosen response tokens; the code's
    also covers the long context and the chat template (see docs/losses.md)."""
    chosen_logratio, rejected_logratio = logratios(inputs)
    chosen, rejected = opts.beta * chosen_logratio, opts.beta * rejected_logratio
    losses = opts.dpo_weight * -F.logsigmoid(chosen - rejected)
    if opts.nll:
        losses = losses + sft_nll(inputs.chosen_logps, inputs.lengths[:, 0], token_mean=True)
    return losses, pair_reward_metrics(chosen, rejected)

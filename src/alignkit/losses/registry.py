"""One table names every method: its loss function, its options model (losses/options.py) and the data shape it
needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignkit.errors import ConfigError
from alignkit.losses import (
    bonbon,
    distill,
    listwise,
    long_context,
    multiobjective,
    negatives,
    online,
    pairwise,
    reference_free,
    reward,
    tokenlevel,
    uld,
    unpaired,
)
from alignkit.losses.base import RunningMean, needs
from alignkit.losses.dpo import DPOOptions, dpo_loss
from alignkit.losses.options import build_options, option_names
from alignkit.losses.sft import ConstrainedSFTOptions, SFTOptions, constrained_sft_loss, sft_loss
from alignkit.shapes import DATA_SHAPES


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable
    options: type
    data_shape: str
    needs_reference: bool
    paper: str
    needs_token_logps: bool = False
    # What the loop computes for the loss: "logps" (log-probs of a causal LM) or "rewards" (one scalar per
    # response from a sequence-classification head: reward models).
    output: str = "logps"
    # KTO's reference point: the loop adds a mismatched completion per example (LossInputs.kl_logps, ref_kl_logps).
    needs_kl_pairs: bool = False
    # Per-token reference distributions and activations (SparsePO's token KL and masks): a frozen reference model
    # runs beside the policy (the cached reference log-probs cannot give them).
    needs_ref_model: bool = False
    # State carried between training batches (BCO's reward shift): its type, with from_metrics / to_dict /
    # from_dict / merge (base.RunningMean). The loop passes it as LossInputs.loss_state, takes the new one from the
    # loss's metrics, in training only, and saves it in checkpoints.
    state: type | None = None
    # Record fields beyond the data shape's: every record must carry one of them (MODPO's other objectives).
    record_fields: tuple[str, ...] = ()
    # The record field holding the prompt the reference reads instead of `prompt` (LongPO: "short_prompt"; the
    # loop scores the reference on it). None: the reference reads what the policy reads.
    reference_context: str | None = None
    # A frozen teacher scores the batch (distillation): its per-token log-probs or its divergence to the policy.
    needs_teacher: bool = False


LOSSES: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> None:
    assert spec.data_shape in DATA_SHAPES, spec.data_shape
    assert spec.output in ("logps", "rewards"), spec.output
    LOSSES[spec.name] = spec


register(LossSpec("dpo", dpo_loss, DPOOptions, "pairs", True, "arXiv 2305.18290"))
register(LossSpec("sft", sft_loss, SFTOptions, "sft", False, "supervised fine-tuning (NLL)"))
register(LossSpec("sft_constrained", constrained_sft_loss, ConstrainedSFTOptions, "sft", True, "arXiv 2406.05946",
                  needs_token_logps=True))
# Offline catalogue (docs/losses.md): name, function, options, data shape, needs reference, paper.
register(LossSpec("robust_dpo", pairwise.robust_dpo_loss, pairwise.RobustDPOOptions, "pairs", True, "arXiv 2403.00409"))
register(LossSpec("ipo", pairwise.ipo_loss, pairwise.IPOOptions, "pairs", True, "arXiv 2310.12036"))
register(LossSpec("hinge", pairwise.hinge_loss, pairwise.HingeOptions, "pairs", True, "arXiv 2309.06657"))
register(LossSpec("slic", pairwise.slic_loss, pairwise.SLiCOptions, "pairs", False, "arXiv 2305.10425"))
register(LossSpec("nca_pair", pairwise.nca_pair_loss, pairwise.NCAOptions, "pairs", True, "arXiv 2402.05369"))
register(LossSpec("exo_pair", pairwise.exo_pair_loss, pairwise.EXOOptions, "pairs", True, "arXiv 2402.00856"))
register(LossSpec("dpop", pairwise.dpop_loss, pairwise.DPOPOptions, "pairs", True, "arXiv 2402.13228"))
register(LossSpec("rdpo", pairwise.rdpo_loss, pairwise.RDPOOptions, "pairs", True, "arXiv 2403.19159"))
register(LossSpec("bco_pair", pairwise.bco_pair_loss, pairwise.BCOPairOptions, "pairs", True, "arXiv 2404.04656",
                  state=RunningMean))
register(LossSpec("rpo", pairwise.rpo_loss, pairwise.RPOOptions, "pairs", True, "arXiv 2404.19733"))
register(LossSpec("orpo", reference_free.orpo_loss, reference_free.ORPOOptions, "pairs", False, "arXiv 2403.07691"))
register(LossSpec("simpo", reference_free.simpo_loss, reference_free.SimPOOptions, "pairs", False, "arXiv 2405.14734"))
register(LossSpec("cpo", reference_free.cpo_loss, reference_free.CPOOptions, "pairs", False, "arXiv 2401.08417"))
register(LossSpec("kto", unpaired.kto_loss, unpaired.KTOOptions, "unpaired", True, "arXiv 2402.01306",
                  needs_kl_pairs=True))
register(LossSpec("bco", unpaired.bco_loss, unpaired.BCOOptions, "unpaired", True, "arXiv 2404.04656",
                  state=RunningMean))
register(LossSpec("lipo", listwise.lipo_lambda_loss, listwise.LiPOOptions, "lists", True, "arXiv 2402.01878"))
register(LossSpec("listmle", listwise.listmle_loss, listwise.ListMLEOptions, "lists", True, "arXiv 2305.18290 app. A.3"))
register(LossSpec("sparsepo", tokenlevel.sparsepo_loss, tokenlevel.SparsePOOptions, "pairs", True, "arXiv 2410.05102",
                  needs_token_logps=True, needs_ref_model=True))
# D2O's responses are (rejected, samples[0..K-1]): column 0 is the negative.
register(LossSpec("d2o", negatives.d2o_loss, negatives.D2OOptions, "negatives", True, "arXiv 2403.03419"))
# MODPO: pairs carry the other objectives' rewards ("other_rewards") or their weighted margin ("margin").
register(LossSpec("modpo", multiobjective.modpo_loss, multiobjective.MODPOOptions, "pairs", True, "arXiv 2310.03708",
                  record_fields=("other_rewards", "margin")))
# LOGO: one preferred response against M dis-preferred ones (data shape "rejections").
register(LossSpec("logo", long_context.logo_loss, long_context.LOGOOptions, "rejections", False, "arXiv 2410.18533"))
register(LossSpec("longpo", long_context.longpo_loss, long_context.LongPOOptions, "pairs", True, "arXiv 2502.13922",
                  record_fields=("short_prompt",), reference_context="short_prompt"))
# BoNBoN: pairs are best vs worst of n samples (decode/bonbon.py makes them); beta = bonbon_beta(n).
register(LossSpec("bonbon", bonbon.bonbon_loss, bonbon.BonBonOptions, "pairs", True, "arXiv 2406.00832"))
# Reward model: Bradley–Terry on scalar rewards (`alignkit rm`); centering arXiv 2312.09244.
register(LossSpec("rm", reward.bradley_terry_loss, reward.RewardModelOptions, "pairs", False, "arXiv 2203.02155",
                  output="rewards"))
# Online RL (docs/online.md): trained by `alignkit online --method grpo|rloo|ppo`, on rollouts of the policy itself.
register(LossSpec("grpo", online.grpo_loss, online.GRPOOptions, "rollouts", True, "arXiv 2402.03300",
                  needs_token_logps=True))
register(LossSpec("dapo", online.grpo_loss, online.DAPOOptions, "rollouts", True, "arXiv 2503.14476",
                  needs_token_logps=True))
register(LossSpec("gspo", online.grpo_loss, online.GSPOOptions, "rollouts", True, "arXiv 2507.18071",
                  needs_token_logps=True))
register(LossSpec("cispo", online.cispo_loss, online.CISPOOptions, "rollouts", True, "arXiv 2506.13585",
                  needs_token_logps=True))
register(LossSpec("reinforce++", online.reinforce_pp_loss, online.ReinforcePPOptions, "rollouts", True,
                  "arXiv 2501.03262", needs_token_logps=True))
register(LossSpec("rloo", online.rloo_loss, online.RLOOOptions, "rollouts", True, "arXiv 2402.14740"))
register(LossSpec("ppo", online.ppo_loss, online.PPOOptions, "rollouts", True, "arXiv 1707.06347, 2307.04964",
                  needs_token_logps=True))
# Distillation (docs/distillation.md): gkd, dckd and adpa read a per-token divergence to a teacher
# (LossSpec.needs_teacher; adpa's also reads the teacher's reference), opd the teacher's log-probs of the student's
# samples (`alignkit online --method opd`).
register(LossSpec("gkd", distill.gkd_loss, distill.GKDOptions, "sft", False, "arXiv 2306.13649",
                  needs_token_logps=True, needs_teacher=True))
register(LossSpec("dckd", distill.dckd_loss, distill.DCKDOptions, "pairs", True, "arXiv 2502.17927",
                  needs_token_logps=True, needs_teacher=True))
register(LossSpec("adpa", distill.adpa_loss, distill.ADPAOptions, "pairs", False, "arXiv 2502.17927",
                  needs_token_logps=True, needs_teacher=True))
# ULD: a teacher with its own tokenizer, compared sorted at each aligned group of tokens (teacher_tokenizer: own).
register(LossSpec("uld", uld.uld_loss, uld.ULDOptions, "sft", False, "arXiv 2402.12030", needs_token_logps=True,
                  needs_teacher=True))
register(LossSpec("opd", distill.opd_loss, distill.OPDOptions, "rollouts", True, "Thinking Machines, on-policy "
                  "distillation (2025)", needs_token_logps=True, needs_teacher=True))
# CREAM: DPO weighted by the consistency of two iterations' rankings (`alignkit online --method self-reward`).
register(LossSpec("cream", pairwise.cream_loss, pairwise.CREAMOptions, "pairs", True, "arXiv 2410.12735"))


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError("loss", f"unknown loss '{name}'; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def uses_kl_pairs(spec: LossSpec, opts: Any) -> bool:
    """Whether the loop must build mismatched pairs (KTO with its KL estimate on)."""
    return spec.needs_kl_pairs and "kl_pairs" in needs(opts)


def uses_ref_model(spec: LossSpec, opts: Any) -> bool:
    """Whether the options ask for what only a live reference model gives (SparsePO: token KL or activation masks)."""
    return spec.needs_ref_model and bool(needs(opts) & {"token_kl", "activations"})


def loss_option_names(name: Any) -> set[str]:
    """The option names of the loss called `name` (none for a name that is no loss): the keys that may be given at
    the top level of a config (`--beta 0.2`) and go to loss_options."""
    return option_names(LOSSES[name].options) if isinstance(name, str) and name in LOSSES else set()


__all__ = ["DATA_SHAPES", "LOSSES", "LossSpec", "build_options", "get_loss", "loss_option_names", "register"]

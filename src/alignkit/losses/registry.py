"""One table names every method: its loss function, its options dataclass and the data shape it needs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignkit.errors import ConfigError
from alignkit.losses import (
    bonbon,
    listwise,
    negatives,
    pairwise,
    reference_free,
    reward,
    tokenlevel,
    unpaired,
)
from alignkit.losses.dpo import DPOOptions, dpo_loss
from alignkit.losses.sft import SFTOptions, sft_loss

# Data shapes: "pairs" (prompt, chosen, rejected), "unpaired" (prompt, completion, label),
# "lists" (prompt, responses[k], scores[k]), "sft" (prompt, completion).
DATA_SHAPES = ("pairs", "unpaired", "lists", "sft")


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


LOSSES: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> None:
    assert spec.data_shape in DATA_SHAPES, spec.data_shape
    assert spec.output in ("logps", "rewards"), spec.output
    LOSSES[spec.name] = spec


register(LossSpec("dpo", dpo_loss, DPOOptions, "pairs", True, "arXiv 2305.18290"))
register(LossSpec("sft", sft_loss, SFTOptions, "sft", False, "supervised fine-tuning (NLL)"))
# Offline catalogue (docs/losses.md): name, function, options, data shape, needs reference, paper.
register(LossSpec("robust_dpo", pairwise.robust_dpo_loss, pairwise.RobustDPOOptions, "pairs", True, "arXiv 2403.00409"))
register(LossSpec("ipo", pairwise.ipo_loss, pairwise.IPOOptions, "pairs", True, "arXiv 2310.12036"))
register(LossSpec("hinge", pairwise.hinge_loss, pairwise.HingeOptions, "pairs", True, "arXiv 2309.06657"))
register(LossSpec("slic", pairwise.slic_loss, pairwise.SLiCOptions, "pairs", False, "arXiv 2305.10425"))
register(LossSpec("nca_pair", pairwise.nca_pair_loss, pairwise.NCAOptions, "pairs", True, "arXiv 2402.05369"))
register(LossSpec("exo_pair", pairwise.exo_pair_loss, pairwise.EXOOptions, "pairs", True, "arXiv 2402.00856"))
register(LossSpec("dpop", pairwise.dpop_loss, pairwise.DPOPOptions, "pairs", True, "arXiv 2402.13228"))
register(LossSpec("rdpo", pairwise.rdpo_loss, pairwise.RDPOOptions, "pairs", True, "arXiv 2403.19159"))
register(LossSpec("bco_pair", pairwise.bco_pair_loss, pairwise.BCOPairOptions, "pairs", True, "arXiv 2404.04656"))
register(LossSpec("rpo", pairwise.rpo_loss, pairwise.RPOOptions, "pairs", True, "arXiv 2404.19733"))
register(LossSpec("orpo", reference_free.orpo_loss, reference_free.ORPOOptions, "pairs", False, "arXiv 2403.07691"))
register(LossSpec("simpo", reference_free.simpo_loss, reference_free.SimPOOptions, "pairs", False, "arXiv 2405.14734"))
register(LossSpec("cpo", reference_free.cpo_loss, reference_free.CPOOptions, "pairs", False, "arXiv 2401.08417"))
register(LossSpec("kto", unpaired.kto_loss, unpaired.KTOOptions, "unpaired", True, "arXiv 2402.01306"))
register(LossSpec("bco", unpaired.bco_loss, unpaired.BCOOptions, "unpaired", True, "arXiv 2404.04656"))
register(LossSpec("lipo", listwise.lipo_lambda_loss, listwise.LiPOOptions, "lists", True, "arXiv 2402.01878"))
register(LossSpec("listmle", listwise.listmle_loss, listwise.ListMLEOptions, "lists", True, "arXiv 2305.18290 app. A.3"))
register(LossSpec("sparsepo", tokenlevel.sparsepo_loss, tokenlevel.SparsePOOptions, "pairs", True, "arXiv 2410.05102",
                  needs_token_logps=True))
# D2O's list is (negative, K self-samples): column 0 is the negative; scores are not used.
register(LossSpec("d2o", negatives.d2o_loss, negatives.D2OOptions, "lists", True, "arXiv 2403.03419"))
# BoNBoN: pairs are best vs worst of n samples (decode/bonbon.py makes them); beta = bonbon_beta(n).
register(LossSpec("bonbon", bonbon.bonbon_loss, bonbon.BonBonOptions, "pairs", True, "arXiv 2406.00832"))
# Reward model: Bradley–Terry on scalar rewards (`alignkit rm`); centering arXiv 2312.09244.
register(LossSpec("rm", reward.bradley_terry_loss, reward.RewardModelOptions, "pairs", False, "arXiv 2203.02155",
                  output="rewards"))


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError("loss", f"unknown loss '{name}'; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def build_options(spec: LossSpec, values: dict[str, Any]) -> Any:
    """Options dataclass from a dict, with checks every loss shares (known keys, finite numbers, beta > 0)."""
    fields = {f.name: f for f in dataclasses.fields(spec.options)}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ConfigError(f"loss_options.{key}", f"unknown option for loss '{spec.name}'; known: {known}")
        default = fields[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"loss_options.{key}", f"must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"loss_options.{key}", f"must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"loss_options.{key}", f"must be a finite number, got {value}")
    opts = spec.options(**values)
    if getattr(opts, "beta", 1.0) <= 0:
        raise ConfigError("loss_options.beta", f"must be > 0, got {opts.beta}")
    eps = getattr(opts, "label_smoothing", 0.0)
    if not 0 <= eps < 0.5:
        raise ConfigError("loss_options.label_smoothing", f"must be in [0, 0.5), got {eps}")
    return opts

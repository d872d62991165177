"""DeRa, decoding-time realignment (Liu et al., arXiv 2402.02992): sample each token from
softmax(lambda z_aligned + (1 - lambda) z_reference), which approximates the aligned model retrained with KL strength
beta / lambda, without retraining (lambda = 1: the aligned model; 0: the reference; > 1: less regularised)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from alignkit.config import Strict
from alignkit.errors import ConfigError
from alignkit.generate.engines import FastEngine, HFEngine, fast_engine_supports


class RealignOptions(Strict):
    """The `realign:` section of generate / decode."""

    model_config = ConfigDict(populate_by_name=True)
    reference: str = Field(description="the reference (e.g. the SFT model the aligned one started from): directory, "
                                       "alias or hub id")
    lambda_: float = Field(alias="lambda", ge=0, description="weight of the aligned model's logits: 1 = aligned, "
                                                             "0 = reference, > 1 extrapolates (beta / lambda)")


def realigned_engine(model, reference, tokenizer, sampling, lam: float):
    """An engine sampling the realigned distribution of `model` and `reference` (same tokenizer): the fast engine
    when sampling.engine is fast, or auto and it runs both models; else hf. vLLM has no second model here."""
    if sampling.engine == "vllm":
        raise ConfigError("realign", "vllm cannot decode two models in one loop; use sampling.engine fast, hf or auto")
    policy_vocab, reference_vocab = (m.get_output_embeddings().weight.shape[0] for m in (model, reference))
    if policy_vocab != reference_vocab:
        raise ConfigError("realign.reference", f"its vocabulary ({reference_vocab}) differs from the model's "
                                               f"({policy_vocab}); realignment needs the same tokenizer")
    fast = sampling.engine == "fast" or sampling.engine == "auto" and fast_engine_supports(model) \
        and fast_engine_supports(reference)
    if fast:
        return FastEngine(model, tokenizer, sampling.engine_precision, realign=(reference, lam))
    return HFEngine(model, tokenizer, realign=(reference, lam))

"""LoRA adapters through peft: the policy is base + adapters, the reference is the same base with the
adapters switched off (one copy of the weights, never two), and the final save merges or keeps them apart."""

from __future__ import annotations

import contextlib

from alignkit.config import LoraOptions


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def apply_lora(model, options: LoraOptions):
    """`model` with trainable LoRA adapters on `options.target_modules`; every base weight is frozen.
    Adapter B starts at zero, so the new policy computes exactly what the base model does."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=options.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapters_disabled(model):
    """Context in which `model` computes as its base model (a no-op for a model without adapters)."""
    return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()


def merged_for_save(model, save: str):
    """What the final save writes: with save='merged' the base with the adapters folded in (an ordinary
    causal LM; this unloads the adapters from `model` in place), else `model` itself (peft saves the adapter)."""
    if is_peft(model) and save == "merged":
        return model.merge_and_unload()
    return model


def load_adapter_weights(model, weights: dict) -> None:
    """Load saved adapter weights; raises ValueError unless they cover exactly the model's adapters."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"adapter weights do not match the model (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")

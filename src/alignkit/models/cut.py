"""Cut decoder layers out of a causal LM: a shallower student initialised from its teacher (e.g. every other layer
kept, as DistilBERT's student was made), for distillation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of blocks (`layers` in Llama/Qwen/Mistral, `h` in GPT-2)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"drop_layers: {type(model).__name__} has no decoder layer list ('layers' or 'h')")


def drop_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the decoder layers at the indices `keep` (strictly increasing), in place, and return the model.

    The config follows (num_hidden_layers, and layer_types where the model has them), and every kept block's
    `layer_idx` is renumbered to its new position: the KV cache is indexed by it, so a cut model that kept the old
    numbers would read and write other layers' cache slots when generating."""
    layers = decoder_layers(model)
    keep = _checked(keep, len(layers))
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    setattr(decoder, "layers" if hasattr(decoder, "layers") else "h", kept)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return model


def _checked(keep: Sequence[int], num_layers: int) -> list[int]:
    keep = list(keep)
    if not keep or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        raise ValueError(f"drop_layers: keep must be a non-empty list of layer indices (ints); got {keep!r}")
    if any(b <= a for a, b in zip(keep, keep[1:])) or keep[0] < 0 or keep[-1] >= num_layers:
        raise ValueError(f"drop_layers: keep must be strictly increasing indices in [0, {num_layers}); got {keep}")
    return keep

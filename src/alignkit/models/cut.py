"""Cut decoder layers out of a causal LM: a shallower student initialised from its teacher (e.g. every other layer
kept, as DistilBERT's student was made, or the block of n consecutive layers that changes its input least, as Gromov
et al. 2024, arXiv 2403.17887, prune), for distillation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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


def block_distances(model: nn.Module, sequences: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """[L - n + 1]: for each start l, the mean over the sequences' tokens of the angular distance
    arccos(cos(x_l, x_{l+n})) / pi between the hidden state entering layer l and the one leaving layer l + n - 1
    (Gromov et al. 2024, eq. 7). Small: the block barely changes its input, so dropping it costs least. Each sequence
    runs alone (no padding); the states are read by hooks on the blocks, before the final norm."""
    layers = decoder_layers(model)
    if not 0 < n < len(layers):
        raise ValueError(f"block_distances: n must be in [1, {len(layers) - 1}] for {len(layers)} layers; got {n}")
    if not sequences or any(len(ids) == 0 for ids in sequences):
        raise ValueError("block_distances: give at least one non-empty sequence of token ids")
    states: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(_keep_input(states), with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(lambda module, args, output: states.append(
        (output[0] if isinstance(output, tuple) else output).detach())))
    totals, tokens = torch.zeros(len(layers) - n + 1, dtype=torch.float64), 0
    device, training = next(model.parameters()).device, model.training
    model.eval()  # dropout off: the distances are of the model itself
    try:
        with torch.no_grad():
            for ids in sequences:
                states.clear()
                model(torch.tensor([list(ids)], device=device))
                x = torch.stack([state[0].double() for state in states])  # [L + 1, T, H]
                cosine = nn.functional.cosine_similarity(x[:-n], x[n:], dim=-1).clamp(-1, 1)  # [L - n + 1, T]
                totals += (torch.arccos(cosine) / math.pi).sum(-1).cpu()
                tokens += len(ids)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return (totals / tokens).float()


def most_similar_block(model: nn.Module, sequences: Sequence[Sequence[int]], n: int) -> list[int]:
    """The layer indices to keep when the block of n consecutive layers with the smallest block_distances is dropped
    (for drop_layers)."""
    start = int(block_distances(model, sequences, n).argmin())
    return [i for i in range(len(decoder_layers(model))) if not start <= i < start + n]


def _keep_input(states: list):
    def hook(module, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach())
    return hook


def _checked(keep: Sequence[int], num_layers: int) -> list[int]:
    keep = list(keep)
    if not keep or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        raise ValueError(f"drop_layers: keep must be a non-empty list of layer indices (ints); got {keep!r}")
    if any(b <= a for a, b in zip(keep, keep[1:])) or keep[0] < 0 or keep[-1] >= num_layers:
        raise ValueError(f"drop_layers: keep must be strictly increasing indices in [0, {num_layers}); got {keep}")
    return keep

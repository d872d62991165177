"""bf16 autocast with its weight copies cast again in backward (models/autocast_weights): the same loss and the same
gradient bits as plain autocast, and none of the copies kept for backward."""

import copy
import random

import pytest
import torch

from alignkit.data.pack import pack
from alignkit.data.tokenize import TokenizedExample
from alignkit.models.autocast_weights import cast_of_parameter, lean_autocast
from alignkit.models.logprobs import response_logprobs
from alignkit.models.tiny import build_tiny_model


def batch(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    examples = [TokenizedExample([rng.randrange(4, vocab) for _ in range(rng.randrange(3, 10))],
                                 [[rng.randrange(4, vocab) for _ in range(rng.randrange(1, 8))] for _ in range(2)])
                for _ in range(4)]
    return pack(examples, list(range(len(examples))), None, 0)


def step(model, packed, recast: bool):
    with lean_autocast("cpu") if recast else torch.autocast("cpu", dtype=torch.bfloat16):
        out = response_logprobs(model, packed)
        loss = -(out.seq_logps.float() * torch.tensor([1.0, -0.5])).sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases, and a head tied to the embedding
def test_recast_weights_give_the_same_loss_and_gradient_bits(family):
    model = build_tiny_model(family, 101, seed=1)
    packed = batch(101)
    loss, grads = step(copy.deepcopy(model), packed, recast=False)
    recast_loss, recast_grads = step(copy.deepcopy(model), packed, recast=True)
    assert torch.equal(loss, recast_loss)
    assert grads.keys() == recast_grads.keys()
    assert all(torch.equal(grads[name], recast_grads[name]) for name in grads)


def test_every_linear_weight_copy_is_recognised_and_nothing_else():
    model = build_tiny_model("llama", 101, seed=1)
    saved = []

    def keep(tensor):
        saved.append((tensor, cast_of_parameter(tensor)))
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        response_logprobs(model, batch(101))
    recognised = {id(r.param): r for _, r in saved if r is not None}
    # every decoder linear's weight (the head goes through the chunked head function, which keeps its fp32 weight)
    decoder_linears = [m.weight for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".layers." in name]
    assert set(recognised) == {id(w) for w in decoder_linears}
    for tensor, recast in saved:
        if recast is not None:  # the recipe makes the very tensor autograd would have kept
            assert torch.equal(recast.tensor(), tensor) and recast.tensor().stride() == tensor.stride()
        else:
            assert not any(tensor.shape == w.shape and tensor.dtype == torch.bfloat16 and
                           torch.equal(tensor, w.detach().bfloat16()) for w in decoder_linears)


def test_a_cast_of_a_tensor_that_is_not_a_parameter_is_kept():
    leaf = torch.randn(4, 3, requires_grad=True)  # a leaf, but no Parameter
    assert cast_of_parameter(leaf.bfloat16()) is None
    weight = torch.nn.Parameter(torch.randn(4, 3))
    assert cast_of_parameter(weight.bfloat16()) is not None
    assert cast_of_parameter(weight.bfloat16() * 2) is None  # computed from the copy: an activation
    assert cast_of_parameter(weight.bfloat16().t()).transposed

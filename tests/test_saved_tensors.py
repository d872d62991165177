"""Saved tensors made again in backward (models/saved_tensors): autocast's weight copies and SwiGLU's product. The
same loss and the same gradient bits as autograd keeping them, and each recipe makes exactly the tensor it
replaces."""

import copy
import random

import pytest
import torch

from alignkit.data.pack import pack
from alignkit.data.tokenize import TokenizedExample
from alignkit.models.fused import apply_selective_recompute
from alignkit.models.logprobs import response_logprobs
from alignkit.models.saved_tensors import cast_of_parameter, output_of_recomputable, training_forward
from alignkit.models.tiny import build_tiny_model


def batch(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    examples = [TokenizedExample([rng.randrange(4, vocab) for _ in range(rng.randrange(3, 10))],
                                 [[rng.randrange(4, vocab) for _ in range(rng.randrange(1, 8))] for _ in range(2)])
                for _ in range(4)]
    return pack(examples, list(range(len(examples))), None, 0)


def step(model, packed, bf16: bool, recompute: bool):
    context = training_forward("cpu", bf16) if recompute else torch.autocast("cpu", dtype=torch.bfloat16,
                                                                              enabled=bf16)
    with context:
        out = response_logprobs(model, packed)
        loss = -(out.seq_logps.float() * torch.tensor([1.0, -0.5])).sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases, and a head tied to the embedding
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("selective", [True, False])
def test_recomputed_saves_give_the_same_loss_and_gradient_bits(family, bf16, selective):
    model = build_tiny_model(family, 101, seed=1)
    if selective:
        apply_selective_recompute(model)
    packed = batch(101)
    loss, grads = step(copy.deepcopy(model), packed, bf16, recompute=False)
    recomputed_loss, recomputed_grads = step(copy.deepcopy(model), packed, bf16, recompute=True)
    assert torch.equal(loss, recomputed_loss)
    assert grads.keys() == recomputed_grads.keys()
    assert all(torch.equal(grads[name], recomputed_grads[name]) for name in grads)


def saved_during_forward(model, bf16: bool):
    saved = []

    def keep(tensor):
        saved.append((tensor, cast_of_parameter(tensor), output_of_recomputable(tensor)))
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
            torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        response_logprobs(model, batch(101))
    return saved


def test_every_linear_weight_copy_is_recognised_and_nothing_else():
    model = build_tiny_model("llama", 101, seed=1)
    saved = saved_during_forward(model, bf16=True)
    recognised = {id(r.param) for _, r, _ in saved if r is not None}
    # every decoder linear's weight (the head goes through the chunked head function, which keeps its fp32 weight)
    decoder_linears = [m.weight for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".layers." in name]
    assert recognised == {id(w) for w in decoder_linears}
    for tensor, recast, _ in saved:
        if recast is not None:  # the recipe makes the very tensor autograd would have kept
            assert torch.equal(recast.tensor(), tensor) and recast.tensor().stride() == tensor.stride()
        else:
            assert not any(tensor.shape == w.shape and tensor.dtype == torch.bfloat16 and
                           torch.equal(tensor, w.detach().bfloat16()) for w in decoder_linears)


@pytest.mark.parametrize("bf16", [True, False])
def test_each_swiglu_product_is_recognised_once_per_layer_and_remade_exactly(bf16):
    model = build_tiny_model("llama", 101, seed=1)
    assert not any(r for _, _, r in saved_during_forward(model, bf16))  # plain HF MLPs: nothing to recompute
    apply_selective_recompute(model)
    recipes = [(tensor, r) for tensor, _, r in saved_during_forward(model, bf16) if r is not None]
    assert len(recipes) == model.config.num_hidden_layers
    for tensor, recipe in recipes:
        remade = recipe.tensor()
        assert remade.shape == tensor.shape and remade.dtype == tensor.dtype and torch.equal(remade, tensor)


def test_a_cast_of_a_tensor_that_is_not_a_parameter_is_kept():
    g = torch.Generator().manual_seed(0)
    leaf = torch.randn(4, 3, generator=g, requires_grad=True)  # a leaf, but no Parameter
    assert cast_of_parameter(leaf.bfloat16()) is None
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    assert cast_of_parameter(weight.bfloat16()) is not None
    assert cast_of_parameter(weight.bfloat16() * 2) is None  # computed from the copy: an activation
    assert cast_of_parameter(weight.bfloat16().t()).transposed

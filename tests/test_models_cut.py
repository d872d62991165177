"""drop_layers: the cut model's config and weights are the kept layers', and it generates as a model built with
that depth from the start (the KV cache indexes the renumbered layers)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.models.cut import drop_layers
from alignkit.models.tiny import build_tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_cut_model_holds_the_kept_layers_weights(family):
    teacher = build_tiny_model(family, 40, layers=5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    prefix = "model.layers." if family != "gpt2" else "transformer.h."
    student = drop_layers(copy.deepcopy(teacher), [0, 2, 4])

    assert student.config.num_hidden_layers == 3
    if family == "qwen2":
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in (0, 2, 4)]
    after = student.state_dict()
    expected = {}
    for key, value in before.items():
        if not key.startswith(prefix):
            expected[key] = value
            continue
        index, rest = key[len(prefix):].split(".", 1)
        if int(index) in (0, 2, 4):
            expected[f"{prefix}{(0, 2, 4).index(int(index))}.{rest}"] = value
    assert after.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cut_model_generates_as_the_same_model_reloaded(family, tmp_path):
    student = drop_layers(build_tiny_model(family, 40, layers=4), [1, 3]).eval()
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # built with 2 layers, numbered 0 and 1
    ids = torch.tensor([[2, 7, 9, 11, 5]])
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, reloaded(ids).logits, atol=1e-6)
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
        cached = student.generate(ids, use_cache=True, output_scores=True, return_dict_in_generate=True, **kwargs)
        fresh = reloaded.generate(ids, use_cache=True, output_scores=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(cached.sequences, fresh.sequences)
    for ours, theirs in zip(cached.scores, fresh.scores):
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("keep", [[], [0, 0], [2, 1], [0, 4], [-1, 1], [0.0, 1], [True]])
def test_bad_keep_is_refused_by_name(keep):
    model = build_tiny_model("llama", 40, layers=4)
    with pytest.raises(ValueError, match="drop_layers: keep must be"):
        drop_layers(model, keep)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4


def _reference_distances(model, sequences, n):
    """NumPy transcription of Gromov et al.'s eq. 7 on HF's own hidden states (the final norm's weight set to 1, so
    the last state differs from the last block's output by a per-token scale only, which the angle ignores)."""
    import numpy as np

    per_start = []
    with torch.no_grad():
        states = [np.stack([h[0].double().numpy() for h in model(torch.tensor([s]), output_hidden_states=True)
                            .hidden_states]) for s in sequences]
    for start in range(model.config.num_hidden_layers - n + 1):
        angles = []
        for x in states:
            a, b = x[start], x[start + n]
            cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
            angles.extend(np.arccos(np.clip(cos, -1, 1)) / np.pi)
        per_start.append(np.mean(angles))
    return np.array(per_start)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_block_distances_match_the_papers_formula(n):
    from alignkit.models.cut import block_distances

    model = build_tiny_model("llama", 40, layers=5).eval()
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    sequences = [[2, 7, 9, 11, 5], [3, 3, 8], [1, 4, 6, 8, 10, 12, 14]]
    ours = block_distances(model, sequences, n)
    assert ours.shape == (5 - n + 1,)
    assert torch.allclose(ours.double(), torch.from_numpy(_reference_distances(model, sequences, n)), atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_most_similar_block_drops_the_layers_that_do_nothing(family):
    """Layers whose attention and MLP outputs are zeroed pass their input through: that block is at distance 0, it
    is the one dropped, and the cut model computes exactly what the full one did."""
    from alignkit.models.cut import block_distances, decoder_layers, most_similar_block

    model = build_tiny_model(family, 40, layers=5).eval()
    with torch.no_grad():
        for layer in list(decoder_layers(model))[2:4]:
            for name, module in layer.named_modules():
                if name.split(".")[-1] in ("o_proj", "down_proj", "c_proj") and hasattr(module, "weight"):
                    module.weight.zero_()
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
    sequences = [[2, 7, 9, 11, 5], [3, 3, 8, 1]]
    distances = block_distances(model, sequences, 2)
    others = torch.cat([distances[:2], distances[3:]])
    assert float(distances[2]) < 1e-6 < float(others.min())
    keep = most_similar_block(model, sequences, 2)
    assert keep == [0, 1, 4]
    ids = torch.tensor([sequences[0]])
    with torch.no_grad():
        full = model(ids).logits
        cut = drop_layers(copy.deepcopy(model), keep)(ids).logits
    assert torch.allclose(full, cut, atol=1e-5)


def test_block_distances_refuse_bad_input():
    from alignkit.models.cut import block_distances

    model = build_tiny_model("llama", 40, layers=3)
    for n in (0, 3):
        with pytest.raises(ValueError, match="n must be in"):
            block_distances(model, [[1, 2]], n)
    with pytest.raises(ValueError, match="non-empty"):
        block_distances(model, [[]], 1)

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

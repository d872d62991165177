"""The teacher (models/teacher.py, train/teacher.py): GKD's divergence on a packed batch equals separate
[prompt, response] runs of both models over the full vocabulary, values and gradients; top-k through the packed path;
the teacher loaded frozen (bf16 in a bf16 run) and refused, in one line, where its path does not load or its
vocabulary differs from the student's."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.pack import pack
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.errors import ConfigError
from alignkit.losses import build_options, get_loss
from alignkit.losses.divergence import generalized_jsd
from alignkit.models.logprobs import response_logprobs
from alignkit.models.teacher import check_teacher, load_teacher
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train.loss_inputs import logprob_inputs
from alignkit.train.method import Method
from alignkit.train.teacher import logprobs_and_divergence

TOKENIZER = build_word_tokenizer(VOCABULARY)


def tiny_llama(seed: int, hidden: int = 32, vocab: int | None = None):
    return build_tiny_model("llama", vocab or len(TOKENIZER), seed=seed, hidden=hidden, layers=2, heads=4)


def pairs_batch(tmp_path, n: int = 5):
    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(n, seed=3))
    examples = prepare_examples(str(tmp_path / "pairs.jsonl"), TOKENIZER, ExampleSettings("pairs", 64))
    return examples, pack(examples, max_tokens_per_row=64)  # several rows, several examples a row


def separate_divergence(student, teacher, examples, beta, temperature):
    """The JSD at every response token from one [prompt, response] run of each model, full logits."""
    parts = []
    for example in examples:
        for response in example.response_ids:
            ids = torch.tensor([example.prompt_ids + response])
            predicting = torch.arange(len(example.prompt_ids) - 1, ids.shape[1] - 1)
            student_logps = torch.log_softmax(student(ids).logits[0, predicting] / temperature, -1)
            with torch.no_grad():
                teacher_logps = torch.log_softmax(teacher(ids).logits[0, predicting] / temperature, -1)
            parts.append(generalized_jsd(student_logps, teacher_logps, beta))
    return torch.cat(parts)


@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_packed_divergence_equals_separate_runs_values_and_gradients(tmp_path, beta):
    examples, batch = pairs_batch(tmp_path)
    student, teacher = tiny_llama(0).eval(), tiny_llama(1, hidden=48).eval()  # a wider teacher
    opts = build_options(get_loss("gkd"), {"beta": beta, "temperature": 0.8})
    out, divergence = logprobs_and_divergence(student, batch, (teacher, None), opts, chunk_size=7)
    weights = torch.linspace(0.5, 1.5, len(divergence))
    grads = torch.autograd.grad((divergence * weights).sum(), list(student.parameters()))
    expected = separate_divergence(student, teacher, examples, beta, 0.8)
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(student.parameters()))
    torch.testing.assert_close(divergence, expected, rtol=1e-4, atol=2e-5)
    for mine, reference in zip(grads, expected_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(out.token_logps, response_logprobs(student, batch).token_logps, rtol=0, atol=1e-6)


def test_gkd_inputs_from_a_teacher_and_topk_of_the_whole_vocabulary(tmp_path):
    _, batch = pairs_batch(tmp_path)
    student, teacher = tiny_llama(0), tiny_llama(1).eval()
    spec = get_loss("gkd")
    full = logprob_inputs(student, batch, Method(spec, build_options(spec, {"beta": 0.3}), 7, teacher=teacher), None)
    top = logprob_inputs(student, batch, Method(spec, build_options(spec, {"beta": 0.3, "top_k": len(TOKENIZER)}), 7,
                                                teacher=teacher), None)
    assert full.token_divergence.shape == full.token_mask.shape and full.token_divergence.requires_grad
    assert (full.token_divergence[~full.token_mask] == 0).all() and (full.token_divergence > 0)[full.token_mask].all()
    torch.testing.assert_close(top.token_divergence, full.token_divergence, rtol=1e-4, atol=1e-5)
    few = logprob_inputs(student, batch, Method(spec, build_options(spec, {"beta": 0.3, "top_k": 3}), 7,
                                                teacher=teacher), None)
    assert not torch.allclose(few.token_divergence, full.token_divergence)  # k = 3 is not the whole distribution
    # the student equal to its teacher: zero divergence, zero gradient
    same = logprob_inputs(student, batch, Method(spec, build_options(spec, {}), 7, teacher=copy.deepcopy(student)),
                          None)
    torch.testing.assert_close(same.token_divergence, torch.zeros_like(same.token_divergence), rtol=0, atol=1e-6)


def save(model, path):
    model.save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    return str(path)


def test_teacher_loads_frozen_in_the_run_precision(tmp_path):
    student = tiny_llama(0)
    path = save(tiny_llama(1, hidden=48), tmp_path / "teacher")
    teacher = load_teacher(path, student, TOKENIZER, precision="bf16")
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    linear = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear if m is not teacher.lm_head)
    assert all(m.weight.dtype == torch.float32 for m in
               load_teacher(path, student, TOKENIZER).modules() if isinstance(m, torch.nn.Linear))



def test_teacher_attends_as_the_run_does(tmp_path):
    """The teacher takes the run's attention (packed_sdpa: no dense mask) and scores the packed batch as the
    dense-mask sdpa teacher does."""
    student = tiny_llama(0)
    path = save(tiny_llama(1, hidden=48), tmp_path / "teacher")
    examples, batch = pairs_batch(tmp_path)
    packed = load_teacher(path, student, TOKENIZER, attention="packed_sdpa")
    dense = load_teacher(path, student, TOKENIZER, attention="sdpa")
    assert packed.config._attn_implementation == "packed_sdpa" and dense.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(packed, batch).token_logps,
                                   response_logprobs(dense, batch).token_logps, rtol=0, atol=1e-5)

def test_teacher_refusals_name_the_key(tmp_path):
    student = tiny_llama(0)
    with pytest.raises(ConfigError, match=r"^config key 'teacher': the teacher does not load: .*missing.*no such"):
        load_teacher(str(tmp_path / "missing"), student)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^config key 'teacher': '.*broken' does not load as a causal LM \(.*\); "
                                          "give a model alias"):
        load_teacher(str(tmp_path / "broken"), student)
    other = build_word_tokenizer(VOCABULARY[:-3])
    with pytest.raises(ConfigError, match=r"^config key 'teacher': the teacher's vocabulary has \d+ tokens, the student's \d+"):
        check_teacher(tiny_llama(1, vocab=len(other)), student)
    renamed = build_word_tokenizer([*VOCABULARY[:-1], "zzz"])
    assert len(renamed) == len(TOKENIZER)
    with pytest.raises(ConfigError, match="maps tokens to ids differently"):
        check_teacher(tiny_llama(1), student, renamed, TOKENIZER)
    check_teacher(tiny_llama(1, hidden=48), student, TOKENIZER, TOKENIZER)  # a wider teacher is fine

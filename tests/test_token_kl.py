"""SparsePO's per-token inputs (models/token_kl.py, train/loss_inputs.py): the chunked KL(pi_ref || pi) and token
log-probs against a plain full-vocabulary computation, values and gradients; on a packed batch against separate
[prompt, response] runs of both models; the reference activations at the predicting positions; the mask."""

from __future__ import annotations

import copy

import torch

from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.pack import pack
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.losses import build_options, get_loss
from alignkit.models.logprobs import ChunkSettings, response_logprobs
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.models.token_kl import ChunkedLogpsAndKL, logprobs_and_token_kl, pad_tokens, reference_forward
from alignkit.train.loss_inputs import logprob_inputs
from alignkit.train.method import Method
from alignkit.train.reference import Reference

TOKENIZER = build_word_tokenizer(VOCABULARY)


def naive(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias):
    logps = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    ref_logps = torch.log_softmax(ref_hidden @ ref_weight.T + ref_bias, dim=-1)
    token_logps = logps.gather(1, targets[:, None]).squeeze(1)
    return token_logps, (ref_logps.exp() * (ref_logps - logps)).sum(-1)


def test_chunked_values_and_gradients_equal_the_full_vocabulary_computation():
    generator = torch.Generator().manual_seed(0)
    n, h, v = 13, 8, 29
    policy = [torch.randn(n, h, generator=generator), torch.randn(v, h, generator=generator),
              torch.randn(v, generator=generator)]
    policy = [t.double().requires_grad_() for t in policy]
    ref = [torch.randn(n, h, generator=generator).double(), torch.randn(v, h, generator=generator).double(),
           torch.randn(v, generator=generator).double()]
    targets = torch.randint(0, v, (n,), generator=generator)
    up_lp, up_kl = torch.randn(n, generator=generator).double(), torch.randn(n, generator=generator).double()

    # 4 chunks of up to 4 tokens
    fused = ChunkedLogpsAndKL.apply(*policy, (targets, *ref), ChunkSettings(4, torch.float64))
    fused_grads = torch.autograd.grad((fused[0] * up_lp).sum() + (fused[1] * up_kl).sum(), policy)
    plain = naive(*policy, targets, *ref)
    plain_grads = torch.autograd.grad((plain[0] * up_lp).sum() + (plain[1] * up_kl).sum(), policy)
    for ours, theirs in zip(fused, plain):  # the outputs are float32 (as the token log-probs are)
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(fused_grads, plain_grads):  # the chunk's logits are float32 whatever the inputs
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (fused[1] >= -1e-6).all()


def tiny_llama(seed: int):
    return build_tiny_model("llama", len(TOKENIZER), seed=seed, hidden=32, layers=2, heads=4)


def pairs_batch(tmp_path, n: int = 5):
    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(n, seed=3))
    examples = prepare_examples(str(tmp_path / "pairs.jsonl"), TOKENIZER, ExampleSettings("pairs", 64))
    return examples, pack(examples, max_tokens_per_row=64)  # several rows, several examples a row


def test_packed_token_kl_and_activations_equal_separate_runs(tmp_path):
    examples, batch = pairs_batch(tmp_path)
    policy, reference = tiny_llama(0).eval(), tiny_llama(1).eval()
    out, token_kl = logprobs_and_token_kl(policy, batch, reference_forward(reference, batch))
    with torch.no_grad():
        torch.testing.assert_close(out.token_logps, response_logprobs(policy, batch).token_logps, rtol=0, atol=1e-6)
    activations = reference_forward(reference, batch).activations
    kl_parts, activation_parts = [], []
    for example in examples:
        for response in example.response_ids:
            ids = torch.tensor([example.prompt_ids + response])
            with torch.no_grad():
                logps = torch.log_softmax(policy(ids).logits[0], -1)
                run = reference(ids, output_hidden_states=True)
                ref_logps = torch.log_softmax(run.logits[0], -1)
            predicting = torch.arange(len(example.prompt_ids) - 1, ids.shape[1] - 1)
            kl_parts.append((ref_logps.exp() * (ref_logps - logps)).sum(-1)[predicting])
            activation_parts.append(torch.stack([h[0, predicting].mean(-1) for h in run.hidden_states[1:]], -1))
    torch.testing.assert_close(token_kl.detach(), torch.cat(kl_parts), rtol=0, atol=2e-5)
    torch.testing.assert_close(activations, torch.cat(activation_parts), rtol=0, atol=2e-5)


def test_kl_to_itself_is_zero_with_zero_gradient(tmp_path):
    _, batch = pairs_batch(tmp_path)
    policy = tiny_llama(0)
    _, token_kl = logprobs_and_token_kl(policy, batch, reference_forward(copy.deepcopy(policy), batch))
    torch.testing.assert_close(token_kl.detach(), torch.zeros_like(token_kl), rtol=0, atol=1e-6)
    token_kl.sum().backward()
    assert max(float(p.grad.abs().max()) for p in policy.parameters() if p.grad is not None) < 1e-5


def test_sparsepo_inputs_from_a_live_reference(tmp_path):
    examples, batch = pairs_batch(tmp_path)
    policy, reference = tiny_llama(0), tiny_llama(1).eval()
    spec = get_loss("sparsepo")
    with torch.no_grad():
        seq = response_logprobs(reference, batch).seq_logps
    ref = Reference(seq, [torch.zeros(sum(len(r) for r in e.response_ids)) for e in examples], model=reference)
    inputs = logprob_inputs(policy, batch, Method(spec, build_options(spec, {}), chunk_size=7), ref)
    shape = inputs.token_mask.shape
    assert shape[:2] == (len(examples), 2) and inputs.token_kl.shape == inputs.token_weights.shape == shape
    assert (inputs.token_kl[~inputs.token_mask] == 0).all() and (inputs.token_kl >= -1e-6).all()
    weights = inputs.token_weights[inputs.token_mask]
    assert 0 <= float(weights.min()) and float(weights.max()) <= 1 and float(weights.max()) == 1.0
    assert inputs.token_kl.requires_grad and not inputs.token_weights.requires_grad
    torch.testing.assert_close(pad_tokens(torch.arange(len(batch.token_seq)).float(), batch)[inputs.token_mask],
                               torch.arange(len(batch.token_seq)).float())

    uniform = logprob_inputs(policy, batch, Method(spec, build_options(spec, {"token_weights": "uniform",
                                                                              "use_token_kl": False}), chunk_size=7), ref)
    assert uniform.token_kl is None and torch.equal(uniform.token_weights, uniform.token_mask.float())

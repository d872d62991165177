"""Attention over packed rows. packed_sdpa: SDPA per example span, fed the spans by the packed forward (the
per-span calls are counted), equal to sdpa over the whole row. FlexAttention: its mask is the packer's rule
element for element, it skips the blocks no query may see, and through HF's flex_attention it gives the same
log-probs as sdpa. (Equality with separate unpacked runs, for every implementation: test_pack_logprobs.py.)"""

from __future__ import annotations

import pytest
import torch

from alignkit.data.pack import block_mask, pack
from alignkit.data.tokenize import TokenizedExample
from alignkit.models.attention import (
    default_row_tokens,
    example_spans,
    flex_block_mask,
    packed_mask_mod,
    set_attention,
)
from alignkit.models.logprobs import response_logprobs
from alignkit.models.tiny import build_tiny_model
from test_pack_logprobs import VOCAB, random_examples

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def logps_and_grads(model, batch):
    """Response log-probs of the packed batch and every parameter's gradient of a fixed weighting of them."""
    model.zero_grad()
    logps = response_logprobs(model, batch).token_logps
    (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
    return logps.detach(), [p.grad.clone() for p in model.parameters()]


def test_example_spans_follow_the_rows():
    examples = random_examples(7, 2, seed=5)
    batch = pack(examples, max_tokens_per_row=3 * max(e.num_tokens for e in examples))
    spans = example_spans(batch)
    assert sum(len(row) for row in spans) == len(examples)
    for r, row in enumerate(spans):
        for start, end in row:
            ids = batch.example_ids[r, start:end]
            assert (ids == ids[0]).all() and ids[0] >= 0
            assert end - start == examples[int(ids[0])].num_tokens
        used = row[-1][1]
        assert (batch.example_ids[r, used:] < 0).all()  # only padding after the last span


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_packed_sdpa_runs_per_prompt_and_responses_and_equals_sdpa(family, monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    model = build_tiny_model(family, VOCAB, seed=1, hidden=32, layers=2, heads=4).eval()
    examples = random_examples(6, 2, seed=3, max_prompt=20, max_response=12)
    batch = pack(examples, max_tokens_per_row=96)
    assert batch.input_ids.shape[0] < len(examples)  # several examples share a row

    expected, expected_grads = logps_and_grads(model, batch)
    calls.clear()
    set_attention(model, "packed_sdpa")
    got, grads = logps_and_grads(model, batch)
    # per layer and example: one causal call over the prompt, one for all its responses' queries
    per_example = [n for e in examples for n in (len(e.prompt_ids), sum(map(len, e.response_ids)))]
    assert sorted(calls) == sorted(per_example * 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_long_responses_attend_in_chunks_and_still_equal_sdpa(monkeypatch):
    """Long responses (a record's k conversations): each chunk of consecutive responses, closed once it holds
    RESPONSE_CHUNK tokens, attends to [prompt; itself] only, and log-probs and gradients equal dense sdpa's."""
    from alignkit.models import attention

    rng = torch.Generator().manual_seed(4)

    def tokens(n):
        return torch.randint(1, VOCAB, (n,), generator=rng).tolist()

    examples = [TokenizedExample(tokens(17), [tokens(30), tokens(45)]), TokenizedExample(tokens(9), [tokens(20),
                                                                                                  tokens(25)])]
    examples.append(TokenizedExample(examples[0].prompt_ids, [tokens(12), tokens(50)]))
    batch = pack(examples, max_tokens_per_row=400)
    model = build_tiny_model("llama", VOCAB, seed=1, hidden=32, layers=2, heads=4)

    def chunks():
        spans = attention.packed_attention_kwargs(model, batch)[attention.SPANS_KWARG]
        return [[(lo, hi) for lo, hi, _ in span[3]] for row in spans for span in row]

    expected, expected_grads = logps_and_grads(model, batch)
    set_attention(model, "packed_sdpa")
    monkeypatch.setattr(attention, "RESPONSE_CHUNK", 200)  # every example's responses in one call
    assert chunks() == [[(17, 92)], [(9, 54)], [(17, 79)]]
    monkeypatch.setattr(attention, "RESPONSE_CHUNK", 25)  # 30 | 45; 20 + 25; 12 + 50
    assert chunks() == [[(17, 47), (47, 92)], [(9, 54)], [(17, 79)]]
    monkeypatch.setattr(attention, "RESPONSE_CHUNK", 10)  # one response per call
    assert chunks() == [[(17, 47), (47, 92)], [(9, 29), (29, 54)], [(17, 29), (29, 79)]]
    got, grads = logps_and_grads(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_packed_sdpa_without_spans_refuses_the_placeholder_mask():
    """A model whose layers drop the spans must fail loudly, not attend without a mask."""
    from alignkit.models.attention import packed_sdpa_forward

    model = build_tiny_model("llama", VOCAB, seed=1, hidden=16, layers=1, heads=2)
    attention, config = model.model.layers[0].self_attn, model.config
    head_dim = config.hidden_size // config.num_attention_heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, config.num_attention_heads, 5, head_dim, generator=g)
    kv = torch.randn(1, config.num_key_value_heads, 5, head_dim, generator=g)
    placeholder = torch.zeros(()).expand(1, 1, 5, 5)
    with pytest.raises(RuntimeError, match="spans"):
        packed_sdpa_forward(attention, q, kv, kv, placeholder)
    out, _ = packed_sdpa_forward(attention, q, kv, kv, torch.zeros(1, 1, 5, 5))  # a real mask: plain sdpa
    assert out.shape == (1, 5, config.num_attention_heads, head_dim)


def test_row_length_policy():
    assert default_row_tokens(None, "packed_sdpa", 4096) == 4096  # long rows cost nothing extra
    assert default_row_tokens(None, "flex_attention", 4096) == 4096
    assert default_row_tokens(None, "sdpa", 4096) is None  # the packer keeps rows to the longest example
    assert default_row_tokens(300, "packed_sdpa", 4096) == 300
    examples = random_examples(6, 2, seed=2)
    longest = max(e.num_tokens for e in examples)
    batch = pack(examples, max_tokens_per_row=None)
    assert batch.input_ids.shape[1] == longest


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mask_mod_is_the_packers_rule(k):
    batch = pack(random_examples(7, k, seed=k), max_tokens_per_row=40)
    rows, length = batch.input_ids.shape
    dense = flex.create_mask(packed_mask_mod(batch, "cpu"), rows, 1, length, length, device="cpu")[:, 0]
    expected = block_mask(batch.example_ids, batch.segment_ids)
    assert dense.shape == expected.shape
    assert torch.equal(dense, expected)


def test_block_mask_skips_other_examples_blocks():
    """Eight examples of 64 tokens in one 512-token row, 64-token blocks: a dense causal mask would compute
    36 of the 64 blocks; only the 8 diagonal blocks (each example with itself) are needed."""
    from alignkit.data.tokenize import TokenizedExample

    examples = [TokenizedExample([1 + i] * 32, [[2] * 16, [3] * 16]) for i in range(8)]
    batch = pack(examples, max_tokens_per_row=512)
    assert batch.input_ids.shape == (1, 512)
    mask = flex_block_mask(batch, "cpu", block_size=64)
    computed = mask.to_dense()[0, 0]  # [8, 8] 1 where a block is (partly or fully) computed
    assert torch.equal(computed, torch.eye(8, dtype=computed.dtype))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU")])])
def test_flex_attention_log_probs_and_grads_equal_sdpa(device):
    """HF's flex_attention (compiled on first use) over the BlockMask == sdpa over the dense mask, in the
    log-probs and (on GPU: torch has no CPU backward for FlexAttention) in the gradients of the weights."""
    model = build_tiny_model("llama", VOCAB, seed=1, hidden=32, layers=2, heads=4).eval().to(device)
    batch = pack(random_examples(6, 2, seed=3, max_prompt=20, max_response=12), max_tokens_per_row=96)
    assert batch.input_ids.shape[0] < batch.num_examples  # several examples share a row

    def logps_and_grads():
        model.zero_grad()
        if device == "cpu":
            with torch.no_grad():
                return response_logprobs(model, batch).token_logps, []
        logps = response_logprobs(model, batch).token_logps
        (logps * torch.linspace(-1, 1, len(logps), device=device)).sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters()]

    expected, expected_grads = logps_and_grads()
    set_attention(model, "flex_attention")
    got, grads = logps_and_grads()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_flex_attention_training_on_cpu_is_refused(tmp_path):
    from alignkit.config import TrainConfig
    from alignkit.errors import ConfigError
    from alignkit.train.loop import train

    model = build_tiny_model("llama", VOCAB, seed=1, hidden=16, layers=1, heads=2)
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cfg = TrainConfig(model="tiny", train_data=str(data), output_dir=str(tmp_path / "out"), attention="flex_attention")
    with pytest.raises(ConfigError, match="attention"):
        train(cfg, model, tokenizer=None)
    assert not (tmp_path / "out").exists()


def test_unknown_attention_is_refused():
    model = build_tiny_model("llama", VOCAB, seed=1, hidden=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="attention 'flash'"):
        set_attention(model, "flash")


def test_packed_sdpa_saves_no_length_squared_tensor_for_backward():
    """A 600-token prompt with two responses: under packed_sdpa no tensor kept for backward has L^2 elements
    (the prompt ran through the flash kernel, each response against [prompt; itself]); under dense sdpa the
    [L, L] mask and probabilities are there, so the check can see them."""
    model = build_tiny_model("llama", VOCAB, seed=1, hidden=32, layers=2, heads=4)
    rng = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, VOCAB, (600,), generator=rng).tolist()
    example = TokenizedExample(prompt, [torch.randint(1, VOCAB, (n,), generator=rng).tolist() for n in (9, 14)])
    batch = pack([example], max_tokens_per_row=1024)
    length = example.num_tokens

    def largest_saved(implementation: str) -> int:
        set_attention(model, implementation)
        sizes = []

        def pack_hook(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            logps = response_logprobs(model, batch).seq_logps
        logps.sum().backward()
        return max(sizes)

    assert largest_saved("sdpa") >= length * length
    assert largest_saved("packed_sdpa") < length * length // 8

"""The FlexAttention path for packed rows: its mask is the packer's rule element for element, it skips the
blocks no query may see, and (run through HF's flex_attention) it gives the same log-probs as sdpa."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.pack import block_mask, pack
from alignkit.models.attention import flex_block_mask, packed_mask_mod, set_attention
from alignkit.models.logprobs import response_logprobs
from alignkit.models.tiny import build_tiny_model
from test_pack_logprobs import VOCAB, random_examples

flex = pytest.importorskip("torch.nn.attention.flex_attention")


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
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
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

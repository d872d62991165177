"""adam_moments: bf16 (train/bf16_moments.py): AdamW's two moments held in bf16, the update in fp32. Checked against a
NumPy transcription of AdamW (Loshchilov & Hutter, torch's decoupled form) that rounds both moments to bf16 after
each step; chunking is exact; a checkpoint round trip keeps the moments bf16 and the run exact; the config wires
it, halves the optimizer state and the memory planner counts it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from alignkit.config import OptimConfig
from alignkit.train import bf16_moments, loop, memory
from alignkit.train.bf16_moments import Bf16MomentsAdamW
from alignkit.train.distributed import Dist
from alignkit.train.logging import read_metrics
from alignkit.train.step import make_optimizer
from test_train import (
    TOKENIZER,
    Interrupt,
    assert_same_weights,
    dpo_config,
    interrupt_at_step,
    step_values,
    tiny_llama,
    write_pairs,
)

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 (ties to even), kept as float32."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def numpy_adamw(p, grads, round_moments: bool):
    """AdamW: p <- p (1 - lr wd); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps); then, if asked, the moments are stored
    rounded to bf16 (the step itself used them unrounded)."""
    p, m, v = p.astype(np.float64), np.zeros_like(p, np.float64), np.zeros_like(p, np.float64)
    b1, b2 = BETAS
    for t, g in enumerate(grads, start=1):
        p = p * (1 - LR * WD)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - LR / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + EPS)
        if round_moments:
            m, v = to_bf16(m).astype(np.float64), to_bf16(v).astype(np.float64)
    return p, m, v


def run_torch(shape, grads, chunk, monkeypatch, device="cpu"):
    monkeypatch.setattr(bf16_moments, "CHUNK", chunk)
    start = torch.from_numpy(np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32)).view(shape)
    param = torch.nn.Parameter(start.to(device))
    opt = Bf16MomentsAdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for g in grads:
        param.grad = torch.from_numpy(g.astype(np.float32)).view(shape).to(device)
        opt.step()
    state = opt.state[param]
    return param.detach().cpu().numpy().ravel(), state["exp_avg"].cpu(), state["exp_avg_sq"].cpu()


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])  # CUDA: torch's fused CUDA kernel under the same chunks
@pytest.mark.parametrize("shape", [(1000,), (37, 13)])
def test_equals_numpy_adamw_with_bf16_rounded_moments(shape, device, monkeypatch):
    rng = np.random.default_rng(0)
    n = int(np.prod(shape))
    grads = [rng.normal(size=n).astype(np.float32) * 10.0 ** rng.integers(-3, 1) for _ in range(6)]
    start = np.linspace(-1, 1, n, dtype=np.float32)
    # a chunk of 64 elements: several chunks per parameter, so a step counted per chunk would show
    params, exp_avg, exp_avg_sq = run_torch(shape, grads, 64, monkeypatch, device)
    assert exp_avg.dtype == exp_avg_sq.dtype == torch.bfloat16
    ref_p, ref_m, ref_v = numpy_adamw(start, grads, round_moments=True)
    wide_p, _, _ = numpy_adamw(start, grads, round_moments=False)
    for ours, ref in ((exp_avg, ref_m), (exp_avg_sq, ref_v)):
        ours = ours.float().numpy().ravel()
        assert np.mean(ours == ref.astype(np.float32)) > 0.99  # bit-equal but for the odd tie of a rounding
        np.testing.assert_allclose(ours, ref, rtol=2 ** -7, atol=1e-30)  # within one bf16 step everywhere
    # a moment's rounding tie that went the other way moves its weight by about lr / 2^8 in the later steps
    gap = np.abs(params - ref_p)
    assert np.quantile(gap, 0.99) < 2e-6 and gap.max() < LR * 2 ** -6
    # the rounding is what the reference sees: with unrounded moments the weights end measurably elsewhere
    assert np.median(np.abs(wide_p - ref_p)) > 10 * np.median(gap)


def test_chunking_changes_nothing(monkeypatch):
    """Bit for bit, with chunks a multiple of the kernel's vector width (CHUNK is): the same elements take the
    vector path and the scalar tail either way."""
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=5000).astype(np.float32) for _ in range(3)]
    whole = run_torch((5000,), grads, 1 << 20, monkeypatch)
    chunked = run_torch((5000,), grads, 64, monkeypatch)
    for a, b in zip(whole, chunked):
        assert np.array_equal(np.asarray(a if isinstance(a, np.ndarray) else a.float()),
                              np.asarray(b if isinstance(b, np.ndarray) else b.float()))


def test_a_state_dict_round_trip_keeps_the_moments_bf16_and_the_updates_exact():
    torch.manual_seed(0)
    grads = [torch.randn(300) for _ in range(5)]
    straight = torch.nn.Parameter(torch.randn(300))
    start = straight.detach().clone()
    opt = Bf16MomentsAdamW([straight], lr=LR, weight_decay=WD)
    for g in grads:
        straight.grad = g.clone()
        opt.step()

    first = torch.nn.Parameter(start.clone())
    opt = Bf16MomentsAdamW([first], lr=LR, weight_decay=WD)
    for g in grads[:3]:
        first.grad = g.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = torch.nn.Parameter(first.detach().clone())
    opt = Bf16MomentsAdamW([resumed], lr=LR, weight_decay=WD)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt.state[resumed]["exp_avg"].dtype == torch.bfloat16  # torch's load casts to fp32; put back
    for g in grads[3:]:
        resumed.grad = g.clone()
        opt.step()
    assert torch.equal(resumed, straight)


def test_the_config_picks_it():
    """Two ranks, DDP and FSDP2: tests/test_distributed.py::test_an_option_under_two_processes_equals_one."""
    params = [torch.nn.Parameter(torch.zeros(4))]
    assert type(make_optimizer(params, OptimConfig(adam_moments="bf16"), Dist())) is Bf16MomentsAdamW
    assert type(make_optimizer(params, OptimConfig(), Dist())) is torch.optim.AdamW
    with pytest.raises(ValueError, match="adam_moments"):
        OptimConfig(adam_moments="fp16")
    with pytest.raises(ValueError, match="amsgrad"):
        Bf16MomentsAdamW(params, amsgrad=True)


def test_the_memory_planner_counts_two_bytes_a_moment():
    model = tiny_llama()
    n = sum(p.numel() for p in model.parameters())
    assert memory.static_bytes(model, moment_bytes=2) == 4 * n + 8 * n


def test_a_training_run_holds_half_the_state_and_resumes_exactly(tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "pairs.jsonl", 48, seed=3)
    settings = dict(max_steps=4, save_every=2, keep_last=2, max_tokens_per_batch=200, adam_moments="bf16")
    straight = loop.train(dpo_config(tmp_path / "straight", data, **settings), tiny_llama(), TOKENIZER)
    state = torch.load(tmp_path / "straight" / "checkpoints" / "step-00000002" / "trainer.pt", weights_only=True)
    moments = [s[k] for s in state["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)

    fp32 = loop.train(dpo_config(tmp_path / "fp32", data, **{**settings, "adam_moments": "fp32"}), tiny_llama(),
                      TOKENIZER)
    assert step_values(read_metrics(tmp_path / "fp32"))[0] == step_values(read_metrics(tmp_path / "straight"))[0]
    with pytest.raises(AssertionError):  # the rounding reaches the weights
        assert_same_weights(fp32.model, straight.model)

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        with pytest.raises(Interrupt):
            loop.train(dpo_config(interrupted, data, **settings), tiny_llama(), TOKENIZER)
    resumed = loop.train(dpo_config(interrupted, data, **settings), tiny_llama(), TOKENIZER)
    assert step_values(read_metrics(interrupted)) == step_values(read_metrics(tmp_path / "straight"))
    assert_same_weights(resumed.model, straight.model)

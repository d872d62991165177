"""Deep safety alignment's token-wise constrained SFT (arXiv 2406.05946, Eq. 3): the loss equals a NumPy computation
of the paper's formula with the paper's position-wise beta_t; with every beta_t = 0 it is plain SFT, in value and
gradient, and a training run with it takes the same steps as `loss: sft`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignkit.config import TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY, sft_records
from alignkit.errors import ConfigError
from alignkit.losses import LossInputs
from alignkit.losses.registry import get_loss
from alignkit.losses.sft import ConstrainedSFTOptions, SFTOptions, constrained_sft_loss, sft_loss
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train.loop import train

LENGTHS = [7, 3, 1]


def inputs(seed: int = 0) -> LossInputs:
    generator = torch.Generator().manual_seed(seed)
    T = max(LENGTHS)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENGTHS])[:, None]
    logps = (-torch.rand(len(LENGTHS), 1, T, generator=generator, dtype=torch.float64) * 3) * mask
    ref = (-torch.rand(len(LENGTHS), 1, T, generator=generator, dtype=torch.float64) * 3) * mask
    return LossInputs(logps=logps.sum(-1), lengths=mask.sum(-1).double(), ref_logps=ref.sum(-1), token_logps=logps,
                      ref_token_logps=ref, token_mask=mask)


def numpy_loss(logps, ref, lengths, betas_of):
    """Per sequence: (1/|y|) sum_t -(2/beta_t) log sigmoid(beta_t (log pi - log pi_0)), beta_t = 0 -> -log pi."""
    out = []
    for row, ref_row, n in zip(logps, ref, lengths):
        total = 0.0
        for t in range(n):
            beta, d = betas_of(t + 1), row[t] - ref_row[t]
            total += -row[t] if beta == 0 else -(2 / beta) * np.log(1 / (1 + np.exp(-beta * d)))
        out.append(total / n)
    return np.array(out)


def test_equals_numpy_with_the_papers_betas():
    x = inputs()
    loss, metrics = constrained_sft_loss(x, ConstrainedSFTOptions())

    def paper(t):  # beta_1 = 0.5, beta_t = 2 for 2 <= t <= 5, 0.1 after
        return 0.5 if t == 1 else 2.0 if t <= 5 else 0.1

    expected = numpy_loss(x.token_logps[:, 0].numpy(), x.ref_token_logps[:, 0].numpy(), LENGTHS, paper)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12)
    custom = ConstrainedSFTOptions(betas=[0.0, 3.0], beta_rest=0.7)
    expected = numpy_loss(x.token_logps[:, 0].numpy(), x.ref_token_logps[:, 0].numpy(), LENGTHS,
                          lambda t: [0.0, 3.0][t - 1] if t <= 2 else 0.7)
    np.testing.assert_allclose(constrained_sft_loss(x, custom)[0].numpy(), expected, rtol=1e-12)
    sft_nll, _ = sft_loss(x, SFTOptions())
    torch.testing.assert_close(metrics["nll"], sft_nll)


def test_zero_betas_are_plain_sft_in_value_and_gradient():
    x = inputs(1)
    x.token_logps.requires_grad_(True)
    zero, _ = constrained_sft_loss(x, ConstrainedSFTOptions(betas=[], beta_rest=0.0))
    (grad_constrained,) = torch.autograd.grad(zero.sum(), x.token_logps)
    plain_inputs = LossInputs(logps=(x.token_logps * x.token_mask).sum(-1), lengths=x.lengths)
    plain, _ = sft_loss(plain_inputs, SFTOptions())
    (grad_plain,) = torch.autograd.grad(plain.sum(), x.token_logps)
    torch.testing.assert_close(zero, plain)
    torch.testing.assert_close(grad_constrained, grad_plain)
    # a small beta_t approaches the same gradient (the limit the beta_t = 0 case takes)
    x.token_logps.grad = None
    small, _ = constrained_sft_loss(x, ConstrainedSFTOptions(betas=[], beta_rest=1e-6))
    (grad_small,) = torch.autograd.grad(small.sum(), x.token_logps)
    torch.testing.assert_close(grad_small, grad_plain, rtol=0, atol=1e-5)


def test_bad_betas_are_named():
    with pytest.raises(ConfigError, match="betas"):
        ConstrainedSFTOptions(betas=[0.5, -1.0])
    with pytest.raises(ConfigError, match="beta_rest"):
        ConstrainedSFTOptions(beta_rest=float("nan"))
    assert get_loss("sft_constrained").needs_reference and get_loss("sft_constrained").needs_token_logps


def test_training_with_zero_betas_takes_the_sft_steps(tmp_path, one_thread):
    tokenizer = build_word_tokenizer(VOCABULARY)
    write_jsonl_atomic(tmp_path / "sft.jsonl", sft_records(24, seed=2))
    common = dict(model="tiny", max_length=64, max_tokens_per_row=512, max_tokens_per_batch=300, progress=False,
                  seed=0, learning_rate=3e-3, max_steps=3, ref_cache=False, train_data=str(tmp_path / "sft.jsonl"))
    runs = {}
    for name, loss, options in (("sft", "sft", {}), ("zero", "sft_constrained", {"betas": [], "beta_rest": 0.0}),
                                ("paper", "sft_constrained", {})):
        model = build_tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2)
        train(TrainConfig(output_dir=str(tmp_path / name), loss=loss, loss_options=options, **common), model,
              tokenizer)
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line]
    assert len(runs["sft"]) == 3
    np.testing.assert_allclose(runs["zero"], runs["sft"], rtol=1e-5)
    assert not np.allclose(runs["paper"], runs["sft"], rtol=1e-3)

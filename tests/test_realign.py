"""DeRa (arXiv 2402.02992): sampling from softmax(lambda z_aligned + (1 - lambda) z_reference) in the hf and fast
engines. lambda = 1 decodes the aligned model's tokens and lambda = 0 the reference's (greedy, token for token); the
log-probs the engines return equal a NumPy computation of the mixed distribution on the sampled tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignkit.config import SamplingOptions
from alignkit.errors import ConfigError
from alignkit.generate.engines import FastEngine, HFEngine
from alignkit.generate.realign import RealignOptions, realigned_engine
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.recipes.decoding import run_decode, run_generate

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [f"w{i}" for i in range(40)]
PROMPTS = [[8, 9, 10], [11, 12, 13, 14, 15, 16], [17]]  # unequal lengths: left padding is exercised


@pytest.fixture(scope="module")
def pair():
    tokenizer = build_word_tokenizer(WORDS)
    aligned = build_tiny_model("llama", len(tokenizer), seed=1, hidden=32, layers=2).eval()
    reference = build_tiny_model("llama", len(tokenizer), seed=2, hidden=32, layers=2).eval()
    return aligned, reference, tokenizer


def _engine(kind, model, tokenizer, realign=None):
    return (FastEngine(model, tokenizer, realign=realign) if kind == "fast"
            else HFEngine(model, tokenizer, realign=realign))


@pytest.mark.parametrize("kind", ["hf", "fast"])
def test_lambda_one_is_the_aligned_model_and_zero_the_reference(pair, kind):
    aligned, reference, tokenizer = pair
    greedy = SamplingOptions(max_new_tokens=12, temperature=0, engine=kind)
    alone = {name: _engine(kind, m, tokenizer).generate(PROMPTS, greedy).ids
             for name, m in (("aligned", aligned), ("reference", reference))}
    assert alone["aligned"] != alone["reference"]  # the two models decode differently, so the test can fail
    for lam, name in ((1.0, "aligned"), (0.0, "reference")):
        mixed = _engine(kind, aligned, tokenizer, realign=(reference, lam)).generate(PROMPTS, greedy).ids
        assert mixed == alone[name], (lam, kind)
    halfway = _engine(kind, aligned, tokenizer, realign=(reference, 0.5)).generate(PROMPTS, greedy).ids
    assert halfway != alone["aligned"] or halfway != alone["reference"]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_mixed_logps(aligned, reference, prompt, response, lam, temperature):
    """log softmax((lam z_aligned + (1 - lam) z_reference) / T) of each response token, each model run on the
    unpadded [prompt, response] alone."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        z_aligned, z_reference = (m(ids).logits[0].double().numpy() for m in (aligned, reference))
    z = (lam * z_aligned + (1 - lam) * z_reference) / temperature
    logps = _log_softmax(z[len(prompt) - 1:-1])
    return logps[np.arange(len(response)), response]


@pytest.mark.parametrize("kind", ["hf", "fast"])
@pytest.mark.parametrize("lam,temperature", [(0.5, 1.0), (1.5, 0.7), (0.25, 0.0)])
def test_mixed_logprobs_equal_numpy(pair, kind, lam, temperature):
    aligned, reference, tokenizer = pair
    sampling = SamplingOptions(max_new_tokens=10, temperature=temperature, engine=kind)
    engine = _engine(kind, aligned, tokenizer, realign=(reference, lam))
    out = engine.generate(PROMPTS, sampling, num_samples=2 if temperature else 1, seed=5)  # HF: greedy gives one
    for prompt, samples, logps in zip(PROMPTS, out.ids, out.logprobs):
        for ids, lp in zip(samples, logps):
            expected = numpy_mixed_logps(aligned, reference, prompt, ids, lam, temperature or 1.0)
            np.testing.assert_allclose(lp, expected, rtol=0, atol=1e-4)


def test_realigned_engine_choice_and_errors(pair):
    aligned, reference, tokenizer = pair
    assert isinstance(realigned_engine(aligned, reference, tokenizer, SamplingOptions(), 0.5), FastEngine)
    assert isinstance(realigned_engine(aligned, reference, tokenizer, SamplingOptions(engine="hf"), 0.5), HFEngine)
    for engine in (realigned_engine(aligned, reference, tokenizer, SamplingOptions(engine=e), 0.5) for e in ("hf", "fast")):
        assert not engine.exact_logprobs  # the mixed distribution's log-probs are not the trainer's
    assert FastEngine(aligned, tokenizer).exact_logprobs and HFEngine(aligned, tokenizer).exact_logprobs
    with pytest.raises(ConfigError, match="realign.*vllm"):
        realigned_engine(aligned, reference, tokenizer, SamplingOptions(engine="vllm"), 0.5)
    other = build_tiny_model("llama", len(tokenizer) + 3, seed=3, hidden=32, layers=2)
    with pytest.raises(ConfigError, match="realign.reference.*vocabulary"):
        realigned_engine(aligned, other, tokenizer, SamplingOptions(), 0.5)
    with pytest.raises(ValueError, match="lambda"):
        RealignOptions.model_validate({"reference": "x", "lambda": -1})


def test_generate_and_decode_realign_from_the_cli(pair, tmp_path):
    aligned, reference, tokenizer = pair
    for name, model in (("aligned", aligned), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["w1 w2 w3", "w4 w5"]))
    common = {"prompts": str(prompts), "max_new_tokens": 8, "temperature": 0}

    def completions(out_dir, **keys):
        path = run_generate(overrides={**common, "output_dir": str(tmp_path / out_dir), **keys})
        return [json.loads(line)["completion"] for line in path.read_text().splitlines()]

    reference_alone = completions("ref", model=str(tmp_path / "reference"))
    realigned = completions("mix0", model=str(tmp_path / "aligned"),
                            realign={"reference": str(tmp_path / "reference"), "lambda": 0})
    assert realigned == reference_alone
    assert completions("mix1", model=str(tmp_path / "aligned"),
                       realign={"reference": str(tmp_path / "reference"), "lambda": 1}) != reference_alone
    with pytest.raises(ConfigError, match="realign.*args"):
        run_decode(overrides={**common, "method": "args", "model": str(tmp_path / "aligned"),
                              "output_dir": str(tmp_path / "d"), "realign": {"reference": "x", "lambda": 0.5}})

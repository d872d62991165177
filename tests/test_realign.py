"""DeRa (arXiv 2402.02992): sampling from softmax(lambda z_aligned + (1 - lambda) z_reference) in the hf and fast
engines. lambda = 1 decodes the aligned model's tokens and lambda = 0 the reference's (greedy, token for token); the
log-probs the engines return equal a NumPy computation of the mixed distribution on the sampled tokens; eval's
lambda sweep reports KL 0 at lambda 0 and the aligned model's own log-ratio at lambda 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignkit.config import SamplingOptions
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.eval.evaluate import run_eval
from alignkit.generate.engines import FastEngine, HFEngine, encode_prompts
from alignkit.generate.realign import RealignOptions, realigned_engine
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.recipes.decoding import run_decode, run_generate
from alignkit.train.packing import Packing
from alignkit.train.reference import score_examples

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


def test_eval_realign_sweep(pair, tmp_path):
    aligned, reference, tokenizer = pair
    for name, model in (("aligned", aligned), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 2}"}) + "\n" for i in range(6)))
    common = {"model": str(tmp_path / "aligned"), "reference": str(tmp_path / "reference"), "prompts": str(prompts),
              "max_new_tokens": 6, "reward": "length", "seed": 3}
    result = run_eval(overrides={**common, "realign_sweep": "0,1", "output_dir": str(tmp_path / "eval")})
    rows = result["summary"]["realign_sweep"]
    assert [r["lambda"] for r in rows] == [0.0, 1.0]
    assert abs(rows[0]["kl"]) < 1e-4  # lambda 0 samples the reference itself
    # lambda 1: the aligned model's own samples (same seed), their log-ratio to the reference scored directly
    sampling = SamplingOptions(max_new_tokens=6)
    prompt_ids = encode_prompts(tokenizer, [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()])
    own = FastEngine(aligned, tokenizer).generate(prompt_ids, sampling, 1, 3)
    examples = [TokenizedExample(p, [s[0]]) for p, s in zip(prompt_ids, own.ids)]
    packing = Packing(4096, 1024, tokenizer.pad_token_id)
    ratios = score_examples(aligned, examples, packing)[0][:, 0] - score_examples(reference, examples, packing)[0][:, 0]
    assert rows[1]["kl"] == pytest.approx(float(ratios.mean()), abs=1e-3)
    assert rows[1]["tokens"] == pytest.approx(np.mean([len(s[0]) for s in own.ids]))
    assert (tmp_path / "eval" / "realign_sweep.png").exists()
    assert "DeRa sweep" in (tmp_path / "eval" / "report.html").read_text()
    with pytest.raises(ConfigError, match="realign_sweep"):
        run_eval(overrides={**common, "realign_sweep": "0,x", "output_dir": str(tmp_path / "bad")})

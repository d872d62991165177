"""LOGO and LongPO (losses/long_context.py) against NumPy transcriptions of the papers' objectives as the authors'
code computes them (LOGO: arXiv 2410.18533 eq. 2-3, ZetangForward/Long-Context-Alignment training/logo_train.py;
LongPO: arXiv 2502.13922 eq. 12 and 14, DAMO-NLP-SG/LongPO train/longdpo_trainer.py); LOGO with one rejection and
no NLL is SimPO; the `rejections` data shape and LongPO's `short_prompt` load, tokenize and fail with named
errors; and the loop scores LongPO's reference on the short context."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import load_records, write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY
from alignkit.errors import ConfigError, DataError
from alignkit.losses import LossInputs, build_options, get_loss
from alignkit.losses.long_context import LOGOOptions, LongPOOptions, logo_loss, longpo_loss
from alignkit.losses.reference_free import SimPOOptions, simpo_loss
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def batch(m: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, (6, 1 + m)).astype(np.float64)
    logps = -lengths * rng.uniform(0.5, 3.0, lengths.shape)
    return logps, lengths


def np_logo(logps, lengths, beta, gamma, lam):
    """eq. 2 with each response's length-normalised log-prob, the M rejections averaged inside the sigmoid, plus
    lambda times the token-mean NLL of the chosen responses (the code's CrossEntropyLoss over the batch)."""
    avg = logps / lengths
    z = beta * avg[:, 0] - beta * avg[:, 1:].mean(1) - gamma
    nll = -logps[:, 0].sum() / lengths[:, 0].sum()  # the batch's token-mean
    return -np_logsigmoid(z).mean() + lam * nll, -np_logsigmoid(z)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("beta, gamma, lam", [(10.0, 3.0, 0.1), (2.5, 0.25, 0.0), (3.0, 0.6, 1.0)])
def test_logo_equals_numpy(m, beta, gamma, lam):
    logps, lengths = batch(m, seed=m)
    policy = torch.tensor(logps, requires_grad=True)
    losses, metrics = logo_loss(LossInputs(logps=policy, lengths=torch.tensor(lengths)), LOGOOptions(beta=beta, gamma=gamma, sft_weight=lam))
    expected, preference = np_logo(logps, lengths, beta, gamma, lam)
    assert float(losses.mean()) == pytest.approx(expected, rel=1e-10)
    if lam == 0:
        np.testing.assert_allclose(losses.detach().numpy(), preference, rtol=1e-10)
    np.testing.assert_allclose(metrics["rewards/chosen"].numpy(), beta * logps[:, 0] / lengths[:, 0])
    np.testing.assert_allclose(metrics["rewards/rejected"].numpy(), beta * (logps[:, 1:] / lengths[:, 1:]).mean(1))
    # the gradient equals autograd of the NumPy form written in torch
    losses.mean().backward()
    naive = torch.tensor(logps, requires_grad=True)
    n = torch.tensor(lengths)
    avg = naive / n
    z = beta * avg[:, 0] - beta * avg[:, 1:].mean(1) - gamma
    (-torch.nn.functional.logsigmoid(z).mean() + lam * -naive[:, 0].sum() / n[:, 0].sum()).backward()
    torch.testing.assert_close(policy.grad, naive.grad, rtol=1e-10, atol=1e-12)


def test_logo_with_one_rejection_and_no_nll_is_simpo():
    logps, lengths = batch(1, seed=7)
    inputs = LossInputs(logps=torch.tensor(logps), lengths=torch.tensor(lengths))
    logo, _ = logo_loss(inputs, LOGOOptions(beta=2.0, gamma=0.5, sft_weight=0.0))
    simpo, _ = simpo_loss(inputs, SimPOOptions(beta=2.0, gamma_beta_ratio=0.25))
    torch.testing.assert_close(logo, simpo, rtol=1e-12, atol=1e-12)


def test_logo_options_and_columns_are_checked():
    spec = get_loss("logo")
    assert spec.data_shape == "rejections" and not spec.needs_reference
    with pytest.raises(ConfigError, match="beta"):
        build_options(spec, {"beta": 0.0})
    with pytest.raises(ConfigError, match="sft_weight"):
        build_options(spec, {"sft_weight": -1.0})
    with pytest.raises(ValueError, match="at least one rejection"):
        logo_loss(LossInputs(logps=torch.zeros(2, 1), lengths=torch.ones(2, 1)), LOGOOptions())


def np_longpo(logps, ref_short, lengths, beta, lam, nll):
    """eq. 14: NLL + lambda * eq. 12's DPO term, the reference's log-probs taken with the short context."""
    h = (logps[:, 0] - ref_short[:, 0]) - (logps[:, 1] - ref_short[:, 1])
    dpo = -np_logsigmoid(beta * h)
    per_example_nll = -logps[:, 0] * len(logps) / lengths[:, 0].sum()  # batch mean = the token-mean NLL
    return lam * dpo + (per_example_nll if nll else 0.0)


@pytest.mark.parametrize("beta, lam, nll", [(0.1, 0.01, True), (0.01, 0.1, True), (0.5, 1.0, False)])
def test_longpo_equals_numpy(beta, lam, nll):
    logps, lengths = batch(1, seed=3)
    ref_short = logps + np.random.default_rng(4).normal(0, 3, logps.shape)
    policy = torch.tensor(logps, requires_grad=True)
    losses, metrics = longpo_loss(LossInputs(logps=policy, lengths=torch.tensor(lengths),
                                             ref_logps=torch.tensor(ref_short)), LongPOOptions(beta=beta, dpo_weight=lam, nll=nll))
    np.testing.assert_allclose(losses.detach().numpy(), np_longpo(logps, ref_short, lengths, beta, lam, nll),
                               rtol=1e-10)
    np.testing.assert_allclose(metrics["rewards/chosen"].numpy(), beta * (logps[:, 0] - ref_short[:, 0]))
    losses.mean().backward()
    assert policy.grad[:, 0].abs().sum() > 0 and policy.grad[:, 1].abs().sum() > 0
    with pytest.raises(ConfigError, match="dpo_weight"):
        build_options(get_loss("longpo"), {"dpo_weight": 0.0})


# ---- data ----

WORDS = VOCABULARY + ["doc", "fact", "key", "is", "what", "?", "short", "long"]
TOKENIZER = build_word_tokenizer(WORDS)


def test_rejections_shape_loads_tokenizes_and_names_bad_fields(tmp_path):
    good = [{"prompt": "what is the key ?", "chosen": "good", "rejections": ["bad", "dull"]},
            {"prompt": "what is it ?", "chosen": "fine", "rejections": ["sad", "bad"]}]
    write_jsonl_atomic(tmp_path / "ok.jsonl", good)
    examples = prepare_examples(str(tmp_path / "ok.jsonl"), TOKENIZER, ExampleSettings("rejections", 64))
    assert [len(e.response_ids) for e in examples] == [3, 3]
    for bad, field in (({"prompt": "p", "chosen": "good", "rejections": []}, "rejections"),
                       ({"prompt": "p", "chosen": "good", "rejections": "bad"}, "rejections"),
                       ({"prompt": "p", "chosen": "good", "rejections": ["bad", 3]}, "rejections[1]"),
                       ({"prompt": "p", "chosen": "good"}, "rejections")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError) as err:
            load_records(path, shape="rejections")
        assert (err.value.row, err.value.field) == (2, field), err.value
    path = tmp_path / "uneven.jsonl"
    path.write_text(json.dumps(good[0]) + "\n" + json.dumps({**good[1], "rejections": ["bad"]}) + "\n")
    with pytest.raises(DataError, match="same") as err:
        load_records(path, shape="rejections")
    assert err.value.field == "rejections"


def test_longpo_reference_reads_the_short_context(tmp_path):
    """score_references gives LongPO the reference's log-probs of each response after `short_prompt`, equal to a
    separate forward of [short prompt; response]; a pair without `short_prompt` is a named DataError."""
    from alignkit.config import TrainConfig
    from alignkit.train.loss_inputs import check_record_fields
    from alignkit.train.method import Method
    from alignkit.train.offline_data import OfflineData, score_references
    from alignkit.train.packing import Packing

    records = [{"prompt": "doc fact key is good doc doc doc what is the key ?", "short_prompt": "key is good what is "
                "the key ?", "chosen": "good", "rejected": "bad"},
               {"prompt": "long doc doc fact key is dull what is the key ?", "short_prompt": "key is dull ?",
                "chosen": "dull", "rejected": "fine"}]
    write_jsonl_atomic(tmp_path / "pairs.jsonl", records)
    examples = prepare_examples(str(tmp_path / "pairs.jsonl"), TOKENIZER, ExampleSettings("pairs", 64))
    model = build_tiny_model("llama", len(TOKENIZER), seed=2, hidden=32, layers=2, heads=4).eval()
    spec = get_loss("longpo")
    cfg = TrainConfig(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), loss="longpo", ref_cache=False,
                      max_length=64, output_dir=str(tmp_path / "out"))
    data = OfflineData(examples, [], local_steps=[[[0, 1]]], ref_cache=cfg.ref_cache)
    ref, _ = score_references(Method(spec, build_options(spec, {}), max_length=cfg.max_length), data,
                              Packing(cfg.max_tokens_per_batch, cfg.max_tokens_per_row, 0), model)
    for b, (record, example) in enumerate(zip(records, examples)):
        short = TOKENIZER(record["short_prompt"], add_special_tokens=False)["input_ids"]
        assert example.extras["short_prompt"] == short and example.prompt_ids != short
        for i, response in enumerate(example.response_ids):
            ids = torch.tensor([short + response])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].log_softmax(-1)
            expected = sum(float(logits[len(short) - 1 + t, tok]) for t, tok in enumerate(response))
            assert float(ref.seq_logps[b, i]) == pytest.approx(expected, abs=1e-5)
    write_jsonl_atomic(tmp_path / "plain.jsonl", [{k: v for k, v in records[0].items() if k != "short_prompt"}])
    plain = prepare_examples(str(tmp_path / "plain.jsonl"), TOKENIZER, ExampleSettings("pairs", 64))
    with pytest.raises(DataError) as err:
        check_record_fields(spec, plain)
    assert err.value.field == "short_prompt"


def test_long_context_options_check_their_own_bounds_and_one_token_answers_count_one():
    for bad in ({"beta": 0.0}, {"sft_weight": -0.1}):
        with pytest.raises(ConfigError):
            LOGOOptions(**bad)
    assert LOGOOptions(beta=0.5).beta == 0.5 and LongPOOptions(beta=0.5).beta == 0.5
    with pytest.raises(ConfigError):
        LongPOOptions(beta=0.0)
    logps = torch.tensor([[-2.0, -3.0, -4.0]])
    losses, metrics = logo_loss(LossInputs(logps=logps, lengths=torch.ones(1, 3)), LOGOOptions(beta=1.0, gamma=0.0,
                                                                                                sft_weight=0.0))
    assert float(metrics["rewards/chosen"]) == -2.0 and float(metrics["rewards/rejected"]) == -3.5

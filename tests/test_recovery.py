"""Deep safety alignment's recovery examples (arXiv 2406.05946, section 3): a refusal record read after the first k
tokens of its compliant answer, the loss on the refusal only. Checked: the prefix is exactly the answer's first k
tokens (as the word tokenizer splits them) and untrained, the trained tokens are exactly the refusal, k follows the
seed, a training run uses them, and bad options and records are named."""

from __future__ import annotations

import json
import random

import pytest
import torch

from alignkit.api import build_config
from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.recovery import RecoveryOptions, prefilled_prompt, recovery_examples, recovery_options
from alignkit.data.synthetic_safety import WORDS, attack_records, safety_records
from alignkit.errors import ConfigError, DataError
from alignkit.eval.kl import kl_packing
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train.loop import train
from alignkit.train.reference import score_examples

SETTINGS = ExampleSettings("sft", 128)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


def word_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


def test_the_prefix_is_untrained_and_the_trained_tokens_are_the_refusal(tokenizer):
    records = safety_records(30, seed=0)
    examples = list(prepare_examples(records, tokenizer, SETTINGS))
    out, ks = recovery_examples(examples, RecoveryOptions(fraction=1.0, prefix_tokens=(3, 30), seed=1), 128)
    refusals = [i for i, r in enumerate(records) if "harmful_completion" in r]
    assert len(ks) == len(refusals) >= 10 and len(set(ks)) > 3
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    for i, k in zip(refusals, ks):
        harmful = word_ids(tokenizer, records[i]["harmful_completion"])
        refusal = word_ids(tokenizer, records[i]["completion"]) + [end]
        (response,), (mask,) = out[i].response_ids, out[i].response_loss_masks
        assert k == min(k, len(harmful)) and response[:k] == harmful[:k]  # k words of the compliant answer
        assert [t for t, m in zip(response, mask) if m] == refusal == response[k:]
        assert not any(mask[:k]) and out[i].prompt_ids == examples[i].prompt_ids
        assert out[i].extras["recovery_prefix"] == k and "harmful_ids" not in out[i].extras
    for i in set(range(len(records))) - set(refusals):  # answered requests stay as they were
        assert out[i] is examples[i]


def test_prefix_lengths_follow_the_seed(tokenizer):
    examples = list(prepare_examples(safety_records(60, seed=3), tokenizer, SETTINGS))
    refusals = [e for e in examples if "harmful_ids" in e.extras]
    options = RecoveryOptions(fraction=0.5, prefix_tokens=(2, 9), seed=7)
    _, ks = recovery_examples(examples, options, 128)
    rng = random.Random(7)  # each refusal draws (u, k) in turn; u < fraction turns it
    draws = [(rng.random(), rng.randint(2, 9)) for _ in refusals]
    assert ks == [k for u, k in draws if u < 0.5] and 0 < len(ks) < len(refusals)
    assert recovery_examples(examples, options, 128)[1] == ks
    assert recovery_examples(examples, RecoveryOptions(fraction=0.5, prefix_tokens=(2, 9), seed=8), 128)[1] != ks
    # the k drawn for a record does not depend on the fraction
    assert recovery_examples(examples, RecoveryOptions(fraction=1.0, prefix_tokens=(2, 9), seed=7), 128)[1] == \
        [k for _, k in draws]


def test_the_trained_log_probs_are_the_refusal_given_the_prefix(tokenizer):
    """The package's forward scores a recovery example's refusal tokens after prompt + prefix, nothing else."""
    examples = list(prepare_examples(safety_records(8, seed=5), tokenizer, SETTINGS))
    out, _ = recovery_examples(examples, RecoveryOptions(fraction=1.0, prefix_tokens=(4, 4)), 128)
    model = build_tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2)
    _, token_logps = score_examples(model, out, kl_packing())
    for example, scored in zip(out, token_logps):
        ids = torch.tensor([example.prompt_ids + example.response_ids[0]])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        trained = [False] * (len(example.prompt_ids) - 1) + list(example.response_loss_masks[0] if
                                                                 example.response_loss_masks else
                                                                 [True] * len(example.response_ids[0]))
        expected = logps[torch.arange(len(targets)), targets][torch.tensor(trained)]
        torch.testing.assert_close(scored, expected, rtol=1e-4, atol=1e-4)


def test_prefilled_prompt_is_the_training_prefix(tokenizer):
    record = attack_records(1, seed=0)[0]
    prompt_ids, prefix = prefilled_prompt(tokenizer, record["prompt"], record["harmful_completion"], 5)
    assert prefix == word_ids(tokenizer, record["harmful_completion"])[:5]
    assert tokenizer.decode(prompt_ids).endswith("<|assistant|>")
    _, whole = prefilled_prompt(tokenizer, record["prompt"], record["harmful_completion"], 1000)
    assert whole == word_ids(tokenizer, record["harmful_completion"])  # never the turn's end token


def test_a_run_with_recovery_examples_trains_on_them(tmp_path, tokenizer, one_thread):
    write_jsonl_atomic(tmp_path / "safety.jsonl", safety_records(24, seed=1))
    common = dict(model="tiny", max_length=128, max_tokens_per_batch=600, progress=False, learning_rate=3e-3,
                  max_steps=2, ref_cache=False, data_cache=False, loss="sft", train_data=str(tmp_path / "safety.jsonl"))
    losses = {}
    for name, augment in (("plain", None), ("recovery", {"recovery": {"fraction": 1.0, "prefix_tokens": [5, 5]}})):
        model = build_tiny_model("llama", len(tokenizer), seed=0, hidden=32, layers=2)
        train(TrainConfig(output_dir=str(tmp_path / name), augment=augment, **common), model, tokenizer)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(losses["recovery"]) == 2 and losses["recovery"] != losses["plain"]


@pytest.mark.parametrize(("values", "key"), [
    ({"fraction": 0.0}, "augment.recovery.fraction"), ({"fraction": 1.5}, "augment.recovery.fraction"),
    ({"prefix_tokens": [9, 2]}, "augment.recovery.prefix_tokens"),
    ({"prefix_tokens": [0, 3]}, "augment.recovery.prefix_tokens"),
    ({"prefix_tokens": "many"}, "augment.recovery.prefix_tokens"), ({"seeds": 1}, "augment.recovery.seeds")])
def test_bad_options_are_named(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        recovery_options(values)


def test_runs_that_cannot_take_recovery_examples_are_named(tmp_path):
    base = {"model": "tiny", "train_data": "x.jsonl", "augment": {"recovery": {}}}
    with pytest.raises(ConfigError, match="augment.recovery.*trains on pairs"):
        build_config("dpo", base)
    with pytest.raises(ConfigError, match="sft_include_prompt"):
        build_config("sft", {**base, "sft_include_prompt": True})
    with pytest.raises(ConfigError, match="augment.recovery.fraction"):
        build_config("sft_constrained", {**base, "augment": {"recovery": {"fraction": -1}}})
    with pytest.raises(ConfigError, match="augment.bogus"):
        build_config("sft", {**base, "augment": {"bogus": {}}})


def test_bad_records_are_named(tmp_path, tokenizer):
    records = safety_records(6, seed=0)
    first = next(i for i, r in enumerate(records) if "harmful_completion" in r)
    bad = [dict(r) for r in records]
    bad[first]["harmful_completion"] = ""
    write_jsonl_atomic(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match=rf"bad.jsonl, row {first + 1}, field 'harmful_completion': empty string"):
        prepare_examples(str(tmp_path / "bad.jsonl"), tokenizer, SETTINGS)
    chat = [{"messages": [*r["prompt"], {"role": "assistant", "content": r["completion"]}],
             "harmful_completion": "sure ."} for r in records[:1]]
    with pytest.raises(DataError, match="row 1, field 'harmful_completion': goes with prompt/completion"):
        prepare_examples(chat, tokenizer, SETTINGS)
    plain = [{k: v for k, v in r.items() if k != "harmful_completion"} for r in records]
    write_jsonl_atomic(tmp_path / "plain.jsonl", plain)
    examples = list(prepare_examples(str(tmp_path / "plain.jsonl"), tokenizer, SETTINGS))
    with pytest.raises(DataError, match="plain.jsonl, field 'harmful_completion': no record has one"):
        recovery_examples(examples, RecoveryOptions(), 128)
    examples = list(prepare_examples(records, tokenizer, ExampleSettings("sft", 40)))
    with pytest.raises(DataError, match="field 'harmful_completion': a 30-token prefix leaves no room"):
        recovery_examples(examples, RecoveryOptions(fraction=1.0, prefix_tokens=(30, 30)), 40)

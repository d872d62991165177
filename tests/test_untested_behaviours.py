"""Documented behaviour that had no test: every named reward spec (values, not only that it loads), module:attr
specs, bad specs, missing_eos_penalty in a rollout, and sft_weight's NLL term in the loss."""

from __future__ import annotations

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.rewards.spec import load_reward


def shout(prompt, response) -> float:  # a module:attr reward for the spec test
    return float(response.isupper())


def test_named_reward_specs_give_their_documented_values():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["I love this, it is wonderful!", "This is terrible and awful", "", " ".join(["word"] * 35) + "."]
    prompts = ["p"] * len(texts)
    analyzer = SentimentIntensityAnalyzer()
    vader = load_reward("vader")(prompts, texts)
    assert vader == [analyzer.polarity_scores(t)["compound"] for t in texts] and vader[0] > 0 > vader[1]
    length = load_reward("length")(prompts, texts)
    assert length == pytest.approx([0.0, 0.0, -1.0, -0.05 * 5])  # 30 words free, 0.05 a word past them, -1 if empty
    fmt = load_reward("format")(prompts, texts)
    assert fmt == [1.0, 0.0, 0.0, 1.0]
    combined = load_reward("align")(prompts, texts)
    assert combined == pytest.approx([v + n + 0.25 * f for v, n, f in zip(vader, length, fmt)])


def test_module_attr_specs_and_bad_specs():
    assert load_reward("test_untested_behaviours:shout")(["p", "p"], ["LOUD", "quiet"]) == [1.0, 0.0]
    ends = load_reward("alignkit.rewards.text:EndsCleanly")  # a class: instantiated with no arguments
    assert ends(["p"], ["Done."]) == [1.0]
    with pytest.raises(ConfigError, match="reward") as err:
        load_reward("no_such_reward")
    assert err.value.key == "reward"
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("no_such_module_x:f")
    with pytest.raises(ConfigError, match="neither a Reward nor a callable"):
        load_reward("alignkit.rewards.spec:NAMED")


def test_missing_eos_penalty_is_subtracted_from_samples_cut_short(task, one_thread):
    from alignkit.generate.sample import SamplingConfig
    from alignkit.online.rollout import generate_rollout
    from alignkit.rewards.base import FunctionReward
    from synthetic_task import prompts

    reward = FunctionReward(lambda p, r: float(len(r.split())))
    args = (task.model, task.tokenizer, prompts(8, seed=5), reward, 4, SamplingConfig(max_new_tokens=8, seed=1))
    plain = generate_rollout(*args)
    penalised = generate_rollout(*args, missing_eos_penalty=0.5)
    assert plain.examples[0].response_ids == penalised.examples[0].response_ids  # the same samples
    assert plain.finished.any() and (~plain.finished).any()  # both kinds present
    torch.testing.assert_close(penalised.rewards, plain.rewards - 0.5 * (~plain.finished).float())


def test_sft_weight_adds_the_chosen_responses_nll(task, one_thread):
    from alignkit.config import TrainConfig
    from alignkit.data import prepare_examples
    from alignkit.data.pack import pack
    from alignkit.data.synthetic import preference_records
    from alignkit.losses import build_options, get_loss
    from alignkit.train.loop import compute_losses
    from alignkit.train.reference import Reference, reference_logps

    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in preference_records(6, seed=3)]
    examples = prepare_examples(records, task.tokenizer, "pairs", 64)
    pad = task.tokenizer.pad_token_id
    ref = Reference(*reference_logps(task.model, examples, 1024, 512, pad, use_cache=False))
    batch = pack(examples, list(range(len(examples))), 512, pad)
    spec = get_loss("dpo")
    opts = build_options(spec, {"beta": 0.1})
    base = TrainConfig(model="tiny", train_data="x.jsonl")
    with torch.no_grad():
        plain, _ = compute_losses(task.model, batch, examples, spec, opts, ref, base)
        weighted, metrics = compute_losses(task.model, batch, examples, spec, opts, ref,
                                           base.model_copy(update={"sft_weight": 0.5}))
    chosen_lengths = torch.tensor([len(e.response_ids[0]) for e in examples], dtype=torch.float32)
    nll = -metrics["logps/chosen"] / chosen_lengths  # the chosen response's per-token NLL
    torch.testing.assert_close(metrics["nll"], nll)
    torch.testing.assert_close(weighted, plain + 0.5 * nll)

"""The pieces the offline catalogue adds around its losses, one at a time: KTO's mismatched pairs (packing and
reference), the carried loss state (BCO), TR-DPO's reference update, the "negatives" data shape (D2O), MODPO's
`other_rewards`, reward-augmented pairs, and APO's extrapolation between rounds."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.augment import GOAL_TEMPLATE, reward_augmented_pairs, reward_conditioned_prompt
from alignkit.data.load import load_records
from alignkit.data.pack import mismatched_partners, pack, with_mismatched_completions
from alignkit.data.synthetic import VOCABULARY
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import DataError
from alignkit.losses import RunningMean, build_options, get_loss
from alignkit.models.logprobs import response_logprobs
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train import loop
from alignkit.train.apo import apo_rounds, extrapolated_logps, extrapolated_weights
from alignkit.train.distributed import Dist
from alignkit.train.loss_inputs import CarriedState, logprob_inputs
from alignkit.train.method import Method
from alignkit.train.packing import Packing
from alignkit.train.ref_update import update_reference
from alignkit.train.reference import build_reference

TOKENIZER = build_word_tokenizer(VOCABULARY)


def tiny_llama(seed: int = 0):
    return build_tiny_model("llama", len(TOKENIZER), seed=seed, hidden=32, layers=2, heads=4)


# ---- KTO's mismatched pairs ----


def unpaired_examples(n: int) -> list[TokenizedExample]:
    words = ["good movie :", "bad food :", "the day was", "rate my book :"]
    records = [{"prompt": words[i % 4], "completion": " ".join(["nice"] * (i + 1)), "label": i % 2} for i in range(n)]
    return prepare_examples(records, TOKENIZER, ExampleSettings("unpaired", max_length=64))


def test_each_example_gets_the_next_ones_completion():
    examples = unpaired_examples(4)
    assert mismatched_partners(4) == [1, 2, 3, 0] and mismatched_partners(1) == [0]
    extended = with_mismatched_completions(examples)
    for i, example in enumerate(extended):
        assert example.prompt_ids == examples[i].prompt_ids
        assert example.response_ids == [examples[i].response_ids[0], examples[(i + 1) % 4].response_ids[0]]
        assert example.extras == examples[i].extras
    max_length = 5  # each mismatched completion keeps its start, to fit after this example's own prompt
    cut = with_mismatched_completions(examples, max_length=max_length)
    assert [len(e.response_ids[1]) for e in cut] == [
        min(len(examples[(i + 1) % 4].response_ids[0]), max_length - len(examples[i].prompt_ids)) for i in range(4)]


def test_packed_kl_logps_and_their_reference_equal_separate_runs():
    examples = unpaired_examples(5)
    model = tiny_llama().eval()
    spec = get_loss("kto")
    opts = build_options(spec, {})
    cfg = TrainConfig(model="tiny", max_length=64, max_tokens_per_row=48, ref_cache=False)
    indices = [4, 0, 2]
    reference = tiny_llama(1).eval()
    packing, method = Packing(cfg.max_tokens_per_batch, cfg.max_tokens_per_row, 0), Method(spec, opts, max_length=cfg.max_length)
    ref = build_reference(reference, examples, packing, [indices], cfg.max_length, use_cache=False)
    batch = method.pack(examples, indices, packing)
    assert batch.num_responses == 2
    with torch.no_grad():
        inputs = logprob_inputs(model, batch, method, ref)
    assert inputs.logps.shape == (3, 1) and inputs.lengths.shape == (3, 1) and inputs.kl_logps.shape == (3,)
    for position, (i, j) in enumerate([(4, 0), (0, 2), (2, 4)]):
        alone = TokenizedExample(examples[i].prompt_ids, [examples[j].response_ids[0]])
        with torch.no_grad():
            expected = response_logprobs(model, pack([alone])).seq_logps[0, 0]
            expected_ref = response_logprobs(reference, pack([alone])).seq_logps[0, 0]
        torch.testing.assert_close(inputs.kl_logps[position], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(inputs.ref_kl_logps[position], expected_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(inputs.ref_logps[:, 0], ref.seq_logps[indices, 0])
    with pytest.raises(Exception, match="mismatched pair"):
        ref.kl_for(method.pack(examples, [0, 1], packing))  # a batch the reference was not scored for
    no_kl = build_options(spec, {"use_kl_estimate": False})
    assert Method(spec, no_kl, max_length=cfg.max_length).pack(examples, indices, packing).num_responses == 1


# ---- the state a loss carries (BCO) ----


def test_running_mean_round_trips_and_merges_as_one_stream():
    values = torch.tensor([0.5, -1.0, 2.0, 3.0, -0.25], dtype=torch.float64)
    start = RunningMean().update(values[:2])
    assert RunningMean.from_dict(json.loads(json.dumps(start.to_dict()))) == start
    assert RunningMean.from_metrics({"rewards": torch.zeros(2)}) is None
    rank_a, rank_b = start.update(values[2:4]), start.update(values[4:])
    merged = RunningMean.merge(start, [rank_a, rank_b])
    assert merged.count == 5 and merged.mean == pytest.approx(float(values.mean()), abs=1e-12)
    assert RunningMean.merge(None, [None, None]) is None


def test_carried_state_threads_micro_batches_and_drops_a_skipped_step():
    carried = CarriedState(get_loss("bco"))

    def metrics(state):
        return {"bco/reward_shift": torch.full((2,), state.mean), "bco/reward_shift_count": torch.full((2,), state.count)}

    assert carried.current() is None
    first = RunningMean().update(torch.tensor([1.0, 3.0]))
    carried.absorb(metrics(first))
    assert carried.current() == first and carried.value is None  # the next micro-batch sees it; not kept yet
    carried.end_step(applied=True, ctx=Dist())
    assert carried.value == first
    carried.absorb(metrics(first.update(torch.tensor([100.0]))))
    carried.end_step(applied=False, ctx=Dist())  # a non-finite step: no update
    assert carried.value == first and carried.current() == first
    saved = carried.checkpoint()
    restored = CarriedState(get_loss("bco"))
    restored.restore(json.loads(json.dumps(saved)))
    assert restored.value == first
    stateless = CarriedState(get_loss("dpo"))
    stateless.absorb(metrics(first))
    stateless.end_step(applied=True, ctx=Dist())
    assert stateless.checkpoint() == {}


# ---- TR-DPO's reference update ----


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_reference_update_mixes_weights(alpha):
    policy, reference = tiny_llama(0), tiny_llama(1)
    before = {name: p.detach().clone() for name, p in reference.named_parameters()}
    update_reference(reference, policy, alpha)
    for name, param in policy.named_parameters():
        expected = param.detach() if alpha == 1.0 else alpha * param.detach() + (1 - alpha) * before[name]
        torch.testing.assert_close(dict(reference.named_parameters())[name], expected, rtol=1e-6, atol=1e-7)


# ---- data: negatives (D2O) and other_rewards (MODPO) ----


NEGATIVE = {"prompt": "rate the food :", "rejected": "it was awful", "samples": ["it was fine", "the food was good"]}


def test_negatives_shape_loads_and_tokenizes_rejected_then_samples():
    records = [NEGATIVE, {**NEGATIVE, "samples": [[{"role": "assistant", "content": "nice"}], "so good"]}]
    examples = prepare_examples(records, TOKENIZER, ExampleSettings("negatives", max_length=64))
    assert [len(e.response_ids) for e in examples] == [3, 3]
    assert TOKENIZER.decode(examples[0].response_ids[0]).startswith("it was awful")
    assert get_loss("d2o").data_shape == "negatives"


@pytest.mark.parametrize("record, field", [
    ({"prompt": "p", "rejected": "r"}, "samples"),
    ({**NEGATIVE, "samples": []}, "samples"),
    ({**NEGATIVE, "samples": "just one"}, "samples"),
    ({**NEGATIVE, "samples": ["ok", ""]}, "samples[1]"),
    ({**NEGATIVE, "rejected": 3}, "rejected"),
])
def test_bad_negatives_records_name_the_field(record, field):
    with pytest.raises(DataError) as err:
        load_records([record], "negatives")
    assert err.value.field == field and err.value.row == 1


def test_every_record_needs_the_same_number_of_samples_or_other_rewards(caplog):
    with pytest.raises(DataError, match="row 1 has 2") as err:
        load_records([NEGATIVE, {**NEGATIVE, "samples": ["a", "b", "c"]}], "negatives")
    assert (err.value.row, err.value.field) == (2, "samples")
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        kept = load_records([NEGATIVE, {**NEGATIVE, "samples": ["a"]}, NEGATIVE], "negatives", on_bad_record="skip")
    assert len(kept) == 2 and "skipped 1" in caplog.text

    pair = {"prompt": "p", "chosen": "a", "rejected": "b", "other_rewards": {"chosen": [1, 0.5], "rejected": [0, 2]}}
    assert load_records([pair, pair], "pairs")[1]["other_rewards"]["rejected"] == [0, 2]
    with pytest.raises(DataError, match="is missing") as err:
        load_records([pair, {"prompt": "p", "chosen": "a", "rejected": "b"}], "pairs")
    assert (err.value.row, err.value.field) == (2, "other_rewards")
    for bad, field in [({"chosen": [1]}, "other_rewards.rejected"), ({"chosen": [1], "rejected": [1, 2]}, "other_rewards"),
                       ({"chosen": [1], "rejected": ["x"]}, "other_rewards.rejected[0]"), ([1, 2], "other_rewards")]:
        with pytest.raises(DataError) as err:
            load_records([{**pair, "other_rewards": bad}], "pairs")
        assert err.value.field == field


# ---- reward-augmented DPO ----


def test_reward_augmented_pairs_condition_on_each_score_and_swap():
    records = [{"prompt": "rate the food :", "chosen": "great", "rejected": "awful", "chosen_score": 8.0,
                "rejected_score": 3.5, "margin": 2.0},
               {"prompt": "p2", "chosen": "x", "rejected": "y", "chosen_score": 2, "rejected_score": 5}]  # dropped
    augmented = reward_augmented_pairs(records)
    assert len(augmented) == 2
    first, swapped = augmented
    assert first["prompt"][0] == {"role": "system", "content": GOAL_TEMPLATE.format(score=8)}
    assert first["prompt"][0]["content"].endswith("Overall score: 8.")
    assert (first["chosen"], first["rejected"]) == ("great", "awful")
    assert swapped["prompt"][0]["content"].endswith("Overall score: 3.5.")
    assert (swapped["chosen"], swapped["rejected"]) == ("awful", "great")
    assert set(first) == {"prompt", "chosen", "rejected"}
    assert len(load_records(augmented, "pairs")) == 2  # valid pairs: DPO trains on them as they are
    prefixed = reward_augmented_pairs(records, mode="prefix", template="[reward: {score}]")
    assert prefixed[0]["prompt"] == "[reward: 8]\n\nrate the food :"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    merged = reward_conditioned_prompt(chat, 10, template="[reward: {score}]")
    assert merged[0]["content"] == "[reward: 10]\n\nbe brief" and chat[0]["content"] == "be brief"
    filtered = reward_augmented_pairs([{**records[1], "fine_w": 4, "fine_l": 1}], filter_fields=("fine_w", "fine_l"))
    assert len(filtered) == 2


# ---- APO ----


def test_extrapolation_is_nesterov_momentum():
    current = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([3])}
    previous = {"w": torch.tensor([0.5, 3.0]), "steps": torch.tensor([1])}
    out = extrapolated_weights(current, previous, 0.4)
    torch.testing.assert_close(out["w"], torch.tensor([1.2, 1.6]))
    assert torch.equal(out["steps"], torch.tensor([3]))
    assert torch.equal(extrapolated_weights(current, previous, 0.0)["w"], current["w"])
    torch.testing.assert_close(extrapolated_logps(torch.tensor([-3.0]), torch.tensor([-5.0]), 0.5), torch.tensor([-2.0]))


def test_apo_rounds_extrapolate_between_rounds(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    seen = []

    @dataclass
    class Result:
        model: object
        output_dir: Path
        final_metrics: dict

    def fake_train(cfg, model, tokenizer):  # each round moves the weights by +1
        seen.append((cfg.output_dir, cfg.train_data, float(model.weight[0, 0].detach())))
        with torch.no_grad():
            model.weight += 1.0
        return Result(model, Path(cfg.output_dir), {"loss": 0.0})

    cfg = TrainConfig(model="tiny", train_data="pairs.jsonl", output_dir=str(tmp_path))
    monkeypatch.setattr(loop, "train", fake_train)
    final, history = apo_rounds(cfg, model, None, rounds=3, alpha=0.5, round_data=lambda t, m: f"round{t}.jsonl")
    # theta_hat_1 = 2, theta_1 = 2 + 0.5 (2 - 1) = 2.5; theta_hat_2 = 3.5, theta_2 = 3.5 + 0.5 (3.5 - 2) = 4.25;
    # theta_hat_3 = 5.25, theta_3 = 5.25 + 0.5 (5.25 - 3.5) = 6.125
    assert [s[2] for s in seen] == [1.0, 2.5, 4.25]
    assert float(final.weight[0, 0].detach()) == pytest.approx(6.125)
    assert [s[1] for s in seen] == ["round1.jsonl", "round2.jsonl", "round3.jsonl"]
    assert [h.index for h in history] == [1, 2, 3] and seen[0][0].endswith("round-1")


def test_apo_rounds_train_a_tiny_model(tmp_path):
    from alignkit.data.load import write_jsonl_atomic
    from alignkit.data.synthetic import preference_records

    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(16, seed=1))
    cfg = TrainConfig(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / "apo"),
                      learning_rate=2e-3, max_steps=2, max_tokens_per_batch=160, max_length=64, ref_cache=False,
                      progress=False)
    from safetensors.torch import load_file

    from alignkit.train.logging import read_metrics

    start = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    final, history = apo_rounds(cfg, tiny_llama(), TOKENIZER, rounds=2, alpha=0.3)
    assert len(history) == 2 and (tmp_path / "apo" / "round-2" / "final").exists()
    # each round's reference is the model it starts from: its first DPO loss is exactly log 2
    for t in (1, 2):
        first = read_metrics(tmp_path / "apo" / f"round-{t}")[0]
        assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # the returned model is the Nesterov step from the two rounds' trained weights: theta_2 + a (theta_2 - theta_1)
    trained = [load_file(tmp_path / "apo" / f"round-{t}" / "final" / "model.safetensors") for t in (1, 2)]
    state = final.state_dict()
    for key, value in trained[1].items():
        torch.testing.assert_close(state[key], value + 0.3 * (value - trained[0][key]), rtol=0, atol=1e-6)
    assert any(not torch.equal(v, start[k]) for k, v in state.items())


def test_options_of_new_methods_are_checked():
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="token_weights"):
        build_options(get_loss("sparsepo"), {"token_weights": "learned"})
    with pytest.raises(ConfigError, match="must be text"):
        build_options(get_loss("sparsepo"), {"token_weights": 1})

"""Reward models: the Bradley–Terry loss (NumPy values, autograd gradient, identities, TRL's RewardTrainer), packed
rewards == HF's own forward on each unpadded [prompt, response] (decoders, every attention implementation) and on
the [CLS] P [SEP] R [SEP] pair (encoders), training through the loop, saving in HF format, reloading, rm-eval, and
the quickstart's reward model against the programmatic reward."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForSequenceClassification

from alignkit.cli import main
from alignkit.config import TrainConfig
from alignkit.data.pack import pack
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.data.tokenize import TokenizedExample, tokenize_record
from alignkit.errors import ConfigError
from alignkit.losses import LossInputs, build_options, get_loss
from alignkit.losses.reward import RewardModelOptions, bradley_terry_loss
from alignkit.models.reward import add_pair_special_tokens, sequence_rewards
from alignkit.models.tiny import build_tiny_model, build_tiny_reward_model, build_word_tokenizer
from alignkit.recipes.quickstart import RewardModelSize, train_reward_model
from alignkit.rewards.model import RewardModelScorer, pair_accuracy
from alignkit.train.loop import train
from alignkit.train.method import Method
from conftest import import_trl

CHOSEN = torch.tensor([1.5, -0.3, 0.2, 2.0, -1.0])
REJECTED = torch.tensor([0.5, 0.4, 0.2, -3.0, -0.5])
RECORD_MARGINS = torch.tensor([0.0, 1.0, 0.5, -0.25, 2.0])


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def rm_inputs(chosen=CHOSEN, rejected=REJECTED, margins=None) -> LossInputs:
    rewards = torch.stack([chosen, rejected], 1).clone().double().requires_grad_()
    return LossInputs(logps=None, lengths=torch.ones(len(chosen), 2), predicted_rewards=rewards, margins=margins)


# ---- the loss ----


@pytest.mark.parametrize("margin,eta,record_margins", [(0.0, 0.0, False), (0.7, 0.0, False), (0.0, 0.01, False),
                                                       (0.3, 0.05, True)])
def test_bradley_terry_loss_matches_numpy(margin, eta, record_margins):
    margins = RECORD_MARGINS if record_margins else None
    losses, metrics = bradley_terry_loss(rm_inputs(margins=margins), RewardModelOptions(margin=margin, center_rewards_coefficient=eta))
    c, r = CHOSEN.double().numpy(), REJECTED.double().numpy()
    m = margin + (RECORD_MARGINS.double().numpy() if record_margins else 0.0)
    expected = -np_log_sigmoid(c - r - m) + eta * (c + r) ** 2
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(metrics["rewards/margins"].numpy(), c - r)
    assert metrics["rewards/accuracy"].tolist() == [1.0, 0.0, 0.5, 1.0, 0.0]  # a tie counts half


def test_bradley_terry_gradient_equals_autograd_of_a_naive_form():
    inputs = rm_inputs(margins=RECORD_MARGINS.double())
    opts = RewardModelOptions(margin=0.2, center_rewards_coefficient=0.1)
    bradley_terry_loss(inputs, opts)[0].sum().backward()
    rewards = inputs.predicted_rewards.detach().clone().requires_grad_()
    c, r = rewards[:, 0], rewards[:, 1]
    naive = -torch.log(torch.sigmoid(c - r - 0.2 - RECORD_MARGINS.double())) + 0.1 * (c + r) ** 2
    naive.sum().backward()
    torch.testing.assert_close(inputs.predicted_rewards.grad, rewards.grad)
    # d/dr_c = -s(-(h)) + 2 eta (r_c + r_r), by hand
    h = (c - r - 0.2 - RECORD_MARGINS.double()).detach()
    torch.testing.assert_close(rewards.grad[:, 0], -torch.sigmoid(-h) + 0.2 * (c + r).detach())


def test_equal_rewards_give_log_two_and_centered_pairs_pay_nothing():
    zeros = torch.zeros(3)
    losses, metrics = bradley_terry_loss(rm_inputs(zeros + 1.3, zeros + 1.3), RewardModelOptions())
    torch.testing.assert_close(losses, torch.full((3,), np.log(2.0), dtype=torch.float64))
    assert metrics["rewards/accuracy"].tolist() == [0.5] * 3
    values = torch.tensor([0.5, -2.0, 3.0])
    plain = bradley_terry_loss(rm_inputs(values, -values), RewardModelOptions())[0]
    centered = bradley_terry_loss(rm_inputs(values, -values), RewardModelOptions(center_rewards_coefficient=1.0))[0]
    torch.testing.assert_close(plain, centered)  # r_c + r_r = 0: the centering term is 0


@pytest.mark.parametrize("margin,eta", [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_equals_trl_reward_trainer(margin, eta):
    trl_reward = import_trl("trl.trainer.reward_trainer")
    rewards = torch.cat([CHOSEN, REJECTED])[:, None]
    fake_trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=eta),
        accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
    )
    batch = {"input_ids": torch.zeros(10, 3, dtype=torch.long), "attention_mask": torch.ones(10, 3)}
    if margin:
        batch["margin"] = RECORD_MARGINS
    trl_loss = trl_reward.RewardTrainer.compute_loss(fake_trainer, lambda **_: SimpleNamespace(logits=rewards), batch)
    ours, _ = bradley_terry_loss(rm_inputs(margins=RECORD_MARGINS if margin else None),
                                 RewardModelOptions(center_rewards_coefficient=eta or 0.0))
    torch.testing.assert_close(ours.mean().float(), trl_loss, rtol=1e-6, atol=1e-7)


def test_reward_model_options_are_checked():
    spec = get_loss("rm")
    assert spec.output == "rewards" and spec.data_shape == "pairs" and not spec.needs_reference
    with pytest.raises(ConfigError, match="center_rewards_coefficient"):
        build_options(spec, {"center_rewards_coefficient": -0.1})
    with pytest.raises(ConfigError, match="margin"):
        build_options(spec, {"margin": "wide"})


# ---- packed rewards == HF's own forward ----

VOCAB = 41


def random_pairs(n: int, seed: int) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(1, VOCAB, (int(torch.randint(low, high, (1,), generator=generator)),),
                             generator=generator).tolist()

    return [TokenizedExample(ids(1, 6), [ids(1, 7), ids(1, 7)]) for _ in range(n)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_packed_rewards_equal_hf_forward_on_each_sequence(family, attn):
    model = build_tiny_reward_model(family, VOCAB, seed=4, attn_implementation=attn, hidden=32, layers=2,
                                    heads=4).eval()
    examples = random_pairs(6, seed=7)
    batch = pack(examples, max_tokens_per_row=3 * max(e.num_tokens for e in examples))
    assert batch.input_ids.shape[0] >= 2  # several rows, padding at the end of the short ones
    with torch.no_grad():
        rewards = sequence_rewards(model, batch)
        expected = torch.tensor([[float(model(input_ids=torch.tensor([e.prompt_ids + r])).logits[0, 0])
                                  for r in e.response_ids] for e in examples])
    torch.testing.assert_close(rewards, expected, rtol=0, atol=2e-6)


def bert_tokenizer():
    tokenizer = build_word_tokenizer([*VOCABULARY, "[CLS]", "[SEP]"])
    tokenizer.cls_token, tokenizer.sep_token = "[CLS]", "[SEP]"
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tokenizer


def test_encoder_rewards_equal_hf_forward_on_the_pair_encoding():
    tokenizer = bert_tokenizer()
    model = build_tiny_reward_model("bert", len(tokenizer), seed=5, hidden=32, layers=2, heads=4).eval()
    records = preference_records(5, seed=3)
    examples = [add_pair_special_tokens(tokenize_record(tokenizer, r, "pairs", 64), tokenizer, 64) for r in records]
    batch = pack(examples, max_tokens_per_row=80)
    with torch.no_grad():
        rewards = sequence_rewards(model, batch)
        for b, record in enumerate(records):
            for i, field in enumerate(("chosen", "rejected")):
                encoded = tokenizer(record["prompt"], record[field] + " <eos>", return_tensors="pt",
                                    return_token_type_ids=True)
                assert encoded["input_ids"][0].tolist() == examples[b].prompt_ids + examples[b].response_ids[i]
                expected = model(**encoded).logits[0, 0]
                torch.testing.assert_close(rewards[b, i], expected, rtol=0, atol=2e-6)


# ---- through the loop: train, save, reload, score, rm-eval ----


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_train_save_reload_and_score(tmp_path, capsys, family):
    tokenizer = bert_tokenizer() if family == "bert" else build_word_tokenizer(VOCABULARY)
    train_path = write_jsonl(tmp_path / "train.jsonl", preference_records(24, seed=1))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", preference_records(12, seed=2))
    model = build_tiny_reward_model(family, len(tokenizer), seed=0, hidden=32, layers=2, heads=4)
    cfg = TrainConfig(model="tiny", loss="rm", loss_options={"center_rewards_coefficient": 0.01}, train_data=train_path,
                      eval_data=eval_path, max_length=64, max_tokens_per_batch=256, max_steps=2, learning_rate=1e-3,
                      output_dir=str(tmp_path / "run"), progress=False)
    result = train(cfg, model, tokenizer)
    assert {"loss", "rewards/accuracy", "rewards/margins", "eval/rewards/accuracy"} <= set(result.final_metrics)
    assert "logps/chosen" not in result.final_metrics

    final = result.output_dir / "final"
    reloaded = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert reloaded.config.num_labels == 1
    prompts = ["review my movie :", "rate the food :", [{"role": "user", "content": "tell about my day :"}]]
    responses = ["it was great and happy", "this food was awful", "the day was fine"]
    in_memory = RewardModelScorer.from_model(result.model, tokenizer, max_length=64)(prompts, responses)
    from_disk = RewardModelScorer(str(final), max_length=64)
    assert from_disk(prompts, responses) == pytest.approx(in_memory, abs=1e-6)
    from alignkit.rewards.spec import load_reward

    as_spec = load_reward(str(final))  # a reward spec naming a reward-model directory scores with that model
    assert isinstance(as_spec, RewardModelScorer) and as_spec(prompts, responses) == pytest.approx(in_memory, abs=1e-5)
    # and equal to HF's own forward of the reloaded model on each unpadded sequence
    for prompt, response, score in zip(prompts[:2], responses[:2], in_memory):
        example = tokenize_record(tokenizer, {"prompt": prompt, "completion": response}, "sft", 64)
        if family == "bert":
            encoded = tokenizer(prompt, response + " <eos>", return_tensors="pt", return_token_type_ids=True)
        else:
            encoded = {"input_ids": torch.tensor([example.prompt_ids + example.response_ids[0]])}
        with torch.no_grad():
            assert float(reloaded(**encoded).logits[0, 0]) == pytest.approx(score, abs=1e-5)

    held_out = pair_accuracy(from_disk, eval_path)
    assert held_out["pairs"] == 12
    assert main(["rm-eval", "--model", str(final), "--data", eval_path, "--max_length", "64"]) == 0
    assert f"accuracy {held_out['accuracy']:.4f} on 12 pairs" in capsys.readouterr().out


def test_alignkit_rm_from_a_causal_lm_checkpoint(tmp_path):
    tokenizer = build_word_tokenizer(VOCABULARY)
    start = tmp_path / "sft_model"
    build_tiny_model("llama", len(tokenizer), seed=0, hidden=16, layers=1, heads=2).save_pretrained(start)
    tokenizer.save_pretrained(start)
    train_path = write_jsonl(tmp_path / "train.jsonl", preference_records(8, seed=1))
    argv = ["rm", "--model", str(start), "--train_data", train_path, "--max_steps", "1", "--max_length", "64",
            "--output_dir", str(tmp_path / "run"), "--progress", "false", "--center_rewards_coefficient", "0.01"]
    assert main(argv) == 0
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final")
    assert type(reloaded).__name__ == "LlamaForSequenceClassification" and reloaded.config.num_labels == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss_options"] == {
        "center_rewards_coefficient": 0.01}


def test_record_margins_reach_the_loss(tmp_path):
    tokenizer = build_word_tokenizer(VOCABULARY)
    model = build_tiny_reward_model("llama", len(tokenizer), seed=1, hidden=16, layers=1, heads=2).eval()
    records = preference_records(3, seed=5)
    records[1]["margin"] = 1.5  # the others have none: 0
    examples = [tokenize_record(tokenizer, r, "pairs", 64) for r in records]
    batch = pack(examples)
    spec = get_loss("rm")
    with torch.no_grad():
        losses, _ = Method(spec, build_options(spec, {"margin": 0.1})).forward(model, batch, examples)
        rewards = sequence_rewards(model, batch).double()
    margins = torch.tensor([0.1, 1.6, 0.1], dtype=torch.float64)
    expected = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1] - margins)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)


def test_sft_weight_with_a_reward_model_is_a_config_error(tmp_path):
    tokenizer = build_word_tokenizer(VOCABULARY)
    model = build_tiny_reward_model("llama", len(tokenizer), hidden=16, layers=1, heads=2)
    cfg = TrainConfig(model="tiny", loss="rm", sft_weight=0.1, train_data=write_jsonl(tmp_path / "p.jsonl", []),
                      output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="sft_weight"):
        train(cfg, model, tokenizer)


def test_rm_eval_needs_model_and_data(capsys):
    assert main(["rm-eval", "--model", "somewhere"]) == 2
    assert "config key 'data'" in capsys.readouterr().err


# ---- the quickstart's reward model ----


def test_quickstart_reward_model_ranks_held_out_pairs_like_the_programmatic_reward(tmp_path):
    size = RewardModelSize(train_pairs=200, eval_pairs=150, hidden=32, max_tokens_per_batch=512)
    summary = train_reward_model(tmp_path, size, seed=0, progress=False, console=Console(file=io.StringIO()))
    assert summary["heldout_accuracy"] >= 0.75  # chance is 0.5; the full-size run reaches ~1.0
    assert summary["eval_pairs"] == 150
    assert json.loads((tmp_path / "rm_summary.json").read_text()) == summary
    assert (tmp_path / "rm" / "final" / "config.json").exists()

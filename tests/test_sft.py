"""SFT through the one loop: packed loss == each sequence run unpacked, assistant-only masking of multi-turn
chats (exact token ids), prompt training, token-mean vs per-sequence means (exact under gradient accumulation),
NEFTune noise (training only), and bad chat records named by file, row and field."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from alignkit.api import build_config
from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.pack import pack
from alignkit.data.tokenize import TokenizedExample, tokenize_record, train_on_prompt
from alignkit.errors import ConfigError, DataError
from alignkit.losses import build_options, get_loss
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train.loop import train
from alignkit.train.loss_inputs import mean_trained_lengths
from alignkit.train.method import Method
from alignkit.train.neftune import neftune, sequence_lengths

WORDS = ["hi", "there", "good", "bad", "how", "are", "you", "fine", "thanks", "bye", "ok", "review", "my", "movie",
         ":", "it", "was", "very", "so", "be", "brief"]

CHAT = {"messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "good"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
    {"role": "user", "content": "bye"},  # after the last assistant turn: no loss, dropped
]}
PLAIN = [
    {"prompt": "review my movie :", "completion": "it was very good"},
    {"prompt": "hi", "completion": "bad"},
    {"prompt": "how are you", "completion": "fine thanks so very fine"},
]


@pytest.fixture()
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", len(build_word_tokenizer(WORDS)), seed=3, hidden=32, layers=2, heads=4).eval()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sft_examples(tokenizer) -> list[TokenizedExample]:
    chat_2 = {"messages": [{"role": "user", "content": "review my movie :"}, {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": "so"}, {"role": "assistant", "content": "it was good"}]}
    records = [*PLAIN, CHAT, chat_2]
    return [tokenize_record(tokenizer, r, "sft", max_length=64) for r in records]


def unpacked_trained_logps(model, example: TokenizedExample) -> torch.Tensor:
    """Log-probs of the loss-carrying response tokens, from one unpacked forward pass of [prompt, response]."""
    response = example.response_ids[0]
    logits = model(input_ids=torch.tensor([example.prompt_ids + response])).logits[0].float()
    start = len(example.prompt_ids) - 1
    logps = torch.log_softmax(logits[start:start + len(response)], -1).gather(1, torch.tensor(response)[:, None])[:, 0]
    mask = example.response_loss_masks[0] if example.response_loss_masks else [True] * len(response)
    return logps[torch.tensor(mask)]


def sft_setup(token_mean: bool):
    spec = get_loss("sft")
    cfg = TrainConfig(model="tiny", loss="sft", loss_options={"token_mean": token_mean})
    return spec, build_options(spec, cfg.loss_options), cfg


# ---- packed == unpacked ----


@pytest.mark.parametrize("token_mean", [False, True])
def test_packed_sft_loss_equals_unpacked_sequences(model, tokenizer, token_mean):
    examples = sft_examples(tokenizer)
    batch = pack(examples, max_tokens_per_row=2 * max(e.num_tokens for e in examples))
    assert batch.input_ids.shape[0] >= 2
    spec, opts, cfg = sft_setup(token_mean)
    indices = range(len(examples))
    with torch.no_grad():
        losses, metrics = Method(spec, opts).forward(model, batch, examples, None,
                                         mean_trained_lengths(examples, indices))
        per_sequence = [unpacked_trained_logps(model, e) for e in examples]
    nll = torch.stack([-t.mean() for t in per_sequence])
    torch.testing.assert_close(metrics["nll"], nll, rtol=0, atol=1e-5)
    expected = -torch.cat(per_sequence).sum() / sum(len(t) for t in per_sequence) if token_mean else nll.mean()
    torch.testing.assert_close(losses.sum() / len(examples), expected, rtol=0, atol=1e-5)
    assert batch.seq_lengths[:, 0].tolist() == [len(t) for t in per_sequence]


def test_packed_sft_gradient_equals_unpacked(model, tokenizer):
    model = copy.deepcopy(model)
    examples = sft_examples(tokenizer)
    batch = pack(examples, max_tokens_per_row=64)
    spec, opts, cfg = sft_setup(False)
    losses, _ = Method(spec, opts).forward(model, batch, examples)
    losses.mean().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.stack([-unpacked_trained_logps(model, e).mean() for e in examples]).mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


# ---- which tokens carry loss ----


def test_multi_turn_chat_trains_every_assistant_turn_and_nothing_else(tokenizer):
    example = tokenize_record(tokenizer, CHAT, "sft", max_length=64)
    assert example.prompt_ids == ids(tokenizer, "<|system|> be brief <|end|> <|user|> hi there <|end|> <|assistant|>")
    assert example.response_ids == [ids(tokenizer, "good <|end|> <|user|> how are you <|end|> <|assistant|> fine "
                                              "thanks <|end|>")]  # the trailing user turn is gone
    batch = pack([TokenizedExample([5, 6], [[7]]), example], max_tokens_per_row=64)
    mine = batch.token_seq == 1
    targets = batch.token_targets[mine]
    assert tokenizer.convert_ids_to_tokens(targets.tolist()) == ["good", "<|end|>", "fine", "thanks", "<|end|>"]
    # each target is the token right after the position whose logits predict it, in the packed row
    rows, pred = batch.token_rows[mine], batch.token_pred_positions[mine]
    assert torch.equal(batch.input_ids[rows, pred + 1], targets)
    assert batch.seq_lengths.tolist() == [[1.0], [5.0]] and example.trained_lengths == [5]
    user_tokens = set(ids(tokenizer, "be brief hi there how are you <|user|> <|system|> <|assistant|>"))
    assert not user_tokens & set(targets.tolist())


def test_chat_with_the_tokenizers_own_template(tokenizer):
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> "
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    record = {"messages": CHAT["messages"][1:5]}
    example = tokenize_record(tokenizer, record, "chat", max_length=64)
    assert example.prompt_ids == ids(tokenizer, "<bos><|user|> hi there <eos> <|assistant|>")
    trained = [t for t, keep in zip(example.response_ids[0], example.response_loss_masks[0]) if keep]
    assert trained == ids(tokenizer, "good <eos> fine thanks <eos>")


def test_chat_truncation_keeps_the_start_and_drops_untrained_tail(tokenizer):
    full = tokenize_record(tokenizer, CHAT, "sft", max_length=64)
    room = 4  # "good <|end|> <|user|> how" -> the cut user turn at the end is dropped
    example = tokenize_record(tokenizer, CHAT, "sft", max_length=len(full.prompt_ids) + room)
    assert example.response_ids == [ids(tokenizer, "good <|end|>")]
    assert example.response_loss_masks == [[True, True]]


def test_include_prompt_trains_every_token_but_the_first(tokenizer):
    for record in (PLAIN[0], CHAT):
        example = tokenize_record(tokenizer, record, "sft", max_length=64)
        whole = example.prompt_ids + example.response_ids[0]
        with_prompt = train_on_prompt(example)
        batch = pack([with_prompt])
        assert with_prompt.prompt_ids == whole[:1]
        assert batch.token_targets.tolist() == whole[1:]  # user turns and generation prompts too


def test_include_prompt_through_the_loop(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PLAIN))
    cfg = TrainConfig(model="tiny", loss="sft", train_data=str(path), sft_include_prompt=True, max_steps=1,
                      output_dir=str(tmp_path / "run"), progress=False, learning_rate=1e-3)
    model = build_tiny_model("llama", len(tokenizer), seed=0, hidden=16, layers=1, heads=2)
    start = copy.deepcopy(model).eval()
    # the reference: one unpacked forward over the whole [prompt, completion] sequence; every token but the first is
    # predicted and trained (the loss is logged before the update, as the mean over examples of each sequence's mean)
    expected = []
    with torch.no_grad():
        for record in PLAIN:
            example = tokenize_record(tokenizer, record, "sft", max_length=64)
            ids = example.prompt_ids + example.response_ids[0]
            logps = torch.log_softmax(start(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
            expected.append(-logps.gather(1, torch.tensor(ids[1:])[:, None]).mean())
    result = train(cfg, model, tokenizer)
    assert result.final_metrics["examples"] == 3
    assert result.final_metrics["loss"] == pytest.approx(float(torch.stack(expected).mean()), abs=1e-5)
    with pytest.raises(ConfigError, match="sft_include_prompt"):
        train(cfg.model_copy(update={"loss": "dpo"}), model, tokenizer)


# ---- token-mean vs per-sequence mean, exact under gradient accumulation ----


def test_token_mean_is_over_the_whole_optimizer_step(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    records = [*PLAIN, {"prompt": "hi", "completion": "ok"}, CHAT]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    model = build_tiny_model("llama", len(tokenizer), seed=1, hidden=16, layers=1, heads=2)
    start = copy.deepcopy(model).eval()
    examples = [tokenize_record(tokenizer, r, "sft", max_length=64) for r in records]
    with torch.no_grad():
        per_sequence = [unpacked_trained_logps(start, e) for e in examples]
    token_mean = -torch.cat(per_sequence).sum() / sum(len(t) for t in per_sequence)
    sequence_mean = torch.stack([-t.mean() for t in per_sequence]).mean()
    assert abs(token_mean - sequence_mean) > 1e-3  # the lengths differ, so the two reductions do too

    for option, expected in ((True, token_mean), (False, sequence_mean)):
        # micro-batches of ~2 examples, all in one optimizer step: the loss is logged before the update
        cfg = TrainConfig(model="tiny", loss="sft", loss_options={"token_mean": option}, train_data=str(path),
                          max_tokens_per_batch=24, grad_accum=8, max_steps=1, output_dir=str(tmp_path / f"r{option}"),
                          progress=False, learning_rate=1e-3)
        result = train(cfg, copy.deepcopy(start).train(), tokenizer)
        assert result.final_metrics["examples"] == len(records)
        assert result.final_metrics["loss"] == pytest.approx(float(expected), abs=1e-5)


def test_sft_options_from_the_command_line_keys():
    overrides = {"model": "tiny", "token_mean": True, "sft_include_prompt": True, "neftune_alpha": 5}
    cfg = build_config("sft", None, overrides)
    assert cfg.loss_options == {"token_mean": True} and cfg.sft_include_prompt and cfg.neftune_alpha == 5
    with pytest.raises(ConfigError, match="neftune_alpha"):
        build_config("sft", None, {**overrides, "neftune_alpha": -1})


# ---- NEFTune ----


def test_neftune_sequence_lengths_are_per_packed_sequence():
    examples = [TokenizedExample([1, 2, 3], [[4, 5]]), TokenizedExample([6], [[7, 8, 9]]),
                TokenizedExample([1, 2], [[3], [4, 5, 6]])]
    batch = pack(examples[:2], max_tokens_per_row=100)
    assert sequence_lengths(batch).tolist() == [[5, 5, 5, 5, 5, 4, 4, 4, 4]]
    batch = pack(examples[:2], max_tokens_per_row=6, pad_token_id=0)
    assert sequence_lengths(batch).tolist() == [[5, 5, 5, 5, 5], [4, 4, 4, 4, 0]]
    pairs = pack([examples[2]], max_tokens_per_row=100)  # prompt: |P| + longest response; response i: |P| + |R_i|
    assert sequence_lengths(pairs).tolist() == [[5, 5, 3, 5, 5, 5]]
    padded = pack([examples[0], TokenizedExample([1], [[2]])], max_tokens_per_row=5)
    assert sequence_lengths(padded).tolist() == [[5, 5, 5, 5, 5], [2, 2, 0, 0, 0]]


def test_neftune_noise_is_uniform_within_alpha_over_sqrt_length_times_width(model, tokenizer):
    model = copy.deepcopy(model).train()
    examples = sft_examples(tokenizer)
    batch = pack(examples, max_tokens_per_row=200)
    embedding = model.get_input_embeddings()
    clean = embedding(batch.input_ids)
    alpha, width = 5.0, embedding.weight.shape[1]
    with neftune(model, batch, alpha):
        noisy = embedding(batch.input_ids)
    noise = (noisy - clean).abs().amax(-1)  # [R, T] largest |noise| of each token over its coordinates
    lengths = sequence_lengths(batch).float()
    bound = alpha / torch.sqrt(lengths.clamp(min=1) * width)
    real = lengths > 0
    assert (noise[real] <= bound[real] * (1 + 1e-5)).all() and (noise[~real] == 0).all()
    for b, example in enumerate(examples):  # uniform draws come close to the bound somewhere in each sequence
        here = batch.example_ids == b
        assert noise[here].max() > 0.9 * alpha / (example.num_tokens * width) ** 0.5
    assert not embedding._forward_hooks  # the hook is gone after the block


def test_neftune_changes_the_training_loss_but_not_evaluation(model, tokenizer):
    model = copy.deepcopy(model)
    examples = sft_examples(tokenizer)
    batch = pack(examples, max_tokens_per_row=200)
    spec, opts, cfg = sft_setup(False)

    def loss() -> float:
        with torch.no_grad():
            return float(Method(spec, opts).forward(model, batch, examples)[0].mean())

    model.eval()
    clean_eval = loss()
    with neftune(model, batch, 5.0):
        assert loss() == clean_eval
    model.train()
    assert loss() == pytest.approx(clean_eval, abs=1e-6)  # no dropout in the tiny model: train == eval without noise
    with neftune(model, batch, 5.0):
        noisy = loss()
    assert abs(noisy - clean_eval) > 1e-5  # an untrained model is near-uniform: small, but far above rounding


def test_neftune_through_the_loop_changes_train_loss_not_eval_loss(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*PLAIN, CHAT]))
    results = {}
    for alpha in (0.0, 5.0):
        cfg = TrainConfig(model="tiny", loss="sft", train_data=str(path), eval_data=str(path), neftune_alpha=alpha,
                          max_steps=1, learning_rate=1e-9, output_dir=str(tmp_path / f"a{alpha}"), progress=False)
        model = build_tiny_model("llama", len(tokenizer), seed=2, hidden=16, layers=1, heads=2)
        results[alpha] = train(cfg, model, tokenizer).final_metrics
    assert abs(results[5.0]["loss"] - results[0.0]["loss"]) > 1e-3
    assert results[5.0]["eval/loss"] == pytest.approx(results[0.0]["eval/loss"], abs=1e-5)


# ---- bad chat records ----


@pytest.mark.parametrize("line,field", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "ok"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "ok"}]}, "messages[1].role"),
    ({"messages": "hi there"}, "messages"),
])
def test_bad_chat_record_names_file_row_and_field(tmp_path, tokenizer, line, field):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [CHAT, PLAIN[0], line]))
    with pytest.raises(DataError) as err:
        prepare_examples(str(path), tokenizer, ExampleSettings("sft", max_length=64))
    assert (err.value.file, err.value.row, err.value.field) == (str(path), 3, field)
    kept = prepare_examples(str(path), tokenizer, ExampleSettings("sft", max_length=64, on_bad_record="skip"))
    assert [e.row for e in kept] == [1, 2]


def test_chat_template_that_rewrites_earlier_turns_is_a_data_error(tokenizer):
    # drops the system turn once the conversation has 4 messages: the second assistant turn's prefix changes
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' or messages|length < 4 %}"
                               "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    record = {**CHAT, "_source": "c.jsonl", "_row": 9}
    with pytest.raises(DataError) as err:
        tokenize_record(tokenizer, record, "sft", max_length=64)
    assert (err.value.file, err.value.row, err.value.field) == ("c.jsonl", 9, "messages[4]")

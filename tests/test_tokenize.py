"""data.template + data.tokenize: chat rendering (default and a tokenizer's own template), EOS on plain
responses, the truncation policy, and prompt-too-long errors that name file, row and field."""

from __future__ import annotations

import json
import logging

import pytest

from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.template import DEFAULT_CHAT_TEMPLATE, render
from alignkit.data.tokenize import tokenize_record, tokenize_records
from alignkit.errors import DataError
from alignkit.models.tiny import build_word_tokenizer

WORDS = ["review", "my", "movie", ":", "it", "was", "good", "bad", "very", "really", "and", "so", "one", "two",
         "three", "four", "five", "six", "seven", "eight", "nine", "ten", "be", "brief"]

# A template of the tokenizer's own, different from alignkit's default: BOS first, "<eos>" closes each turn.
OWN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture()
def tokenizer():
    return build_word_tokenizer(WORDS)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---- rendering ----


def test_plain_string_responses_get_eos(tokenizer):
    example = tokenize_record(tokenizer, {"prompt": "review my movie :", "chosen": "it was good", "rejected": "bad"},
                              "pairs", max_length=64)
    assert example.prompt_ids == ids(tokenizer, "review my movie :")
    assert example.response_ids == [ids(tokenizer, "it was good") + [tokenizer.eos_token_id],
                                    ids(tokenizer, "bad") + [tokenizer.eos_token_id]]
    assert tokenizer.unk_token_id not in example.prompt_ids + sum(example.response_ids, [])


def test_chat_records_use_the_default_template_when_the_tokenizer_has_none(tokenizer):
    assert tokenizer.chat_template is None
    record = {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "review my movie :"}],
        "chosen": [{"role": "assistant", "content": "it was good"}],
        "rejected": "bad",  # a plain string next to a chat prompt is an assistant turn
    }
    prompt_text, response_texts = render(tokenizer, record["prompt"], [record["chosen"], record["rejected"]])
    assert prompt_text == "<|system|> be brief <|end|> <|user|> review my movie : <|end|> <|assistant|> "
    assert response_texts == ["it was good <|end|> ", "bad <|end|> "]

    example = tokenize_record(tokenizer, record, "pairs", max_length=64)
    assert example.prompt_ids == ids(tokenizer, prompt_text)
    assert example.response_ids == [ids(tokenizer, "it was good <|end|>"), ids(tokenizer, "bad <|end|>")]
    # the template's end-of-turn marks the end; no EOS is added to chat responses
    assert all(r[-1] == tokenizer.convert_tokens_to_ids("<|end|>") for r in example.response_ids)
    # the default template is what render used, and the tokenizer itself is left without a template
    assert tokenizer.apply_chat_template(record["prompt"], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True) == prompt_text
    assert tokenizer.chat_template is None


def test_string_prompt_with_chat_response_becomes_a_user_turn(tokenizer):
    prompt_text, texts = render(tokenizer, "review my movie :", [[{"role": "assistant", "content": "good"}]])
    assert prompt_text == "<|user|> review my movie : <|end|> <|assistant|> "
    assert texts == ["good <|end|> "]


def test_chat_records_use_the_tokenizers_own_template(tokenizer):
    tokenizer.chat_template = OWN_TEMPLATE
    record = {"prompt": [{"role": "user", "content": "review my movie :"}], "completion": "it was good"}
    example = tokenize_record(tokenizer, record, "sft", max_length=64)
    assert example.prompt_ids == ids(tokenizer, "<bos><|user|> review my movie : <eos> <|assistant|> ")
    assert example.prompt_ids[0] == tokenizer.bos_token_id
    assert example.response_ids == [ids(tokenizer, "it was good <eos>")]
    assert tokenizer.convert_tokens_to_ids("<|end|>") not in example.prompt_ids + example.response_ids[0]


def test_template_that_does_not_render_the_prompt_as_a_prefix_is_a_data_error(tokenizer):
    tokenizer.chat_template = "{{ messages | length }} " + OWN_TEMPLATE  # the turn count changes the head
    record = {"prompt": [{"role": "user", "content": "review"}], "chosen": "good", "rejected": "bad",
              "_source": "pairs.jsonl", "_row": 3}
    with pytest.raises(DataError) as err:
        tokenize_record(tokenizer, record, "pairs", max_length=64)
    assert (err.value.file, err.value.row, err.value.field) == ("pairs.jsonl", 3, "chosen")


def test_list_records_tokenise_every_response_and_keep_scores(tokenizer):
    record = {"prompt": "review my movie :", "responses": ["good", "bad", "it was good"], "scores": [2.0, 0.0, 3.0]}
    example = tokenize_record(tokenizer, record, "lists", max_length=64)
    assert len(example.response_ids) == 3 and example.extras == {"scores": [2.0, 0.0, 3.0]}
    unpaired = tokenize_record(tokenizer, {"prompt": "review", "completion": "good", "label": True}, "unpaired", 64)
    assert unpaired.extras == {"label": True}


# ---- truncation ----


def test_prompt_keeps_its_end(tokenizer):
    record = {"prompt": "one two three four five six", "chosen": "good", "rejected": "bad"}
    example = tokenize_record(tokenizer, record, "pairs", max_length=64, max_prompt_length=3)
    assert example.prompt_ids == ids(tokenizer, "four five six")


def test_responses_keep_their_start_to_fit_max_length(tokenizer):
    record = {"prompt": "one two three", "chosen": "four five six seven eight", "rejected": "nine"}
    example = tokenize_record(tokenizer, record, "pairs", max_length=6)
    assert example.prompt_ids == ids(tokenizer, "one two three")
    # room = 6 - 3: the long response keeps its first 3 tokens (its EOS is cut), the short one is whole
    assert example.response_ids == [ids(tokenizer, "four five six"), ids(tokenizer, "nine") + [tokenizer.eos_token_id]]
    for response in example.response_ids:
        assert len(example.prompt_ids) + len(response) <= 6


def test_prompt_truncation_applies_before_the_max_length_check(tokenizer):
    record = {"prompt": "one two three four five six seven eight", "chosen": "good", "rejected": "bad"}
    example = tokenize_record(tokenizer, record, "pairs", max_length=5, max_prompt_length=3)
    assert example.prompt_ids == ids(tokenizer, "six seven eight")
    assert example.response_ids[0] == ids(tokenizer, "good") + [tokenizer.eos_token_id]


def test_chat_prompt_truncation_keeps_the_generation_prompt(tokenizer):
    record = {"prompt": [{"role": "user", "content": "one two three four five"}], "completion": "good"}
    example = tokenize_record(tokenizer, record, "sft", max_length=64, max_prompt_length=4)
    assert example.prompt_ids == ids(tokenizer, "four five <|end|> <|assistant|>")


@pytest.mark.parametrize("prompt_words", [4, 6])
def test_prompt_that_fills_max_length_names_file_row_and_field(tokenizer, tmp_path, prompt_words):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "review my", "chosen": "good", "rejected": "bad"},
        {"prompt": " ".join(["one"] * prompt_words), "chosen": "good", "rejected": "bad"},
        {"prompt": "review", "chosen": "it was good", "rejected": "bad"},
    ])
    with pytest.raises(DataError) as err:
        prepare_examples(path, tokenizer, ExampleSettings("pairs", max_length=4))
    assert (err.value.file, err.value.row, err.value.field) == (path, 2, "prompt")
    message = str(err.value)
    assert path in message and "row 2" in message and "'prompt'" in message and "max_length" in message

    with_skip = prepare_examples(path, tokenizer, ExampleSettings("pairs", max_length=4, on_bad_record="skip"))
    assert [e.row for e in with_skip] == [1, 3]
    assert all(e.source == path for e in with_skip)


def test_skip_logs_a_warning_and_all_bad_is_an_error(tokenizer, caplog):
    records = [{"prompt": "one two three", "chosen": "good", "rejected": "bad", "_source": "m", "_row": 1},
               {"prompt": "one", "chosen": "good", "rejected": "bad", "_source": "m", "_row": 2}]
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        kept = tokenize_records(tokenizer, records, ExampleSettings("pairs", max_length=3, on_bad_record="skip"))
    assert [e.row for e in kept] == [2]
    assert "skipped 1 record" in caplog.text and "row 1" in caplog.text
    with pytest.raises(DataError, match="no usable records"):
        tokenize_records(tokenizer, records[:1], ExampleSettings("pairs", max_length=3, on_bad_record="skip"))
    with pytest.raises(DataError):
        tokenize_records(tokenizer, records, ExampleSettings("pairs", max_length=3))  # "error" is the default


def test_response_that_tokenises_to_nothing_is_named(tokenizer):
    tokenizer.eos_token = None  # no EOS to append, and the text itself yields no tokens
    record = {"prompt": "review", "chosen": "good", "rejected": "   ", "_source": "f.jsonl", "_row": 7}
    with pytest.raises(DataError) as err:
        tokenize_record(tokenizer, record, "pairs", max_length=16)
    assert (err.value.row, err.value.field) == (7, "rejected")

"""TRL users' data as it is: records written inline in exactly the shapes of trl-lib/ultrafeedback_binarized,
Anthropic/hh-rlhf, trl-lib/kto-mix-14k and a tool-calling SFT set; every source kind (file, folder of files, glob,
save_to_disk folder, Dataset, subsampling) and the hub offline; degenerate records named."""

from __future__ import annotations

import json
import time

import pytest

from alignkit.config import DataSource
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import load_records
from alignkit.errors import DataError

ULTRAFEEDBACK = {  # trl-lib/ultrafeedback_binarized: implicit prompt, conversational, with scores
    "chosen": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
    "rejected": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 5."}],
    "score_chosen": 9.0, "score_rejected": 2.0,
}
HH = {  # Anthropic/hh-rlhf: whole transcripts as strings
    "chosen": "\n\nHuman: Can you help me bake bread?\n\nAssistant: Yes: flour, water, salt and yeast.",
    "rejected": "\n\nHuman: Can you help me bake bread?\n\nAssistant: No.",
}
KTO_MIX = {  # trl-lib/kto-mix-14k
    "prompt": [{"role": "user", "content": "Name a primary colour."}],
    "completion": [{"role": "assistant", "content": "Blue."}], "label": True,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_SFT = {  # a tool-calling SFT conversation with its `tools` column
    "messages": [{"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": "",
                  "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                   "arguments": {"city": "Paris"}}}]},
                 {"role": "tool", "content": "18 C, sunny"},
                 {"role": "assistant", "content": "It is 18 C and sunny in Paris."}],
    "tools": TOOLS,
}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_implicit_prompt_conversations(tmp_path):
    [record] = load_records(write(tmp_path / "uf.jsonl", [ULTRAFEEDBACK]), shape="pairs")
    assert record["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert record["chosen"] == [{"role": "assistant", "content": "It is 4."}]
    assert record["rejected"] == [{"role": "assistant", "content": "It is 5."}]
    assert record["score_chosen"] == 9.0


def test_implicit_prompt_transcripts(tmp_path):
    [record] = load_records(write(tmp_path / "hh.jsonl", [HH]), shape="pairs")
    assert record["prompt"] == "\n\nHuman: Can you help me bake bread?\n\nAssistant: "
    assert record["chosen"] == "Yes: flour, water, salt and yeast." and record["rejected"] == "No."


@pytest.mark.parametrize("record,field,message", [
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}]}, "prompt",
     "share no leading turn"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, "chosen[1]",
     "before their last assistant turn"),
    ({"chosen": "Hello there", "rejected": "Goodbye"}, "prompt", "share no leading text"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
])
def test_bad_implicit_prompts_are_named(tmp_path, record, field, message):
    path = write(tmp_path / "bad.jsonl", [ULTRAFEEDBACK, record])
    with pytest.raises(DataError, match=message) as err:
        load_records(path, shape="pairs")
    assert (err.value.file, err.value.row, err.value.field) == (path, 2, field)


def test_pairs_identical_after_tokenisation_are_named(tmp_path, task):
    # differ as text, identical once templated and tokenised (the tiny tokenizer splits on whitespace)
    path = write(tmp_path / "p.jsonl", [{"prompt": "review my phone", "chosen": "good  phone", "rejected": "good phone"}])
    with pytest.raises(DataError, match="identical to chosen after templating") as err:
        prepare_examples(path, task.tokenizer, ExampleSettings("pairs", 64))
    assert (err.value.row, err.value.field) == (1, "rejected")


def test_lists_whose_scores_tie_and_single_label_kto_sets_are_named(tmp_path, task):
    path = write(tmp_path / "l.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}])
    with pytest.raises(DataError, match="tie") as err:
        load_records(path, shape="lists")
    assert err.value.field == "scores"
    only_true = write(tmp_path / "kto.jsonl", [KTO_MIX, {**KTO_MIX, "completion": "Red."}])
    assert len(load_records(only_true, shape="unpaired")) == 2  # loading is fine; training on it is not
    with pytest.raises(DataError, match="labelled True"):
        prepare_examples(only_true, task.tokenizer, ExampleSettings("unpaired", 64, training=True))
    skipped = write(tmp_path / "mixed.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]},
                                               {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}])
    assert len(load_records(skipped, shape="lists", on_bad_record="skip")) == 1


def test_kto_mix_and_tool_calling_sft_tokenise(tmp_path, task):
    kto = write(tmp_path / "kto.jsonl", [KTO_MIX, {**KTO_MIX, "label": False}])
    assert len(prepare_examples(kto, task.tokenizer, ExampleSettings("unpaired", 64, training=True))) == 2
    seen = {}

    class Recorder:  # the tokenizer's apply_chat_template receives the tools column
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def __call__(self, *args, **kwargs):
            return self.tokenizer(*args, **kwargs)

        def apply_chat_template(self, messages, **kwargs):
            seen["tools"] = kwargs.get("tools")
            kwargs.pop("tools", None)
            return self.tokenizer.apply_chat_template(messages, **kwargs)

    sft = write(tmp_path / "tools.jsonl", [TOOL_SFT])
    [example] = prepare_examples(sft, Recorder(task.tokenizer), ExampleSettings("sft", 128))
    assert seen["tools"] == TOOLS and example.response_ids[0]


def test_every_source_kind(tmp_path):
    import datasets

    records = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    folder = tmp_path / "files"
    folder.mkdir()
    write(folder / "part-0.jsonl", records[:4])
    datasets.Dataset.from_list(records[4:]).to_parquet(str(folder / "part-1.parquet"))
    from_folder = load_records(str(folder), shape="pairs")
    assert [r["prompt"] for r in from_folder] == [r["prompt"] for r in records]
    assert from_folder[5]["_source"].endswith("part-1.parquet") and from_folder[5]["_row"] == 2
    assert len(load_records(str(folder / "*.jsonl"), shape="pairs")) == 4
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(records)}).save_to_disk(str(saved))
    with pytest.raises(DataError, match="train_prefs"):
        load_records(str(saved), shape="pairs")
    assert len(load_records(DataSource(path=str(saved), split="train_prefs"), shape="pairs")) == 10
    first = load_records({"path": str(folder), "num_samples": 3}, shape="pairs")
    assert [r["prompt"] for r in first] == ["p0", "p1", "p2"]
    drawn = load_records({"path": str(folder), "num_samples": 3, "shuffle_seed": 1}, shape="pairs")
    again = load_records({"path": str(folder), "num_samples": 3, "shuffle_seed": 1}, shape="pairs")
    assert drawn == again and drawn != first and len(drawn) == 3


def test_a_hub_id_offline_fails_at_once_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tic = time.perf_counter()
    with pytest.raises(DataError, match="hub is unreachable") as err:
        load_records("HuggingFaceH4/ultrafeedback_binarized", shape="pairs")
    assert time.perf_counter() - tic < 5 and "\n" not in str(err.value)
    assert err.value.file == "HuggingFaceH4/ultrafeedback_binarized"
    with pytest.raises(DataError, match="cannot read file"):  # a missing file is not taken for a hub id
        load_records("missing/train.jsonl", shape="pairs")


def test_a_second_preparation_is_read_from_the_cache(tmp_path, task, monkeypatch):
    import alignkit.data as data_module
    from alignkit.data import tokenize as tokenize_module

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path / "p.jsonl", [{"prompt": "review my phone", "chosen": "good phone", "rejected": "bad"}] * 3)
    first = data_module.prepare_examples(path, task.tokenizer, ExampleSettings("pairs", 64), cache=True)
    calls = []
    real = tokenize_module.tokenize_stream
    monkeypatch.setattr(tokenize_module, "tokenize_stream", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = data_module.prepare_examples(path, task.tokenizer, ExampleSettings("pairs", 64), cache=True)
    assert [(e.prompt_ids, e.response_ids, e.row) for e in second] == [(e.prompt_ids, e.response_ids, e.row)
                                                                         for e in first]
    assert calls == []  # nothing read or tokenised again
    data_module.prepare_examples(path, task.tokenizer, ExampleSettings("pairs", 32), cache=True)  # another setting: a miss
    write(tmp_path / "p.jsonl", [{"prompt": "review my phone", "chosen": "good phone", "rejected": "awful"}] * 3)
    # the file changed: a miss
    changed = data_module.prepare_examples(path, task.tokenizer, ExampleSettings("pairs", 64), cache=True)
    assert len(calls) == 2 and changed[0].response_ids != first[0].response_ids

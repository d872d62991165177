"""Streaming, batched preparation (data/tokenize.tokenize_stream) and the compact example table (data/table.py):
batched encoding equals one tokenizer call per text, the streamed table equals record-by-record tokenisation across
batch boundaries and bad records, a record batch is read only when it is tokenised, and the table gives back
exactly the examples put in while holding 2 bytes per token."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import alignkit.data.tokenize as tokenize_module
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import load_records
from alignkit.data.table import build_table, select, token_counts
from alignkit.data.tokenize import TokenizedExample, encode_texts, tokenize_record
from alignkit.errors import DataError
from alignkit.models.tiny import build_word_tokenizer

WORDS = "review my movie : it was good bad very really and so one two three be brief".split()
TEXTS = ["review my movie", "", "  it was   good ", "bad\n\nvery", "unknown wörds ✓ here", "so" * 30, "<|im_end|> be"]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_batched_encoding_equals_one_call_per_text():
    tokenizer = build_word_tokenizer(WORDS)
    assert encode_texts(tokenizer, TEXTS) == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert encode_texts(tokenizer, []) == []


@pytest.mark.slow
def test_batched_encoding_equals_one_call_per_text_on_smollm2(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    texts = [*TEXTS, "<|im_start|>user\nWhat is 12,345 × 6?<|im_end|>\n", "naïve café — 日本語 🙂", "\t\tindent"]
    assert encode_texts(tokenizer, texts) == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def mixed_records():
    """Pairs as plain strings and as conversations (some with a system turn), prompts too long for max_length,
    identical sides: good and bad records interleaved."""
    records = []
    for i in range(23):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 5))
        if i % 7 == 3:
            records.append({"prompt": " ".join(["very"] * 40), "chosen": "good", "rejected": "bad"})  # too long
        elif i % 7 == 5:
            records.append({"prompt": words, "chosen": "so good", "rejected": "so good"})  # identical
        elif i % 2:
            system = [{"role": "system", "content": "be brief"}] if i % 3 else []
            records.append({"prompt": [*system, {"role": "user", "content": words}],
                            "chosen": [{"role": "assistant", "content": "it was good " * (i % 4 + 1)}],
                            "rejected": [{"role": "assistant", "content": "bad"}], "margin": float(i)})
        else:
            records.append({"prompt": words, "chosen": "really good", "rejected": "bad " * (i % 3 + 1)})
    return records


def test_streamed_table_equals_record_by_record_tokenisation(tmp_path, monkeypatch):
    tokenizer = build_word_tokenizer(WORDS)
    path = write_jsonl(tmp_path / "pairs.jsonl", mixed_records())
    monkeypatch.setattr(tokenize_module, "BATCH_RECORDS", 4)  # many batch boundaries, bad records inside batches
    table = prepare_examples(path, tokenizer, ExampleSettings("pairs", max_length=24, on_bad_record="skip"))
    expected = []
    for record in load_records(path, shape="pairs", on_bad_record="skip"):
        try:
            expected.append(tokenize_record(tokenizer, record, "pairs", 24))
        except DataError:
            continue
    assert 0 < len(expected) < 23
    assert list(table) == expected
    assert token_counts(table) == [e.num_tokens for e in expected]
    with pytest.raises(DataError, match=r"pairs.jsonl, row 4, field 'prompt'"):  # the first bad record, by name
        prepare_examples(path, tokenizer, ExampleSettings("pairs", max_length=24))
    truncated = prepare_examples(path, tokenizer,
                                 ExampleSettings("pairs", max_length=24, max_prompt_length=20, on_bad_record="skip"))
    assert list(truncated) == [tokenize_record(tokenizer, r, "pairs", 24, 20)
                               for r in load_records(path, shape="pairs", on_bad_record="skip")]


def test_chats_with_loss_masks_and_unpaired_labels_stream_exactly(tmp_path, monkeypatch):
    tokenizer = build_word_tokenizer(WORDS)
    chats = [{"messages": [{"role": "user", "content": " ".join(WORDS[i:i + 3])},
                           {"role": "assistant", "content": "good " * (i % 3 + 1)},
                           {"role": "user", "content": "and so"}, {"role": "assistant", "content": "bad"}]}
             for i in range(9)]
    monkeypatch.setattr(tokenize_module, "BATCH_RECORDS", 2)
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    table = prepare_examples(path, tokenizer, ExampleSettings("sft", max_length=64))
    assert list(table) == [tokenize_record(tokenizer, r, "sft", 64) for r in load_records(path, shape="sft")]
    assert all(e.response_loss_masks and not all(e.response_loss_masks[0]) for e in table)
    unpaired = [{"prompt": "review", "completion": w, "label": i % 2 == 0} for i, w in enumerate(WORDS[:6])]
    kto = prepare_examples(write_jsonl(tmp_path / "kto.jsonl", unpaired), tokenizer,
                           ExampleSettings("unpaired", 32, training=True))
    assert [e.extras["label"] for e in kto] == [r["label"] for r in unpaired]
    one_label = [{**r, "label": True} for r in unpaired]
    with pytest.raises(DataError, match="every record is labelled True"):
        prepare_examples(write_jsonl(tmp_path / "one.jsonl", one_label), tokenizer,
                         ExampleSettings("unpaired", 32, training=True))


def test_records_are_read_one_batch_at_a_time(tmp_path, monkeypatch):
    tokenizer = build_word_tokenizer(WORDS)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "review my movie", "chosen": "good", "rejected": w}
                                                  for w in ["bad", "very bad", "so bad"] * 5])
    read = []
    real_validate = tokenize_module.tokenize_batch

    def counting(tokenizer, records, *args):
        read.append((len(records), pulled[0]))
        return real_validate(tokenizer, records, *args)

    import alignkit.data.load as load_module

    real_iter = load_module.iter_records
    pulled = [0]

    def iter_counting(*args, **kwargs):
        for record in real_iter(*args, **kwargs):
            pulled[0] += 1
            yield record

    monkeypatch.setattr(load_module, "iter_records", iter_counting)
    monkeypatch.setattr(tokenize_module, "tokenize_batch", counting)
    monkeypatch.setattr(tokenize_module, "BATCH_RECORDS", 4)
    assert len(prepare_examples(path, tokenizer, ExampleSettings("pairs", 32))) == 15
    # each batch is tokenised as soon as it is read: never more than one batch of records held
    assert [size for size, _ in read] == [4, 4, 4, 3]
    assert [so_far for _, so_far in read] == [4, 8, 12, 15]


ids = st.lists(st.integers(0, 70_000), min_size=1, max_size=5)


@st.composite
def examples(draw):
    k = draw(st.integers(1, 3))
    responses = [draw(ids) for _ in range(k)]
    masks = draw(st.one_of(st.none(), st.just([[draw(st.booleans()) for _ in r] for r in responses])))
    extras = draw(st.one_of(st.just({}), st.fixed_dictionaries({"label": st.booleans()}),
                            st.fixed_dictionaries({"scores": st.lists(st.floats(-5, 5), min_size=k, max_size=k)})))
    return TokenizedExample(draw(ids), responses, draw(st.sampled_from(["a.jsonl", "b.jsonl"])),
                            draw(st.one_of(st.none(), st.integers(1, 10**6))), extras, masks)


@settings(max_examples=60, deadline=None)
@given(st.lists(examples(), min_size=1, max_size=12), st.data())
def test_the_table_gives_back_exactly_the_examples_put_in(items, data):
    table = build_table(items)
    assert list(table) == items and len(table) == len(items)
    assert table[-1] == items[-1] and table[1:3] == items[1:3]
    assert token_counts(table) == [e.num_tokens for e in items]
    order = data.draw(st.lists(st.integers(0, len(items) - 1), max_size=8))
    view = select(table, order)
    assert list(view) == [items[i] for i in order] and token_counts(view) == [items[i].num_tokens for i in order]
    assert list(pickle.loads(pickle.dumps(table))) == items
    widest = max(max(max(e.prompt_ids), *(max(r) for r in e.response_ids)) for e in items)
    assert table.tokens.dtype.itemsize == (2 if widest < 1 << 16 else 4)
    with pytest.raises(IndexError):
        table[len(items)]


def test_the_table_holds_two_bytes_per_token():
    items = [TokenizedExample(list(range(i, i + 50)), [list(range(100, 130)), list(range(200, 240))])
             for i in range(500)]
    table = build_table(items)
    n_tokens = sum(e.num_tokens for e in items)
    assert table.nbytes <= 2 * n_tokens + 8 * 3 * len(items) + 8 * 4 * len(items)  # tokens + offsets + per-example

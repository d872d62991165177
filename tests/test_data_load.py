"""data.load: every bad-record class names file, row and field; all source kinds load the same records."""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.data.load import load_records, write_jsonl_atomic
from alignkit.data.validate import validate_record
from alignkit.errors import ConfigError, DataError
from alignkit.shapes import SHAPES

GOOD_PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("_source", "_row")} for r in records]


def _write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    parts = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        parts.append(line if isinstance(line, bytes) else line.encode("utf-8"))
    path.write_bytes(b"\n".join(parts) + b"\n")
    return path


# Each case: (shape, the bad line, the field the error must name). The bad line is written at row 4, after
# a good record, a blank line and another good record, so row numbers count blank lines.
BAD_LINES = [
    ("pairs", '{"prompt": "hi", "chosen": "a", ', None),  # malformed JSON
    ("pairs", "[1, 2, 3]", None),  # not an object
    ("pairs", '"just a string"', None),
    ("pairs", '{"prompt": "hi", "chosen": "a"}', "rejected"),  # missing field
    ("pairs", '{"prompt": "", "chosen": "a", "rejected": "b"}', "prompt"),  # empty string
    ("pairs", '{"prompt": "hi", "chosen": "  \\n\\t", "rejected": "b"}', "chosen"),  # whitespace only
    ("pairs", '{"prompt": "hi", "chosen": 3, "rejected": "b"}', "chosen"),  # number
    ("pairs", '{"prompt": "hi", "chosen": "a", "rejected": null}', "rejected"),  # null
    ("pairs", '{"prompt": "hi", "chosen": "a", "rejected": {"text": "b"}}', "rejected"),
    ("pairs", '{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', "prompt"),  # lone surrogate
    ("pairs", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', None),  # latin-1 byte: not UTF-8
    ("pairs", b"\xff\xfe\x00garbage", None),
    ("pairs", '{"prompt": "hi", "chosen": [], "rejected": "b"}', "chosen"),
    (
        "pairs",
        '{"prompt": "hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}',
        "chosen[0].role",
    ),
    (
        "pairs",
        '{"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant"}], "rejected": "b"}',
        "chosen[1].content",
    ),
    (
        "pairs",
        '{"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": ""}],'
        ' "rejected": "b"}',
        "chosen[1].content",
    ),
    (
        "pairs",
        '{"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}',
        "prompt[0].role",
    ),
    (
        "pairs",
        '{"prompt": [{"role": ["user"], "content": "x"}], "chosen": "a", "rejected": "b"}',
        "prompt[0].role",
    ),
    ("pairs", '{"prompt": ["hello"], "chosen": "a", "rejected": "b"}', "prompt[0]"),
    ("unpaired", '{"prompt": "hi", "completion": "a", "label": 2}', "label"),
    ("unpaired", '{"prompt": "hi", "completion": "a", "label": "yes"}', "label"),
    ("unpaired", '{"prompt": "hi", "completion": "a"}', "label"),
    ("lists", '{"prompt": "hi", "responses": ["a", "b"], "scores": [1.0, NaN]}', "scores[1]"),
    ("lists", '{"prompt": "hi", "responses": ["a", "b"], "scores": [Infinity, 1]}', "scores[0]"),
    ("lists", '{"prompt": "hi", "responses": ["a", "b"], "scores": [1, "2"]}', "scores[1]"),
    ("lists", '{"prompt": "hi", "responses": ["a", "b"], "scores": [1, true]}', "scores[1]"),
    ("lists", '{"prompt": "hi", "responses": ["a", "b"], "scores": [1, 1e999]}', "scores[1]"),
    ("lists", '{"prompt": "hi", "responses": ["a", "b", "c"], "scores": [1, 2]}', "scores"),  # lengths differ
    ("lists", '{"prompt": "hi", "responses": ["a"], "scores": [1]}', "responses"),  # fewer than 2
    ("lists", '{"prompt": "hi", "responses": ["a", ""], "scores": [1, 2]}', "responses[1]"),
    ("lists", '{"prompt": "hi", "responses": "a b", "scores": [1, 2]}', "responses"),
    ("lists", '{"prompt": "hi", "responses": ["a", "b"], "scores": 3}', "scores"),
    ("sft", '{"prompt": "hi", "completion": false}', "completion"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}]}', "messages"),  # a chat with no assistant turn
    ("chat", '{"messages": "hi"}', "messages"),
    ("chat", '{"messages": []}', "messages"),
    ("chat", '{"prompt": "hi", "completion": "a"}', "messages"),
    ("chat", '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
     "messages[0].role"),
    ("chat", '{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}', "messages[1].role"),
    ("chat", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}',
     "messages[1].content"),
    ("chat", '{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}', "messages"),
    ("pairs", '{"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "big"}', "margin"),
    ("pairs", '{"prompt": "hi", "chosen": "a", "rejected": "b", "margin": NaN}', "margin"),
    ("prompts", '{"promt": "typo"}', "prompt"),
]

GOOD = {
    "pairs": GOOD_PAIR,
    "unpaired": {"prompt": "hi", "completion": "a", "label": True},
    "lists": {"prompt": "hi", "responses": ["a", "b", "c"], "scores": [1, 0.5, -2]},
    "sft": {"prompt": "hi", "completion": "a"},
    "negatives": {"prompt": "hi", "rejected": "a", "samples": ["b", "c"]},
    "prompts": {"prompt": "hi"},
    "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]},
}


@pytest.mark.parametrize("shape,bad_line,field", BAD_LINES)
def test_bad_jsonl_record_names_file_row_and_field(tmp_path, shape, bad_line, field):
    path = _write_lines(tmp_path / "train.jsonl", [GOOD[shape], "", GOOD[shape], bad_line, GOOD[shape]])
    with pytest.raises(DataError) as info:
        load_records(path, shape=shape)
    err = info.value
    assert (err.file, err.row, err.field) == (str(path), 4, field)
    message = str(err)
    assert str(path) in message and "row 4" in message
    if field is not None:
        assert f"field '{field}'" in message
    assert "on_bad_record: skip" in message


@pytest.mark.parametrize("shape,bad_line,field", BAD_LINES)
def test_skip_keeps_good_rows_and_logs_count(tmp_path, caplog, shape, bad_line, field):
    path = _write_lines(tmp_path / "train.jsonl", [GOOD[shape], "", GOOD[shape], bad_line, GOOD[shape]])
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        records = load_records(path, shape=shape, on_bad_record="skip")
    assert _strip(records) == [GOOD[shape]] * 3
    assert [r["_row"] for r in records] == [1, 3, 5]
    warnings = [r for r in caplog.records if r.name == "alignkit.data"]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "skipped 1 bad record(s) of 4" in text and "row 4" in text
    if field is not None:
        assert f"'{field}'" in text


def test_skip_reports_at_most_max_report_reasons(tmp_path, caplog):
    lines = [GOOD_PAIR] + [{"prompt": "hi", "chosen": "", "rejected": "b"}] * 7
    path = _write_lines(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        records = load_records(path, on_bad_record="skip", max_report=2)
    assert len(records) == 1
    text = caplog.records[-1].getMessage()
    assert "skipped 7 bad record(s) of 8" in text
    assert "row 2" in text and "row 3" in text and "row 4" not in text and "5 more" in text


def test_skip_with_nothing_left_raises(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", ["{", {"prompt": "hi"}])
    with pytest.raises(DataError, match="all 2 records are bad"):
        load_records(path, on_bad_record="skip")


@pytest.mark.parametrize(
    "name,content", [("e.jsonl", b""), ("e.jsonl", b"\n\n  \n"), ("e.json", b""), ("e.json", b"  [ ]\n")]
)
def test_empty_file_raises(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match="no records") as info:
            load_records(path, on_bad_record=mode)
        assert str(path) in str(info.value)


def test_empty_in_memory_sources_raise(tmp_path):
    import datasets

    with pytest.raises(DataError, match="<memory>: no records"):
        load_records([])
    with pytest.raises(DataError, match="<dataset>: no records"):
        load_records(datasets.Dataset.from_list([]))
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match="no records"):
        load_records(empty, shape="prompts")


def test_unreadable_sources(tmp_path):
    with pytest.raises(DataError, match="cannot read file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read Parquet"):
        load_records(tmp_path / "bad.parquet")
    (tmp_path / "bad.json").write_text('[{"prompt": "a",')
    with pytest.raises(DataError, match="malformed JSON .*line 1"):
        load_records(tmp_path / "bad.json")
    with pytest.raises(DataError, match="cannot read records from a int"):
        load_records(42)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError) as info:
        load_records([GOOD_PAIR], on_bad_record="ignore")
    assert info.value.key == "on_bad_record"
    with pytest.raises(ConfigError, match="shape"):
        load_records([GOOD_PAIR], shape="triples")
    with pytest.raises(ConfigError, match="max_report"):
        load_records([GOOD_PAIR], max_report=-1)


CHAT_RECORDS = [
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
        "id": 7,
    },
    {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
        "id": 8,
    },
]
PLAIN_RECORDS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "meta": {"src": "a"}},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "meta": {"src": "b"}},
    {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Green.", "meta": {"src": "c"}},
]


@pytest.mark.parametrize("records", [PLAIN_RECORDS, CHAT_RECORDS], ids=["plain", "chat"])
def test_all_source_kinds_load_the_same_records(tmp_path, records):
    import datasets

    jsonl = tmp_path / "d.jsonl"
    write_jsonl_atomic(jsonl, records)
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(records, indent=2))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    sources = {
        str(jsonl): jsonl,
        str(as_json): str(as_json),
        str(parquet): parquet,
        "<dataset>": datasets.Dataset.from_list(records),
        "<memory>": records,
    }
    for name, source in sources.items():
        loaded = load_records(source)
        assert _strip(loaded) == records, name
        assert [(r["_source"], r["_row"]) for r in loaded] == [(name, i + 1) for i in range(len(records))]


def test_parquet_and_dataset_rows_are_one_based_indices(tmp_path):
    import datasets

    records = [dict(GOOD_PAIR), dict(GOOD_PAIR), {**GOOD_PAIR, "chosen": " "}]
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    for source, name in ((parquet, str(parquet)), (datasets.Dataset.from_list(records), "<dataset>")):
        with pytest.raises(DataError) as info:
            load_records(source)
        assert (info.value.file, info.value.row, info.value.field) == (name, 3, "chosen")
        assert f"{name}, row 3, field 'chosen'" in str(info.value)


def test_parquet_nan_score_and_memory_non_dict():
    with pytest.raises(DataError) as info:
        load_records(
            [GOOD["lists"], {"prompt": "p", "responses": ["a", "b"], "scores": [math.nan, 1.0]}], "lists"
        )
    assert (info.value.file, info.value.row, info.value.field) == ("<memory>", 2, "scores[0]")
    with pytest.raises(DataError, match=r"<memory>, row 2: record is not a JSON object \(got list\)"):
        load_records([GOOD_PAIR, ["prompt", "chosen"]])


def test_json_file_of_lines_is_read_as_jsonl(tmp_path):
    path = _write_lines(tmp_path / "d.json", [GOOD_PAIR, {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert (info.value.row, info.value.field) == (2, "rejected")


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(GOOD_PAIR).encode() + b"\r\n\r\n" + json.dumps(GOOD_PAIR).encode()
    )
    records = load_records(path)
    assert _strip(records) == [GOOD_PAIR, GOOD_PAIR] and [r["_row"] for r in records] == [1, 3]


def test_unpaired_labels_and_extra_fields_are_kept_unchanged():
    records = [
        {"prompt": "p", "completion": "c", "label": 1, "weight": 0.5},
        {"prompt": "p", "completion": "c", "label": False, "tags": ["x"]},
    ]
    assert _strip(load_records(records, "unpaired")) == records


def test_validate_record_defaults():
    assert validate_record(GOOD_PAIR, "pairs") == {**GOOD_PAIR, "_source": "<memory>", "_row": None}


def test_write_jsonl_atomic_never_leaves_partial_output(tmp_path):
    path = tmp_path / "out" / "d.jsonl"
    assert write_jsonl_atomic(path, [GOOD_PAIR, {"prompt": "é ✓"}]) == 2
    assert path.read_text(encoding="utf-8").splitlines()[1] == '{"prompt": "é ✓"}'
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # the mode open() gives, not mkstemp's 0600

    def records_then_failure():
        yield GOOD_PAIR
        raise RuntimeError("generator failed")

    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, records_then_failure())
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"x": object()}])
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["d.jsonl"]  # and no temp file is left


# ---------------------------------------------------------------------------------------------- property tests

text = st.text(min_size=1, max_size=12).filter(lambda s: s.strip())
prompt_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text}),
    min_size=1,
    max_size=3,
)
response_messages = st.lists(
    st.fixed_dictionaries({"role": st.just("assistant"), "content": text}), min_size=1, max_size=2
)
prompt = text | prompt_messages
response = text | response_messages
plain_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
extras = st.dictionaries(st.sampled_from(["id", "meta", "source", "weight"]), plain_json, max_size=2)


@st.composite
def valid_record(draw, shape: str) -> dict:
    record = draw(extras)
    if shape == "chat":
        opening = st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": text})
        reply = st.fixed_dictionaries({"role": st.just("assistant"), "content": text})
        record["messages"] = [draw(opening), *draw(prompt_messages), draw(reply)]
        return record
    record["prompt"] = draw(prompt)
    if shape == "pairs":
        record["chosen"] = draw(response)
        record["rejected"] = draw(response.filter(lambda r: r != record["chosen"]))  # identical pairs are refused
    elif shape in ("unpaired", "sft"):
        record["completion"] = draw(response)
        if shape == "unpaired":
            record["label"] = draw(st.booleans() | st.sampled_from([0, 1]))
    elif shape == "lists":
        k = draw(st.integers(2, 4))
        record["responses"] = draw(st.lists(response, min_size=k, max_size=k))
        numbers = st.integers(-(10**6), 10**6) | st.floats(allow_nan=False, allow_infinity=False)
        record["scores"] = draw(st.lists(numbers, min_size=k, max_size=k).filter(lambda v: len(set(v)) > 1))
    elif shape == "negatives":  # K = 2 samples in every record: a data set holds one K
        record["rejected"] = draw(response)
        record["samples"] = draw(st.lists(response, min_size=2, max_size=2))
    elif shape == "rejections":  # M = 2 rejections in every record, as in LOGO
        record["chosen"] = draw(response)
        record["rejections"] = draw(st.lists(response, min_size=2, max_size=2))
    elif shape == "stepwise":  # TRL's stepwise supervision: plain-text steps, one bool label each
        steps = draw(st.lists(text, min_size=1, max_size=3))
        record["completions"] = steps
        record["labels"] = draw(st.lists(st.booleans(), min_size=len(steps), max_size=len(steps)))
    return record


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
junk_values = json_values | st.sampled_from(
    ["", " \n", "\ud800", "user", "assistant", "system", 0, 1, 2, math.nan, math.inf, 10**400, [], {}]
)


def _damage(draw, value):
    """`value` with one place, at any depth, deleted, inserted or replaced by junk."""
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        action = draw(st.sampled_from(["replace", "delete", "insert"]))
        if action == "delete":
            del value[i]
        elif action == "insert":
            value.insert(i, draw(junk_values))
        else:
            value[i] = _damage(draw, value[i])
        return value
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        if draw(st.booleans()):
            del value[key]
        else:
            value[key] = _damage(draw, value[key])
        return value
    return draw(junk_values)


@st.composite
def damaged_record(draw, shape: str) -> dict:
    """A valid record with one field damaged somewhere inside, so junk reaches every check."""
    record = draw(valid_record(shape))
    field = draw(st.sampled_from(SHAPES[shape]))
    if draw(st.integers(0, 4)) == 0:
        del record[field]
    else:
        record[field] = _damage(draw, record[field])
    return record


def junk_records(shape: str):
    return json_values | damaged_record(shape) | valid_record(shape)


def junk_lines(shape: str):
    return st.one_of(
        junk_records(shape).map(lambda v: json.dumps(v).encode()),
        junk_records(shape).map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
        junk_records(shape).map(lambda v: json.dumps(v)[: len(json.dumps(v)) // 2].encode()),  # cut short
        st.binary(max_size=30),
        st.text(max_size=30).map(lambda t: t.encode("utf-8")),
    )


def _load_or_data_error(source, shape: str, mode: str):
    try:
        return load_records(source, shape=shape, on_bad_record=mode)
    except DataError as err:  # any other exception type fails the test
        assert str(err)
        return None


@settings(max_examples=200, deadline=None)
@given(data=st.data(), shape=st.sampled_from(sorted(SHAPES)))
def test_junk_jsonl_only_ever_raises_data_error(data, shape):
    lines = data.draw(st.lists(junk_lines(shape), max_size=6))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "junk.jsonl"
        path.write_bytes(b"\n".join(lines))
        strict = _load_or_data_error(path, shape, "error")
        lenient = _load_or_data_error(path, shape, "skip")
    if strict is not None:
        assert json.dumps(lenient) == json.dumps(strict)  # via json.dumps: NaN extras compare equal
    n_lines = b"\n".join(lines).count(b"\n") + 1
    for record in lenient or []:
        assert record["_source"] == str(path) and 1 <= record["_row"] <= n_lines


@settings(max_examples=200, deadline=None)
@given(data=st.data(), shape=st.sampled_from(sorted(SHAPES)))
def test_junk_records_only_ever_raise_data_error(data, shape):
    records = data.draw(st.lists(junk_records(shape), max_size=6))
    strict = _load_or_data_error(records, shape, "error")
    lenient = _load_or_data_error(records, shape, "skip")
    if strict is not None:
        assert lenient == strict
        assert [(r["_source"], r["_row"]) for r in strict] == [
            ("<memory>", i + 1) for i in range(len(records))
        ]
    for record in lenient or []:  # what skip keeps is exactly what the record-level check accepts
        assert validate_record(records[record["_row"] - 1], shape, "<memory>", record["_row"]) == record


@settings(max_examples=100, deadline=None)
@given(data=st.data(), shape=st.sampled_from(sorted(SHAPES)))
def test_valid_generated_records_load_back_unchanged(data, shape):
    records = data.draw(st.lists(valid_record(shape), min_size=1, max_size=5))
    assert _strip(load_records(records, shape=shape)) == records
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "valid.jsonl"
        write_jsonl_atomic(path, records)
        loaded = load_records(path, shape=shape)
    assert _strip(loaded) == records
    assert [r["_row"] for r in loaded] == list(range(1, len(records) + 1))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False,
                           allow_infinity=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=8)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(json_values, max_size=6), indent=st.sampled_from([None, 1]), chunk=st.integers(1, 9),
       bom=st.booleans())
def test_a_json_list_is_streamed_element_by_element_exactly(tmp_path, monkeypatch, values, indent, chunk, bom):
    """Read in chunks of a few bytes (every element, number and multi-byte character cut somewhere), the
    elements equal json.loads of the whole file."""
    import alignkit.data.readers as readers_module

    monkeypatch.setattr(readers_module, "JSON_CHUNK", chunk)
    path = tmp_path / "d.json"
    text = json.dumps(values, indent=indent, ensure_ascii=False)
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode())
    assert [v for _, v in readers_module.read_json(str(path))] == json.loads(text)


def test_a_malformed_json_list_names_the_line_and_column(tmp_path, monkeypatch):
    import alignkit.data.readers as readers_module

    monkeypatch.setattr(readers_module, "JSON_CHUNK", 3)
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b"} {"prompt": "c"}\n]')
    with pytest.raises(DataError, match=r"d.json: malformed JSON \(expected ',' or '\]' at line 3 column 19\)"):
        list(readers_module.read_json(str(path)))
    path.write_bytes(b'[{"prompt": "a"}, {"prompt": "\xff"}]')
    with pytest.raises(DataError, match=r"not valid UTF-8 \(byte offset 30\)"):
        list(readers_module.read_json(str(path)))
    path.write_text('[{"prompt": "a"}] 7')
    with pytest.raises(DataError, match="extra data after the list"):
        list(readers_module.read_json(str(path)))

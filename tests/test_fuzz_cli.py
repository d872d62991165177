"""Bad input, generated (hypothesis): malformed record files and random configs, through the loaders and the
CLI. The loaders raise DataError and nothing else; the CLI exits 2 with one line naming the file and row (and
field) or the config key — never a traceback — and leaves no output directory behind. YAML cannot run code."""

from __future__ import annotations

import json
import string
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers.utils import logging as hf_logging

from alignkit.cli import main
from alignkit.config import TrainConfig, load_config_file
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import load_records
from alignkit.data.synthetic import VOCABULARY
from alignkit.errors import ConfigError, DataError
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.shapes import SHAPES

TOKENIZER = build_word_tokenizer(VOCABULARY)
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

words = st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=6).map(" ".join)
good_pair = st.fixed_dictionaries({"prompt": words, "chosen": words, "rejected": words}).filter(
    lambda r: r["chosen"] != r["rejected"])  # an identical pair is itself a bad record
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
# values no text field accepts: not a string, blank, or not a list of {"role", "content"} messages
bad_text = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.just(""),
                     st.just(" \t "), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                         st.integers(), max_size=2),
                     st.just([{"content": "x"}]))


def not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


@st.composite
def bad_line(draw) -> tuple[bytes, str | None]:
    """One line of a JSONL file that fails validation, and the field the error must name (None: the row)."""
    kind = draw(st.sampled_from(["missing", "wrong", "not_object", "malformed", "bad_utf8"]))
    record = draw(good_pair)
    if kind == "missing":
        field = draw(st.sampled_from(sorted(record)))
        del record[field]
        return json.dumps(record).encode(), field
    if kind == "wrong":
        field = draw(st.sampled_from(sorted(record)))
        record[field] = draw(bad_text)
        return json.dumps(record).encode(), field
    if kind == "not_object":
        return json.dumps(draw(json_value.filter(lambda v: not isinstance(v, dict)))).encode(), None
    if kind == "malformed":
        text = draw(st.text(min_size=1, max_size=30).filter(lambda t: "\n" not in t and t.strip() and not_json(t)))
        return text.encode("utf-8", "surrogatepass"), None
    return b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}', None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "model"
    build_tiny_model("llama", len(TOKENIZER), hidden=16, layers=1, heads=2).save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    hf_logging.disable_progress_bar()
    return path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def the_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


# ---- loaders ----


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), st.lists(json_value, max_size=4).map(
    lambda values: "\n".join(json.dumps(v) for v in values).encode())),
       suffix=st.sampled_from([".jsonl", ".json", ".ndjson", ".parquet"]), shape=st.sampled_from(sorted(SHAPES)))
def test_loaders_raise_data_errors_only(tmp_path, content, suffix, shape):
    path = tmp_path / f"{uuid.uuid4().hex}{suffix}"
    path.write_bytes(content)
    try:
        records = load_records(str(path), shape)
    except DataError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
        return
    assert records and all(r["_source"] == str(path) for r in records)


@FUZZ
@given(records=st.lists(st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "completion", "label"]),
                                        json_value, max_size=5), min_size=1, max_size=4),
       shape=st.sampled_from(["pairs", "unpaired", "sft"]), max_length=st.integers(2, 12))
def test_loading_and_tokenising_random_records_raise_data_errors_only(tmp_path, records, shape, max_length):
    path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    try:
        examples = prepare_examples(str(path), TOKENIZER, ExampleSettings(shape, max_length))
    except DataError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
        assert err.row is None or 1 <= err.row <= len(records)
        return
    assert all(e.num_tokens <= max_length * len(e.response_ids) for e in examples)


@FUZZ
@given(records=st.lists(st.fixed_dictionaries({"prompt": json_scalar, "chosen": json_scalar, "rejected": json_scalar}),
                        min_size=1, max_size=4))
def test_parquet_with_wrong_column_types_raises_data_errors_only(tmp_path, records):
    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # pyarrow cannot hold it: not a file one can have
        assume(False)
    path = tmp_path / f"{uuid.uuid4().hex}.parquet"
    pq.write_table(table, path)
    try:
        load_records(str(path), "pairs")
    except DataError as err:
        assert str(err).startswith(str(path))


# ---- the CLI: bad records ----


@settings(FUZZ, max_examples=25)
@given(before=st.lists(good_pair, max_size=3), bad=bad_line(), after=st.lists(good_pair, max_size=2))
def test_cli_bad_records_exit_2_naming_file_row_field(tmp_path, capsys, model_dir, before, bad, after):
    line, field = bad
    run = tmp_path / uuid.uuid4().hex
    run.mkdir()
    data = run / "pairs.jsonl"
    data.write_bytes(b"\n".join([*(json.dumps(r).encode() for r in before), line,
                                 *(json.dumps(r).encode() for r in after)]) + b"\n")
    out = run / "out"
    code, stderr = run_cli(capsys, "dpo", "--model", str(model_dir), "--train_data", str(data), "--output_dir", str(out),
                           "--progress", "false", "--ref_cache", "false")
    assert code == 2
    message = the_error_line(stderr)
    assert f"error: {data}, row {len(before) + 1}" in message
    if field is not None:
        assert f"field '{field}" in message
    assert not out.exists()  # validated before anything is written


# ---- the CLI: bad configs ----

FIELDS = sorted(set(TrainConfig.model_fields) - {"model", "train_data", "eval_data", "output_dir", "loss"})
# (key, value) pairs that are wrong whatever else the config holds
WRONG = [("learning_rate", float("nan")), ("learning_rate", -1.0), ("learning_rate", "fast"), ("max_steps", 0),
         ("max_steps", 1.5), ("max_steps", "ten"), ("precision", "fp8"), ("loss", "nope"), ("lora", {"r": 0}),
         ("lora", 5), ("lora", {"rank": 4}), ("adam_betas", [0.9]), ("on_nonfinite", "ignore"),
         ("distributed", "zero3"), ("max_skipped_steps", -1), ("loss_options", {"beta": -1.0}),
         ("loss_options", {"gamma": 1.0}), ("epochs", float("inf")), ("grad_accum", [2]), ("seed", {"a": 1})]
config_value = st.one_of(json_scalar, st.floats(), st.lists(json_scalar, max_size=3),
                         st.dictionaries(st.sampled_from(["r", "beta", "x", "alpha"]), json_scalar, max_size=2))
identifier = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)


@settings(FUZZ, max_examples=50)
@given(extra=st.dictionaries(st.sampled_from(FIELDS) | identifier.map(lambda k: "x_" + k), config_value, max_size=4),
       wrong=st.sampled_from(WRONG), as_override=st.booleans())
def test_cli_bad_configs_exit_2_naming_a_key(tmp_path, capsys, model_dir, extra, wrong, as_override):
    run = tmp_path / uuid.uuid4().hex
    run.mkdir()
    out = run / "out"
    values = {"model": str(model_dir), "train_data": str(run / "absent.jsonl"), "output_dir": str(out), **extra}
    overrides: list[str] = []
    if as_override:  # the same wrong value given on the command line instead
        overrides = [f"--{wrong[0]}", yaml.safe_dump(wrong[1], default_flow_style=True).replace("\n...", "").strip()]
        values.pop(wrong[0], None)
    else:
        values[wrong[0]] = wrong[1]
    (run / "cfg.yaml").write_text(yaml.safe_dump(values, allow_unicode=True))
    code, stderr = run_cli(capsys, "train", "--config", str(run / "cfg.yaml"), *overrides)
    assert code == 2
    message = the_error_line(stderr)
    assert message.startswith("error: config key '"), message
    key = message.removeprefix("error: config key '").split("'")[0]
    assert key.split(".")[0] in {*extra, wrong[0]}, message
    assert not out.exists()


@settings(FUZZ, max_examples=50)
@given(text=st.text(max_size=60) | json_value.map(lambda v: yaml.safe_dump(v, allow_unicode=True)))
def test_cli_random_yaml_exits_2(tmp_path, capsys, text):
    path = tmp_path / f"{uuid.uuid4().hex}.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    code, stderr = run_cli(capsys, "train", "--config", str(path), "--output_dir", str(tmp_path / "never"))
    assert code == 2
    assert the_error_line(stderr).startswith("error: config key '")
    assert not (tmp_path / "never").exists()


def test_yaml_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
                    "train_data: x.jsonl\n")
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert err.value.key == "--config" and "python/object" in str(err.value)
    path.write_text("model: !!python/object:collections.OrderedDict {}\n")
    with pytest.raises(ConfigError):
        load_config_file(path)
    code, stderr = run_cli(capsys, "train", "--config", str(path))
    assert code == 2 and "python/object" in the_error_line(stderr)
    assert not marker.exists()

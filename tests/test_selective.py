"""Selective DPO's pair filter (arXiv 2502.09650): each fold's scores equal a separate run of the loop trained by hand
on the other folds' records, scored with the DPO formula in NumPy; the fold assignment is fixed by its seed; the
dropped pairs are exactly the top scores; the reference is scored once; refused configs write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import alignkit.train.reference as reference
from alignkit.config import TrainConfig, make_config
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.errors import ConfigError
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train.loop import train
from alignkit.train.selective import fold_assignment, selective_filter

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_word_tokenizer(VOCABULARY)
BETA = 0.1


def tiny_llama(seed: int = 0):
    return build_tiny_model("llama", len(TOKENIZER), seed=seed, hidden=32, layers=2, heads=4).eval()


def common(tmp_path, **changes) -> dict:
    values = dict(model="tiny", max_length=64, max_tokens_per_row=512, progress=False, seed=0, loss="dpo",
                  loss_options={"beta": BETA}, learning_rate=1e-2, max_tokens_per_batch=300, max_steps=1,
                  train_data=str(tmp_path / "pairs.jsonl"), report_to=["jsonl"])
    return {**values, **changes}


@pytest.fixture
def pairs(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    records = preference_records(12, 5)
    write_jsonl_atomic(tmp_path / "pairs.jsonl", records)
    return records


def scores_file(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "selective_scores.jsonl").read_text().splitlines()]


def response_logp(model, prompt: list[int], response: list[int]) -> float:
    """Summed log-prob of response after prompt: one plain forward of the unpacked sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).sum())


def numpy_dpo(policy, ref_model, example) -> float:
    """-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))), the paper's DPO loss, in NumPy."""
    (chosen, rejected), prompt = example.response_ids, example.prompt_ids
    margin = (response_logp(policy, prompt, chosen) - response_logp(ref_model, prompt, chosen)) - \
             (response_logp(policy, prompt, rejected) - response_logp(ref_model, prompt, rejected))
    return float(np.logaddexp(0.0, -BETA * margin))


def test_fold_scores_equal_separate_runs_of_the_loop(tmp_path, pairs):
    options = {"drop": 0.25, "folds": 3, "epochs": 2}
    train(TrainConfig(output_dir=str(tmp_path / "run"), filter={"selective": options}, **common(tmp_path)),
          tiny_llama(), TOKENIZER)
    rows = scores_file(tmp_path / "run")
    assert [r["row"] for r in rows] == list(range(1, 13)) and [sum(r["fold"] == f for r in rows) for f in range(3)] == [4, 4, 4]
    examples = prepare_examples(str(tmp_path / "pairs.jsonl"), TOKENIZER, ExampleSettings("pairs", 64), progress=False)
    for fold in range(3):
        write_jsonl_atomic(tmp_path / f"rest-{fold}.jsonl", [r for r, s in zip(pairs, rows) if s["fold"] != fold])
        by_hand = train(TrainConfig(**common(tmp_path, output_dir=str(tmp_path / f"hand-{fold}"), ref_cache=False,
                                             train_data=str(tmp_path / f"rest-{fold}.jsonl"), epochs=2, max_steps=None)),
                        tiny_llama(), TOKENIZER).model
        held = [i for i, s in enumerate(rows) if s["fold"] == fold]
        expected = [numpy_dpo(by_hand.eval(), tiny_llama(), examples[i]) for i in held]
        assert [rows[i]["score"] for i in held] == pytest.approx(expected, abs=1e-6)
    start = [numpy_dpo(tiny_llama(), tiny_llama(), examples[i]) for i in range(12)]
    assert not np.allclose([r["score"] for r in rows], start)  # the fold models moved: the scores are not log 2


def test_drops_the_top_share_and_is_fixed_by_its_seed(tmp_path, pairs):
    cfg = TrainConfig(output_dir=str(tmp_path / "a"), filter={"selective": {"drop": 0.25, "folds": 2}},
                      **common(tmp_path))
    examples = prepare_examples(cfg.train_data, TOKENIZER, ExampleSettings("pairs", 64), progress=False)
    kept = selective_filter(cfg, tiny_llama(), TOKENIZER, examples)
    rows = scores_file(tmp_path / "a")
    top = set(np.argsort(-np.array([r["score"] for r in rows]), kind="stable")[:3].tolist())
    assert [r["dropped"] for r in rows] == [i in top for i in range(12)]
    assert list(kept) == [e for i, e in enumerate(examples) if i not in top]
    assert [r["fold"] for r in rows] == fold_assignment(12, 2, 0) and sum(r["fold"] for r in rows) == 6
    again = cfg.model_copy(update={"output_dir": str(tmp_path / "b")})
    assert list(selective_filter(again, tiny_llama(), TOKENIZER, examples)) == list(kept)
    assert (tmp_path / "b" / "selective_scores.jsonl").read_text() == (tmp_path / "a" / "selective_scores.jsonl").read_text()
    other = make_config({**common(tmp_path), "output_dir": str(tmp_path / "c"),
                         "filter": {"selective": {"drop": 0.25, "folds": 2, "seed": 1}}})
    selective_filter(other, tiny_llama(), TOKENIZER, examples)
    assert [r["fold"] for r in scores_file(tmp_path / "c")] != [r["fold"] for r in rows]
    assert [r["fold"] for r in scores_file(tmp_path / "c")] == fold_assignment(12, 2, 1)


def test_the_reference_is_scored_once(tmp_path, pairs, monkeypatch):
    calls = []
    score = reference.score_examples
    monkeypatch.setattr(reference, "score_examples", lambda model, examples, *a, **k: calls.append(len(examples)) or
                        score(model, examples, *a, **k))
    train(TrainConfig(output_dir=str(tmp_path / "run"), filter={"selective": {"drop": 0.5, "folds": 3}},
                      **common(tmp_path)), tiny_llama(), TOKENIZER)
    assert calls == [12]  # the whole set; the three fold runs and the filtered run read the cache
    assert sum(r["dropped"] for r in scores_file(tmp_path / "run")) == 6
    assert sorted(p.name for p in (tmp_path / "run" / "selective").iterdir()) == ["fold-0", "fold-1", "fold-2"]


def test_refused_configs_name_the_key_and_write_nothing(tmp_path, pairs):
    write_jsonl_atomic(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    for loss, data in (("sft", "sft.jsonl"), ("kto", "pairs.jsonl")):
        cfg = TrainConfig(**common(tmp_path, output_dir=str(tmp_path / loss), loss=loss, loss_options={},
                                   train_data=str(tmp_path / data)), filter={"selective": {}})
        with pytest.raises(ConfigError, match=f"filter.selective.*loss '{loss}'"):
            train(cfg, tiny_llama(), TOKENIZER)
        assert not (tmp_path / loss).exists()
    with pytest.raises(ConfigError, match="filter.selective.folds.*13 folds of 12"):
        train(TrainConfig(**common(tmp_path, output_dir=str(tmp_path / "many")), filter={"selective": {"folds": 13}}),
              tiny_llama(), TOKENIZER)
    assert not (tmp_path / "many").exists()
    for bad, key in (({"folds": 1}, "folds"), ({"drop": 1.0}, "drop"), ({"drop": -0.1}, "drop"),
                     ({"folds": 2.5}, "folds"), ({"fold": 2}, "fold"), ({"epochs": 0}, "epochs")):
        with pytest.raises(ConfigError, match=f"filter.selective.{key}"):
            make_config({**common(tmp_path, output_dir=str(tmp_path / "x")), "filter": {"selective": bad}})
    with pytest.raises(ConfigError, match="filter.selective.drop"):
        make_config({**common(tmp_path, output_dir="x"), "filter": {"selective": {"drop": float("nan")}}})

"""The CHES pair filter (arXiv 2410.08847): the score equals the paper's length-normalised formula on hand-made
hidden states; the hidden states are the ones the unembedding reads at the positions predicting each response
token; the filter drops the highest-scoring share, writes every score next to the run, and repeats exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, prepare_examples
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY, preference_records
from alignkit.errors import ConfigError
from alignkit.models.ches import ches_score, pair_ches, response_hidden
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train.loop import train
from alignkit.train.pair_filter import ches_filter

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = build_word_tokenizer(VOCABULARY)


def tiny_llama(seed: int = 0):
    return build_tiny_model("llama", len(TOKENIZER), seed=seed, hidden=32, layers=2, heads=4).eval()


def numpy_ches(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """The paper's length-normalised CHES written as its double sums over token positions k, k'."""
    n_chosen, n_rejected = len(chosen), len(rejected)
    cross = sum(chosen[k] @ rejected[j] for k in range(n_chosen) for j in range(n_rejected))
    own = sum(chosen[k] @ chosen[j] for k in range(n_chosen) for j in range(n_chosen))
    return cross / (n_chosen * n_rejected) - own / n_chosen ** 2


def test_score_equals_the_formula_on_hand_made_hidden_states():
    # by hand: mean h+ = (2, 0), mean h- = (1, 0): <(2,0),(1,0)> - |(2,0)|^2 = 2 - 4
    assert ches_score(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, -1.0]])) == pytest.approx(-2.0)
    # mean h+ = (0.5, 0.5), mean h- = (1, 0): 0.5 - 0.5
    assert ches_score(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0]])) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    for n_chosen, n_rejected in ((1, 1), (3, 7), (9, 2)):
        chosen, rejected = rng.normal(size=(n_chosen, 6)), rng.normal(size=(n_rejected, 6))
        assert ches_score(torch.tensor(chosen), torch.tensor(rejected)) == pytest.approx(numpy_ches(chosen, rejected),
                                                                                        rel=1e-12, abs=1e-12)
    same = torch.tensor(rng.normal(size=(4, 6)))
    assert ches_score(same, same) == pytest.approx(0.0, abs=1e-12)  # identical responses: the terms cancel


def test_hidden_states_are_what_the_unembedding_reads():
    model = tiny_llama(1)
    prompt, response = [10, 11, 12], [13, 14, 15, 16]
    hidden = response_hidden(model, prompt, response)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    assert hidden.shape == (len(response), 32)
    torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, logits, rtol=0, atol=1e-5)
    expected = numpy_ches(hidden.numpy().astype(np.float64), response_hidden(model, prompt, [20, 21]).numpy())
    assert pair_ches(model, prompt, response, [20, 21]) == pytest.approx(expected, rel=1e-9)


def test_filter_drops_the_highest_scores_and_writes_them(tmp_path):
    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(20, 3))
    examples = prepare_examples(str(tmp_path / "pairs.jsonl"), TOKENIZER, ExampleSettings("pairs", 64), cache=False,
                                progress=False)
    model = tiny_llama(2)
    kept = ches_filter(model, examples, 0.25, tmp_path / "a")
    rows = [json.loads(line) for line in (tmp_path / "a" / "ches_scores.jsonl").read_text().splitlines()]
    scores = [pair_ches(model, e.prompt_ids, *e.response_ids) for e in examples]
    assert [r["ches"] for r in rows] == pytest.approx(scores) and [r["row"] for r in rows] == list(range(1, 21))
    top = set(np.argsort(-np.array(scores), kind="stable")[:5].tolist())
    assert [r["dropped"] for r in rows] == [i in top for i in range(20)]
    assert list(kept) == [e for i, e in enumerate(examples) if i not in top]
    again = ches_filter(model, examples, 0.25, tmp_path / "b")
    assert list(again) == list(kept) and (tmp_path / "b" / "ches_scores.jsonl").read_text() == \
        (tmp_path / "a" / "ches_scores.jsonl").read_text()
    assert list(ches_filter(model, examples, 0.0, tmp_path / "c")) == list(examples)


def test_filter_in_a_training_run_and_its_errors(tmp_path):
    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(16, 4))
    common = dict(model="tiny", max_length=64, max_tokens_per_row=512, progress=False, seed=0, loss="dpo",
                  learning_rate=1e-3, ref_cache=False, max_tokens_per_batch=400, max_steps=1,
                  train_data=str(tmp_path / "pairs.jsonl"))
    train(TrainConfig(output_dir=str(tmp_path / "run"), filter={"ches": {"drop": 0.5}}, **common), tiny_llama(),
          TOKENIZER)
    rows = [json.loads(line) for line in (tmp_path / "run" / "ches_scores.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and sum(r["dropped"] for r in rows) == 8
    with pytest.raises(ConfigError, match="filter.ches.*pairs"):
        write_jsonl_atomic(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
        train(TrainConfig(output_dir=str(tmp_path / "sft"), filter={"ches": {}},
                          **{**common, "loss": "sft", "train_data": str(tmp_path / "sft.jsonl")}), tiny_llama(),
              TOKENIZER)
    from alignkit.config import make_config
    with pytest.raises(ConfigError, match="filter.ches.drop"):
        make_config({**common, "filter": {"ches": {"drop": 1.5}}})
    with pytest.raises(ConfigError, match="filter.other.*unknown key"):
        make_config({**common, "filter": {"other": {}}})

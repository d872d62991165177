"""The synthetic long-context task (data.synthetic.needle_records): a colour stated once at a random depth of a
filler document must be answered to "what is the key ?". A tiny model trained with LOGO (three answers per
document: the right colour and two wrong ones) and with LongPO (pairs, the reference reading only the fact) picks
the right colour among all eight on held-out documents far more often than before training (chance: 1/8)."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.config import TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import COLOURS, NEEDLE_WORDS, needle_records
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.train.loop import train

TOKENIZER = build_word_tokenizer(NEEDLE_WORDS)


@torch.no_grad()
def accuracy(model, records) -> float:
    """Share of documents whose right colour has the highest next-token log-prob of the eight after the question."""
    model.eval()
    colour_ids = TOKENIZER.convert_tokens_to_ids(COLOURS)
    right = 0
    for record in records:
        ids = TOKENIZER(record["prompt"], add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1, colour_ids]
        right += COLOURS[int(logits.argmax())] == record["chosen"]
    return right / len(records)


def test_needle_records_bury_one_fact_at_every_depth():
    records = needle_records(200, seed=0, doc_words=40)
    for r in records:
        words = r["prompt"].split()
        assert sum(w in COLOURS for w in words) == 1 and r["chosen"] in words
        assert r["chosen"] not in r["rejections"] and r["rejected"] == r["rejections"][0]
        assert r["short_prompt"] == f"the key is {r['chosen']} . what is the key ?"
    depths = sorted(r["depth"] for r in records)
    assert depths[0] < 0.1 and depths[-1] > 0.9
    assert needle_records(5, seed=3) == needle_records(5, seed=3) != needle_records(5, seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("loss, options", [("logo", {"beta": 2.5, "gamma": 0.25, "sft_weight": 0.1}),
                                           ("longpo", {"beta": 2.5, "dpo_weight": 1.0})])
def test_a_tiny_model_learns_the_long_context_task(tmp_path, one_thread, loss, options):
    write_jsonl_atomic(tmp_path / "train.jsonl", needle_records(400, seed=1, doc_words=32))
    heldout = needle_records(100, seed=2, doc_words=32)
    torch.manual_seed(0)
    model = build_tiny_model("llama", len(TOKENIZER), seed=0, hidden=64, layers=2, heads=4)
    before = accuracy(copy.deepcopy(model), heldout)
    cfg = TrainConfig(model="tiny", train_data=str(tmp_path / "train.jsonl"), loss=loss, loss_options=options,
                      learning_rate=1e-2, warmup_steps=5, epochs=10, max_length=128, max_tokens_per_batch=512,
                      ref_cache=False, progress=False, output_dir=str(tmp_path / loss))
    after = accuracy(train(cfg, model, TOKENIZER).model, heldout)
    assert before < 0.3 and after > before + 0.3, (before, after)  # measured: LOGO 0.13 -> 1.0, LongPO -> 0.56

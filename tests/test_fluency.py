"""eval/fluency.mean_token_nll, make rl's fluency proxy: on the tiny model it equals the model's own cross-entropy
on the same answer tokens from a plain forward, one example at a time, whatever the packing."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.data.tokenize import TokenizedExample
from alignkit.eval.fluency import mean_token_nll
from alignkit.eval.kl import kl_packing
from alignkit.train.packing import Packing, pad_token_id

pytestmark = pytest.mark.usefixtures("one_thread")


def examples(tokenizer) -> list[TokenizedExample]:
    pairs = [("<|user|> the movie was", "great fun and well made <|end|>"), ("<|user|> a", "bad"),
             ("<|user|> the food", "was cold and the service slow , sadly <|end|>")]
    return [TokenizedExample(tokenizer.encode(p, add_special_tokens=False),
                             [tokenizer.encode(" " + r, add_special_tokens=False)]) for p, r in pairs]


def plain_nll(model, batch: list[TokenizedExample]) -> float:
    total, tokens = 0.0, 0
    for e in batch:
        ids = torch.tensor([e.prompt_ids + e.response_ids[0]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        start, n = len(e.prompt_ids), len(e.response_ids[0])
        target = ids[0, start:start + n]
        total += torch.nn.functional.cross_entropy(logits[start - 1:start + n - 1], target, reduction="sum").item()
        tokens += n
    return total / tokens


@pytest.mark.parametrize("budget", [4096, 24])  # kl_packing (what make rl scores in) and one example per batch
def test_mean_token_nll_is_the_models_own_cross_entropy(task, budget):
    model, batch = task.model.eval(), examples(task.tokenizer)
    packing = kl_packing(pad_token_id(task.tokenizer)) if budget == 4096 else Packing(budget, None,
                                                                                     pad_token_id(task.tokenizer))
    out = mean_token_nll(model, batch, packing)
    assert out["tokens"] == sum(len(e.response_ids[0]) for e in batch) and out["answers"] == 3
    assert out["nll"] > 0 and out["nll"] == pytest.approx(plain_nll(model, batch), rel=1e-5)


def test_answers_without_tokens_are_left_out(task):
    batch = examples(task.tokenizer)
    empty = TokenizedExample(batch[0].prompt_ids, [[]])
    packing = kl_packing(pad_token_id(task.tokenizer))
    assert mean_token_nll(task.model, [*batch, empty], packing) == mean_token_nll(task.model, batch, packing)
    assert math.isnan(mean_token_nll(task.model, [empty], packing)["nll"])

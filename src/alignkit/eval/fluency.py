"""A fluency proxy: the mean per-token negative log-likelihood of answers under a fixed model (make rl: the starting
one), scored token-exactly on the packed no-grad path training uses (train/reference.score_examples). Lower is more
like what the model would say itself; an answer drifting into gibberish or stuffing scores higher."""

from __future__ import annotations

import math

from alignkit.data.tokenize import TokenizedExample
from alignkit.train.packing import Packing
from alignkit.train.reference import score_examples


def mean_token_nll(model, examples: list[TokenizedExample], packing: Packing) -> dict:
    """Over every response token of the single-response examples: the mean NLL (nats per token, weighted by
    tokens, so a long answer counts as much as its length), the token count and the answers scored. Answers of no
    tokens are left out (nothing to score)."""
    kept = [e for e in examples if e.response_ids[0]]
    if not kept:
        return {"nll": math.nan, "tokens": 0, "answers": 0}
    _, token_logps = score_examples(model, kept, packing)
    tokens = sum(len(t) for t in token_logps)
    total = -sum(float(t.double().sum()) for t in token_logps)
    return {"nll": total / tokens, "tokens": tokens, "answers": len(kept)}

"""Pair filters of the data stage (`filter:`), run on the training pairs before the steps are planned. `ches`
(arXiv 2410.08847): drop the share `drop` of pairs with the highest CHES score under the starting model, the pairs
most likely to push the chosen response's probability down; every pair's score is written next to the run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from alignkit.data.load import write_jsonl_atomic
from alignkit.data.table import select
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.models.ches import pair_ches

log = logging.getLogger("alignkit.filter")


def ches_filter(model, examples: Sequence[TokenizedExample], drop: float,
                output_dir: str | Path) -> Sequence[TokenizedExample]:
    """The examples (a view, for a table) without the int(drop * n) highest-CHES pairs (ties: the earlier pair is dropped first), in their
    order; writes <output_dir>/ches_scores.jsonl (source, row, score, dropped) and logs what it dropped."""
    if any(len(e.response_ids) != 2 for e in examples):
        raise ConfigError("filter.ches", "scores preference pairs (chosen, rejected); this loss's data has other "
                                         "shapes; remove the filter")
    scores = [pair_ches(model, e.prompt_ids, e.response_ids[0], e.response_ids[1]) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (-scores[i], i))
    dropped = set(order[:int(drop * len(examples))])
    write_jsonl_atomic(Path(output_dir) / "ches_scores.jsonl",
                       [{"source": e.source, "row": e.row, "ches": s, "dropped": i in dropped}
                        for i, (e, s) in enumerate(zip(examples, scores))])
    if dropped:
        lowest = min(scores[i] for i in dropped)
        log.info("filter ches: dropped %d of %d pairs (CHES >= %.4g; rows %s); scores in %s", len(dropped),
                 len(examples), lowest, sorted(examples[i].row for i in dropped)[:20],
                 Path(output_dir) / "ches_scores.jsonl")
    return select(examples, [i for i in range(len(examples)) if i not in dropped])

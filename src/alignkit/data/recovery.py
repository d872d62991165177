"""Deep safety alignment's data augmentation (Qi et al., arXiv 2406.05946, section 3): safety recovery examples.

A refusal record (prompt x, completion r = the refusal, harmful_completion h = a compliant answer) becomes, with
probability `fraction`, the example  x + h[:k] -> r : the assistant turn starts with the first k tokens of the
compliant answer (context, no loss) and continues with the refusal (trained), k uniform in prefix_tokens [lo, hi].
The model learns to recover from a harmful start, not only to refuse in its first tokens. The same token ids
(data/tokenize: extras["harmful_ids"], the answer as the assistant turn without its end) are what a prefill attack
(eval/prefill.py) writes into the assistant turn."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pydantic import Field

from alignkit.config import Strict, make_config
from alignkit.data.template import render
from alignkit.data.tokenize import TokenizedExample, encode_texts
from alignkit.errors import ConfigError, DataError

HARMFUL_IDS = "harmful_ids"  # the key of a refusal example's extras holding its compliant answer's token ids


class RecoveryOptions(Strict):
    """`augment: {recovery: {...}}` of an SFT or sft_constrained run."""

    fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of refusal records read after a harmful prefix "
                                                             "(the rest stay plain refusals, the paper's k = 0)")
    prefix_tokens: tuple[int, int] = Field((1, 25), description="[lo, hi]: k is drawn uniformly from lo..hi")
    seed: int = Field(0, description="the draws of which records and which k")


def recovery_options(values: dict | None) -> RecoveryOptions:
    """The options of augment.recovery, each bad value named under that key."""
    try:
        options = make_config(dict(values or {}), RecoveryOptions)
    except ConfigError as err:
        raise ConfigError(f"augment.recovery.{err.key}", err.reason) from None
    lo, hi = options.prefix_tokens
    if not 1 <= lo <= hi:
        raise ConfigError("augment.recovery.prefix_tokens", f"needs 1 <= lo <= hi, got [{lo}, {hi}]")
    return options


def recovery_examples(examples: Sequence[TokenizedExample], options: RecoveryOptions,
                      max_length: int) -> tuple[list[TokenizedExample], list[int]]:
    """(the examples with the chosen refusal examples turned into recovery examples, the k of each one turned, in
    order). Every refusal example draws (u, k) in order from Random(seed), so the k do not depend on `fraction`; a
    k past the compliant answer's length takes the whole answer. Loss falls on the refusal tokens only."""
    rng = random.Random(options.seed)
    lo, hi = options.prefix_tokens
    out, prefix_lengths, refusals = [], [], 0
    for example in examples:
        harmful = example.extras.get(HARMFUL_IDS)
        if harmful is None:
            out.append(example)
            continue
        refusals += 1
        chosen, k = rng.random() < options.fraction, rng.randint(lo, hi)
        if not chosen:
            out.append(example)
            continue
        prefix_lengths.append(min(k, len(harmful)))
        out.append(_with_prefix(example, harmful[:k], max_length))
    if not refusals:
        source = examples[0].source if len(examples) else "<memory>"
        raise DataError(source, None, "harmful_completion", "no record has one: recovery examples are built from "
                        "refusal records that carry the compliant answer they decline",
                        hint="add harmful_completion to the refusal records, or drop augment.recovery")
    return out, prefix_lengths


def _with_prefix(example: TokenizedExample, prefix: list[int], max_length: int) -> TokenizedExample:
    """x + prefix -> refusal, the prefix untrained; cut at max_length like any response."""
    refusal = example.response_ids[0]
    trained = example.response_loss_masks[0] if example.response_loss_masks else [True] * len(refusal)
    room = max_length - len(example.prompt_ids)
    response, mask = (prefix + refusal)[:room], ([False] * len(prefix) + list(trained))[:room]
    if not any(mask):
        raise DataError(example.source, example.row, "harmful_completion", f"a {len(prefix)}-token prefix leaves no "
                        f"room for the refusal within max_length {max_length}",
                        hint="raise max_length or lower augment.recovery.prefix_tokens")
    extras = {key: value for key, value in example.extras.items() if key != HARMFUL_IDS}
    return TokenizedExample(example.prompt_ids, [response], example.source, example.row,
                            {**extras, "recovery_prefix": len(prefix)}, [mask])


def prefilled_prompt(tokenizer, prompt, harmful_completion: str, k: int) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, the first k tokens of harmful_completion as the assistant turn):
    the same ids a recovery example reads, for a prefill attack."""
    head, (turn,) = render(tokenizer, prompt, [harmful_completion])
    prompt_ids, turn_ids, content_ids = encode_texts(tokenizer, [head, turn, harmful_completion])
    return prompt_ids, turn_ids[:min(k, len(content_ids))]

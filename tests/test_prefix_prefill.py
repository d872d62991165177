"""The fast engine's shared-prefix prefill (generate/engines/prefix.py): prompts that start alike are grouped, each
group's common prefix is run once and each prompt's rest over it. It must change nothing but the cost: greedy tokens
equal HF's and each prompt run alone, and the log-probs the trainer's, for prompts that repeat, share a prompt and
then differ (a record's conversations at a later turn), share nothing, or differ in length."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import SamplingOptions
from alignkit.generate.engines import FastEngine, HFEngine, encode_prompts
from alignkit.generate.engines.prefix import layout, share_groups
from synthetic_task import prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_groups_share_what_saves_tokens():
    same = [1, 2, 3, 4, 5]
    # identical prompts: all but the last token is shared (each keeps one token to start sampling from)
    assert share_groups([same, same, same]) == [(4, [0, 1, 2])]
    # a record's prompt, then each conversation's own turn: the prompt is shared
    assert share_groups([same + [9, 9], same + [8], same + [7, 7, 7]]) == [(5, [0, 1, 2])]
    # a second record that shares only the first token starts its own group (joining would save less)
    assert share_groups([same, same, [1, 6, 6, 6], [1, 6, 6, 6]]) == [(4, [0, 1]), (3, [2, 3])]
    # nothing in common: one group per prompt, each prefilled as before (all but its last token, then the last)
    assert share_groups([[1, 2], [3, 4, 5], [6]]) == [(1, [0]), (2, [1]), (0, [2])]


def test_layout_positions_and_masks_are_each_prompts_own():
    plan = layout([[1, 2, 3, 4], [1, 2, 3, 5, 6], [7, 8]], "cpu")
    assert plan.width == plan.prefix_ids.shape[1] + plan.rest_ids.shape[1]
    for i, ids in enumerate([[1, 2, 3, 4], [1, 2, 3, 5, 6], [7, 8]]):
        prefix = plan.prefix_ids[plan.group[i]][plan.prefix_mask[plan.group[i]]].tolist()
        rest = plan.rest_ids[i][plan.rest_mask[i]].tolist()
        assert prefix + rest == ids  # the real tokens, in order, are exactly the prompt
        positions = plan.prefix_positions[plan.group[i]][plan.prefix_mask[plan.group[i]]].tolist() + \
            plan.rest_positions[i][plan.rest_mask[i]].tolist()
        assert positions == list(range(len(ids)))
        assert int(plan.key_mask()[i].sum()) == len(ids) == int(plan.lengths[i])
    # the last rest token of a prompt sees every real token of its prompt and no padding
    attention = plan.rest_attention()
    assert torch.equal(attention[:, 0, -1], plan.key_mask())


def test_shared_prefix_prefill_changes_no_token_or_log_prob(task):
    tok = task.tokenizer
    base = encode_prompts(tok, prompts(4, seed=11))
    other = tok("a different continuation", add_special_tokens=False)["input_ids"]
    batch = [base[0], base[0], base[0] + other, base[0] + other[:2], base[1], base[2] + other, base[2], base[3][:1]]
    assert len(layout(batch, "cpu").prefix_ids) < len(batch)  # the batch does share prefixes
    greedy = SamplingOptions(max_new_tokens=10, temperature=0, batch_size=8)
    fast = FastEngine(task.model, tok)
    shared = fast.generate(batch, greedy)
    assert shared.ids == HFEngine(task.model, tok).generate(batch, greedy).ids
    alone = [fast.generate([p], greedy).ids[0] for p in batch]
    assert shared.ids == alone
    # sampled, several samples per prompt: each sample's log-probs are the model's on its own sequence
    sampled = fast.generate(batch, SamplingOptions(max_new_tokens=8, temperature=1.0, batch_size=8), 3, seed=5)
    for prompt, rows, row_logps in zip(batch, sampled.ids, sampled.logprobs):
        for ids, logps in zip(rows, row_logps):
            with torch.no_grad():
                logits = task.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
            ours = logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(logps), ours, rtol=0, atol=1e-4)

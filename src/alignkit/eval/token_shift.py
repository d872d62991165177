"""URIAL's token distribution shift (Lin et al., arXiv 2312.01552): where did alignment change the model? Each token
of the aligned model's answers is ranked under the base model given the same context (prompt and the answer so
far): rank 1 is unshifted (the base model would have said it too), 2-3 marginal, anything lower shifted."""

from __future__ import annotations

import html

import torch

from alignkit.data.tokenize import ExampleSettings, tokenize_records
from alignkit.models.inference import eval_mode

BUCKETS = ("unshifted", "marginal", "shifted")
COLOURS = {"unshifted": "#ffffff", "marginal": "#fde68a", "shifted": "#fca5a5"}


def bucket_of(rank: int) -> str:
    """URIAL's buckets of a token's rank under the base model."""
    return "unshifted" if rank == 1 else "marginal" if rank <= 3 else "shifted"


def token_ranks(base, prompt_ids: list[int], answer_ids: list[int]) -> list[int]:
    """Each answer token's rank under `base` after the prompt and the answer before it: 1 + the number of tokens
    with a strictly higher logit (a tie counts in the token's favour). One forward; only the answer's positions
    reach the vocabulary projection."""
    if not answer_ids:
        return []
    device = next(base.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids[:-1]], device=device)
    with eval_mode(base):
        logits = base(input_ids=ids, logits_to_keep=len(answer_ids)).logits[0].float()
    chosen = logits.gather(1, torch.tensor(answer_ids, device=device)[:, None])
    return (1 + (logits > chosen).sum(-1)).tolist()


def token_shift(base, tokenizer, prompts: list, answers: list[str], max_length: int = 1024) -> tuple[dict, list]:
    """(summary, per answer [[token text, rank], ...]) of the answers' tokens under the base model. The answers are
    re-tokenised from their text as training would (the EOS training appends is not one of the answer's tokens).
    The summary holds each bucket's share of all answer tokens, the token and answer counts, and the mean rank."""
    records = [{"prompt": p, "completion": a, "_row": i + 1} for i, (p, a) in enumerate(zip(prompts, answers))]
    examples = tokenize_records(tokenizer, records, ExampleSettings("sft", max_length))
    counts, per_answer, ranks_total = dict.fromkeys(BUCKETS, 0), [], 0
    for example in examples:
        answer_ids = example.response_ids[0]
        if answer_ids and answer_ids[-1] == tokenizer.eos_token_id:
            answer_ids = answer_ids[:-1]
        ranks = token_ranks(base, example.prompt_ids, answer_ids)
        for rank in ranks:
            counts[bucket_of(rank)] += 1
        ranks_total += sum(ranks)
        per_answer.append([[tokenizer.decode([t]), r] for t, r in zip(answer_ids, ranks)])
    tokens = sum(counts.values())
    summary = {name: counts[name] / tokens if tokens else 0.0 for name in BUCKETS}
    summary.update({"tokens": tokens, "answers": len(per_answer), "mean_rank": ranks_total / tokens if tokens else 0.0})
    return summary, per_answer


def token_shift_html(per_answer: list, limit: int = 8) -> str:
    """The first `limit` answers as coloured text: white unshifted, yellow marginal, red shifted (rank in the
    tooltip)."""
    legend = " ".join(f"<span style='background:{COLOURS[b]};border:1px solid #ccc;padding:0 4px'>{b}</span>"
                      for b in BUCKETS)
    parts = [f"<p>Each token of A's answers by its rank under the baseline model: {legend}</p>"]
    for tokens in per_answer[:limit]:
        spans = "".join(f"<span title='rank {rank}' style='background:{COLOURS[bucket_of(rank)]}'>"
                        f"{html.escape(text)}</span>" for text, rank in tokens)
        parts.append(f"<p style='white-space:pre-wrap;border:1px solid #ddd;padding:6px'>{spans}</p>")
    return "\n".join(parts)

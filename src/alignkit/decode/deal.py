"""DeAL-style decoding as search with a lookahead on the reward (arXiv 2402.06147; no official code).

Beam search over tokens. At each step every live beam proposes its top-k next tokens; each candidate is rolled
out greedily for `lookahead` tokens and scored
    f = log p_LM(y_<=t | x) + lambda * r(x, y_<=t + greedy lookahead),
and the best `beams` candidates are kept (finished beams compete with their final reward). The answer is the
finished beam with the highest reward. The search as described in the abstract; lookahead length, beam and
candidate counts and the exact f are UNVERIFIED against the paper (see the method sheet, section 12)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field

from alignkit.config import Strict
from alignkit.decode.base import (
    DecodeResult,
    Search,
    greedy_rollouts,
    last_token_logps,
)
from alignkit.generate.engines import encode_prompts
from alignkit.models.inference import eval_mode


class DeALOptions(Strict):
    beams: int = Field(2, gt=0, description="hypotheses kept per prompt")
    top_k: int = Field(3, gt=0, description="next tokens proposed per hypothesis")
    lookahead: int = Field(4, ge=0, description="greedy tokens rolled out to score a candidate")
    weight: float = Field(1.0, description="lambda: reward weight against the log-prob")
    max_new_tokens: int = Field(32, gt=0)

    # `alignkit decode` keys that fill these fields under other names.
    config_keys: ClassVar[dict[str, str]] = {"top_k": "search_top_k"}


@dataclass
class _Beam:
    ids: list[int]
    logp: float
    done: bool = False
    score: float = 0.0


def deal_decode(model, tokenizer, prompts: list, reward, cfg: DeALOptions) -> DecodeResult:
    """DeAL responses for every prompt (all prompts searched together, one batched forward per step)."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    search = Search.start(model, tokenizer, reward, cfg)
    end_ids, pad_id, compute = search.end_ids, search.pad_id, search.compute
    beams = [[_Beam([], 0.0)] for _ in prompts]
    with eval_mode(model):
        for _ in range(cfg.max_new_tokens):
            live = [(p, b) for p, group in enumerate(beams) for b in group if not b.done]
            if not live:
                break
            logps = last_token_logps(model, [prompt_ids[p] + b.ids for p, b in live], pad_id)
            compute.add(passes=len(live))
            top_logps, top_ids = logps.topk(min(cfg.top_k, logps.shape[-1]), dim=-1)
            candidates: list[list[_Beam]] = [[b for b in group if b.done] for group in beams]
            fresh: list[tuple[int, _Beam]] = []
            for (p, beam), values, ids in zip(live, top_logps.tolist(), top_ids.tolist()):
                for value, token in zip(values, ids):
                    child = _Beam(beam.ids + [token], beam.logp + value, done=token in end_ids)
                    candidates[p].append(child)
                    fresh.append((p, child))
            compute.add(tokens=len(fresh))
            _score(search, prompts, prompt_ids, fresh)
            beams = [sorted(group, key=lambda b: -b.score)[:cfg.beams] for group in candidates]
    final = []
    for group in beams:
        texts = [search.text(b.ids) for b in group]
        final.append(texts)
    scores = [reward([p] * len(texts), texts) for p, texts in zip(prompts, final)]
    compute.add(rewards=sum(len(t) for t in final))
    picks = [max(range(len(s)), key=lambda i, s=s: (s[i], -i)) for s in scores]
    return DecodeResult(method="deal", prompts=list(prompts), responses=[t[i] for t, i in zip(final, picks)],
                        rewards=[s[i] for s, i in zip(scores, picks)], compute=compute,
                        details=[{"beams": t, "beam_rewards": s} for t, s in zip(final, scores)],
                        options=cfg.model_dump())


def _score(search: Search, prompts, prompt_ids, fresh) -> None:
    """f = log p + lambda * r(prefix + greedy lookahead) for every new candidate (finished ones: no lookahead)."""
    open_ = [(p, b) for p, b in fresh if not b.done]
    rollouts = greedy_rollouts(search.model, [prompt_ids[p] + b.ids for p, b in open_], search.opts.lookahead,
                               search.pad_id, search.end_ids)
    rolled = {id(b): r for (_, b), r in zip(open_, rollouts)}
    search.compute.add(tokens=sum(len(r) for r in rollouts), passes=sum(len(r) for r in rollouts))
    texts = [search.text(b.ids + rolled.get(id(b), [])) for _, b in fresh]
    values = search.reward([prompts[p] for p, _ in fresh], texts)
    search.compute.add(rewards=len(texts))
    for (_, beam), value in zip(fresh, values):
        beam.score = beam.logp + search.opts.weight * value

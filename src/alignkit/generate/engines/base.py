"""What every rollout engine returns, where a sample starts (the prompt's token ids) and the one rule for where it
ends (an end token or a stop string)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from alignkit.data.template import render_chat


@dataclass
class Generation:
    """[prompt][sample] results of one generate call. ids: the sampled tokens, up to and including the end token
    when the sampler emitted one (or the token that completed a stop string); logprobs: one per id, under the
    distribution it was sampled from (temperature / top-k / top-p applied; greedy: the untempered policy);
    finish_reasons: "stop" (an end token or stop string) or "length" (cut at max_new_tokens); texts: the decoded
    answers (special tokens dropped, cut before a stop string, stripped), for rewards and reports only."""

    prompt_ids: list[list[int]]
    ids: list[list[list[int]]]
    logprobs: list[list[list[float]]]
    finish_reasons: list[list[str]]
    texts: list[list[str]]
    generated: list[list[int]]  # tokens each sample cost, up to its first end token (compute accounting)

    def add_rows(self, tokenizer, rows: list[list[int]], row_logps: list[list[float]], num_samples: int,
                 end_ids: list[int], stop) -> None:
        """Append one generate call's rows (num_samples consecutive rows per prompt, in prompt order): each cut at
        its end token or stop string, with its log-probs, finish reason, text and cost."""
        for j, (row, logps) in enumerate(zip(rows, row_logps)):
            if j % num_samples == 0:
                for column in (self.ids, self.logprobs, self.finish_reasons, self.texts, self.generated):
                    column.append([])
            ids, text, stopped = cut_at_stop(tokenizer, row, end_ids, stop)
            self.ids[-1].append(ids)
            self.logprobs[-1].append(logps[:len(ids)])
            self.finish_reasons[-1].append("stop" if stopped else "length")
            self.texts[-1].append(text)
            self.generated[-1].append(next((i + 1 for i, t in enumerate(row) if t in end_ids), len(row)))


class Engine(Protocol):
    def generate(self, prompt_ids: list[list[int]], sampling, num_samples: int = 1,
                 seed: int = 0) -> Generation: ...

    def update_weights(self, model) -> None:
        """Called after every optimizer step with the trained policy."""


def start_generate(engine, prompt_ids: list[list[int]], sampling, num_samples: int = 1,
                   seed: int = 0) -> Callable[[], Generation]:
    """A call that returns engine.generate(...)'s Generation. An engine that samples elsewhere (Ray rollout workers:
    `submit`) starts now, so calls started one after another sample at once; any other samples when it is called."""
    submit = getattr(engine, "submit", None)
    if submit is not None:
        return submit(prompt_ids, sampling, num_samples, seed)
    return functools.partial(engine.generate, prompt_ids, sampling, num_samples, seed)


def cut_at_stop(tokenizer, ids: list[int], end_ids: list[int], stop) -> tuple[list[int], str, bool]:
    """(ids kept, text, stopped) of one sample's new tokens: up to and including the first end token, or the token
    that completes a stop string; the text is decoded without special tokens, cut before the stop string, stripped."""
    for i, token in enumerate(ids):
        if token in end_ids:
            ids, stopped = ids[:i + 1], True
            break
    else:
        stopped = False
    body = ids[:-1] if stopped else ids
    text = tokenizer.decode(body, skip_special_tokens=True)
    cut = stop_index(text, stop)
    if cut is not None:
        for n in range(1, len(body) + 1):  # the first token whose text reaches past the stop string's start
            if len(tokenizer.decode(body[:n], skip_special_tokens=True)) > cut:
                ids, stopped = body[:n], True
                break
        text = text[:cut]
    return ids, text.strip(), stopped


def prompt_texts(tokenizer, prompts: list) -> list[str]:
    """Plain strings verbatim; message lists through the chat template with the generation prompt."""
    return [p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]


def stop_index(text: str, stop) -> int | None:
    """Where the first occurrence of any stop string starts in text; None if none occurs."""
    return min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=None)


def truncate_at_stop(text: str, stop) -> str:
    """text up to (not including) the first occurrence of any stop string."""
    cut = stop_index(text, stop)
    return text if cut is None else text[:cut]


def stop_token_ids(tokenizer, stop) -> list[int]:
    """Ids of the EOS token and of every stop string that is itself a special token (decoding with
    skip_special_tokens would drop those, so they are matched as tokens, and generation stops on them)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    special = set(tokenizer.all_special_tokens)
    ids += [tokenizer.convert_tokens_to_ids(s) for s in stop if s in special]
    return list(dict.fromkeys(ids))


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """The token ids generation starts from: plain strings verbatim, chats through the template."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts(tokenizer, prompts)]

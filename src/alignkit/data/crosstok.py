"""Two tokenisations of the same text aligned for cross-tokenizer distillation (ULD, losses/uld.py; TRL's GOLD).

Each token gets a byte span of the text: its end is the byte length of the decoded prefix that ends with it (made
non-decreasing from the right, so a token that ends inside a multi-byte character joins the next one). Both
tokenisations are cut at every byte position where each ends a token; each piece between two such common cuts is one
group, on each side a run of consecutive tokens spelling the same bytes. Tokens that decode to nothing (special
tokens such as EOS) belong to no group. Where the two decoded texts differ (a tokenizer that does not round-trip),
everything after their last common cut is one final group."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.data.tokenize import TokenizedExample


def byte_ends(tokenizer, ids: list[int]) -> list[int]:
    """Per token, the byte length of the decoded prefix ids[:i + 1] (special tokens skipped), non-decreasing."""
    ends = [len(tokenizer.decode(ids[:i + 1], skip_special_tokens=True).encode("utf-8")) for i in range(len(ids))]
    for i in range(len(ends) - 2, -1, -1):  # a partial character's replacement glyph must not overshoot
        ends[i] = min(ends[i], ends[i + 1])
    return ends


def align_groups(student_ends: list[int], teacher_ends: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """(student groups, teacher groups): token positions of each side, group g of one spelling the same bytes as
    group g of the other. Positions of tokens with no bytes are left out."""
    def widths(ends):
        return [(i, end) for i, (start, end) in enumerate(zip([0, *ends[:-1]], ends)) if end > start]

    s, t = widths(student_ends), widths(teacher_ends)
    cuts = sorted({end for _, end in s} & {end for _, end in t})
    s_groups, t_groups = _split(s, cuts), _split(t, cuts)
    pairs = [(a, b) for a, b in zip(s_groups, t_groups) if a and b]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _split(tokens: list[tuple[int, int]], cuts: list[int]) -> list[list[int]]:
    """Token positions grouped by the first common cut at or after each token's end (after the last: one more)."""
    groups: list[list[int]] = [[] for _ in range(len(cuts) + 1)]
    g = 0
    for position, end in tokens:
        while g < len(cuts) and cuts[g] < end:
            g += 1
        groups[g].append(position)
    return groups if groups[-1] else groups[:-1]


@dataclass(frozen=True)
class CrossTokenized:
    """An example in the teacher's tokenisation (its prompt and each response re-tokenised from the student's
    decoded text) and, per response, the alignment (student groups, teacher groups) of the two."""

    teacher_example: TokenizedExample
    groups: list[tuple[list[list[int]], list[list[int]]]]


def cross_tokenize(example: TokenizedExample, student_tokenizer, teacher_tokenizer) -> CrossTokenized:
    """The teacher's tokenisation of `example` and the alignment of each response (data rows with a loss mask per
    token, chats, are not supported: the caller refuses them)."""
    prompt_text = student_tokenizer.decode(example.prompt_ids, skip_special_tokens=False)
    teacher_prompt = teacher_tokenizer(prompt_text, add_special_tokens=False)["input_ids"] or [
        teacher_tokenizer.bos_token_id if teacher_tokenizer.bos_token_id is not None else 0]
    responses, groups = [], []
    for response in example.response_ids:
        text = student_tokenizer.decode(response, skip_special_tokens=True)
        ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        if response and response[-1] == student_tokenizer.eos_token_id and teacher_tokenizer.eos_token_id is not None:
            ids = [*ids, teacher_tokenizer.eos_token_id]  # the teacher's sequence ends where the student's does
        responses.append(ids)
        groups.append(align_groups(byte_ends(student_tokenizer, response), byte_ends(teacher_tokenizer, ids)))
    teacher_example = TokenizedExample(teacher_prompt, responses, example.source, example.row)
    return CrossTokenized(teacher_example, groups)

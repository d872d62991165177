"""Tokenised examples held flat: every segment's token ids (each example's prompt, then its responses) in one
NumPy array, with offsets. A list of TokenizedExample keeps a Python int object per token (~36 bytes); this keeps 2
(vocabularies up to 65,536) or 4 bytes, so a 200k-pair set is tens of MB, not a GB. An item is a TokenizedExample
made when it is read, so every consumer sees the same type as before."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from alignkit.data.tokenize import TokenizedExample


@dataclass(eq=False, repr=False)  # a Sequence: equality and repr as before, not over the arrays
class ExampleTable(Sequence):
    tokens: np.ndarray
    segment_ends: np.ndarray
    example_ends: np.ndarray
    loss_masks: np.ndarray | None  # per token (chats' response masks)
    masked: np.ndarray  # per example: whether it has loss masks
    sources: list[str]
    source_ids: np.ndarray
    rows: np.ndarray
    extras: list[dict | None]
    order: np.ndarray | None = None  # a subset's stored indices, in its order

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else len(self.example_ends)

    def _stored(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        i %= len(self)
        return int(self.order[i]) if self.order is not None else i

    def _segments(self, j: int) -> tuple[int, int]:
        return (int(self.example_ends[j - 1]) if j else 0), int(self.example_ends[j])

    def __getitem__(self, i):
        if isinstance(i, slice):  # a list, as slicing the list this replaces gave
            return [self[j] for j in range(len(self))[i]]
        j = self._stored(i)
        first, last = self._segments(j)
        bounds = [int(self.segment_ends[first - 1]) if first else 0, *self.segment_ends[first:last].tolist()]
        segments = [self.tokens[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
        masks = None
        if self.masked[j]:
            masks = [self.loss_masks[a:b].tolist() for a, b in zip(bounds[1:], bounds[2:])]
        row = int(self.rows[j])
        return TokenizedExample(segments[0], segments[1:], self.sources[self.source_ids[j]], None if row < 0 else row,
                                dict(self.extras[j] or {}), masks)

    def subset(self, indices: Iterable[int]) -> ExampleTable:
        """A view of these examples, in the order given; the arrays are shared."""
        stored = np.asarray([self._stored(i) for i in indices], dtype=np.int64)
        return ExampleTable(self.tokens, self.segment_ends, self.example_ends, self.loss_masks, self.masked,
                            self.sources, self.source_ids, self.rows, self.extras, stored)

    def token_counts(self) -> list[int]:
        """Each example's num_tokens, read from the offsets (no example is built)."""
        if not len(self.example_ends):
            return []
        last = self.segment_ends[self.example_ends - 1]
        starts = np.concatenate([[0], self.example_ends[:-1]])
        first = np.where(starts > 0, self.segment_ends[np.maximum(starts - 1, 0)], 0)
        counts = last - first
        return (counts[self.order] if self.order is not None else counts).tolist()

    @property
    def nbytes(self) -> int:
        arrays = (self.tokens, self.segment_ends, self.example_ends, self.masked, self.source_ids, self.rows)
        return sum(a.nbytes for a in arrays) + (self.loss_masks.nbytes if self.loss_masks is not None else 0)


class TableBuilder:
    """Appends examples one at a time into compact buffers; build() makes the table without copying tokens twice."""

    def __init__(self):
        self.tokens = array("H")  # widened to int32 at the first id over 65,535
        self.segment_ends, self.example_ends = array("q"), array("q")
        self.loss_masks, self.masked = array("b"), array("b")
        self.sources: dict[str, int] = {}
        self.source_ids, self.rows = array("i"), array("q")
        self.extras: list[dict | None] = []

    def append(self, example: TokenizedExample) -> None:
        for segment in (example.prompt_ids, *example.response_ids):
            try:
                self.tokens.extend(segment)
            except OverflowError:
                del self.tokens[self.segment_ends[-1] if self.segment_ends else 0:]  # extend stopped part-way
                self.tokens = array("i", self.tokens)
                self.tokens.extend(segment)
            self.segment_ends.append(len(self.tokens))
        self.example_ends.append(len(self.segment_ends))
        masks = example.response_loss_masks
        self.masked.append(masks is not None)
        if masks is not None or self.loss_masks:  # masks kept per token once any example has them
            self.loss_masks.extend([0] * (len(self.tokens) - len(self.loss_masks)))
            if masks is not None:
                end = len(self.tokens) - sum(len(m) for m in masks)
                for mask in masks:
                    self.loss_masks[end:end + len(mask)] = array("b", mask)
                    end += len(mask)
        self.source_ids.append(self.sources.setdefault(example.source, len(self.sources)))
        self.rows.append(-1 if example.row is None else example.row)
        self.extras.append(example.extras or None)

    def build(self) -> ExampleTable:
        masks = None
        if self.loss_masks:
            self.loss_masks.extend([0] * (len(self.tokens) - len(self.loss_masks)))
            masks = np.frombuffer(self.loss_masks, dtype=np.int8).astype(bool)
        return ExampleTable(np.frombuffer(self.tokens, dtype=np.uint16 if self.tokens.typecode == "H" else np.int32),
                            np.frombuffer(self.segment_ends, dtype=np.int64),
                            np.frombuffer(self.example_ends, dtype=np.int64), masks,
                            np.frombuffer(self.masked, dtype=np.int8).astype(bool), list(self.sources),
                            np.frombuffer(self.source_ids, dtype=np.int32), np.frombuffer(self.rows, dtype=np.int64),
                            self.extras)


def build_table(examples: Iterable[TokenizedExample]) -> ExampleTable:
    builder = TableBuilder()
    for example in examples:
        builder.append(example)
    return builder.build()


def select(examples: Sequence[TokenizedExample], indices: Iterable[int]) -> Sequence[TokenizedExample]:
    """examples[i] for each index: a view of a table, a list of anything else."""
    if isinstance(examples, ExampleTable):
        return examples.subset(indices)
    return [examples[i] for i in indices]


def token_counts(examples: Sequence[TokenizedExample]) -> list[int]:
    if isinstance(examples, ExampleTable):
        return examples.token_counts()
    return [example.num_tokens for example in examples]

"""Rewards that read a field of each prompt's record (its constraints, its reference answer): the table from prompt
to field is built once from the validated records, so a malformed field is a DataError naming file, row and field
before any sampling starts."""

from __future__ import annotations

from collections.abc import Iterable

from alignkit.errors import DataError
from alignkit.rewards.base import Reward
from alignkit.rewards.transforms import prompt_key


class RecordReward(Reward):
    """Subclasses set `field` and `parse` (the field's value -> what score_one reads; ValueError for a bad value)
    and implement score_one(value, response) -> float."""

    field = ""

    def __init__(self):
        self.table: dict[str, object] = {}

    def parse(self, value):
        return value

    def score_one(self, value, response: str) -> float:
        raise NotImplementedError

    def bind(self, records: Iterable[dict]) -> RecordReward:
        """Read `field` of every record (as data/load returns them, with _source and _row); returns self."""
        for record in records:
            source, row = record.get("_source", "<memory>"), record.get("_row")
            if self.field not in record:
                raise DataError(source, row, self.field, f"missing field (the {self.name} reward reads it)")
            try:
                self.table[prompt_key(record["prompt"])] = self.parse(record[self.field])
            except ValueError as err:
                raise DataError(source, row, self.field, str(err)) from None
        return self

    def lookup(self, prompt):
        key = prompt_key(prompt)
        if key not in self.table:
            raise KeyError(f"the {self.name} reward has no '{self.field}' for prompt {key[:60]!r}: bind its records")
        return self.table[key]

    def score(self, prompts, responses):
        return [self.score_one(self.lookup(p), r) for p, r in zip(prompts, responses)]


def bind_records(reward, records: list[dict]):
    """reward.bind(records) where the reward reads record fields (also inside a WeightedSum); else the reward."""
    parts = getattr(reward, "parts", None)
    if parts is not None:
        for part, _ in parts:
            bind_records(part, records)
    if hasattr(reward, "bind"):
        reward.bind(records)
    return reward

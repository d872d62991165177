"""How a run packs examples for a forward pass: one value built once from the config and handed to everything that
packs and scores (the step's batches, reference and behaviour scoring, the KL, a reward model)."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.data.pack import PackedBatch, pack, token_budget_batches
from alignkit.data.tokenize import TokenizedExample
from alignkit.models.attention import default_row_tokens


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 where it has none (padding is masked out: any id will do)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@dataclass(frozen=True)
class Packing:
    """Token budget of one micro-batch, row length, pad id, the forward's precision, the vocabulary chunk and the
    temperature the log-probs are scored at (online: the sampling temperature; 1 everywhere else).

    The row length (max_tokens_per_row) is the user's where set. Otherwise `from_config` resolves it with
    models/attention.default_row_tokens for the attention named: the whole micro-batch where attention skips other
    examples (packed_sdpa, flex_attention), None under a dense mask. None packs rows as long as the micro-batch's
    longest example (data/pack.pack). Offline training names its attention; online runs and scorers name none and
    so keep None, the layout their numbers were measured with."""

    max_tokens_per_batch: int = 4096
    max_tokens_per_row: int | None = None
    pad_token_id: int = 0
    precision: str = "fp32"
    chunk_size: int = 1024
    temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg, tokenizer, attention: str | None = None) -> Packing:
        """cfg: any command config with the shared optimisation keys (config.OptimConfig)."""
        rows = cfg.max_tokens_per_row
        if attention is not None:
            rows = default_row_tokens(rows, attention, cfg.max_tokens_per_batch)
        return cls(cfg.max_tokens_per_batch, rows, pad_token_id(tokenizer), cfg.precision, cfg.chunk_size)

    def pack(self, examples: list[TokenizedExample], indices: list[int] | None = None) -> PackedBatch:
        return pack(examples, indices, self.max_tokens_per_row, self.pad_token_id)

    def batches(self, examples: list[TokenizedExample]) -> list[list[int]]:
        """Fixed micro-batches (example indices, in order) under the token budget: scoring, evaluation."""
        return token_budget_batches(examples, self.max_tokens_per_batch, seed=0, shuffle=False)

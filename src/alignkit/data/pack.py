"""The prefix-shared, padding-free PackedBatch (DESIGN.md): each prompt once, its responses after it.

Row layout:  P1 R1a R1b  P2 R2a R2b ...   positions restart at |P| for every response;
a response attends to its own prompt and to itself (causally), never to a sibling or another example.
Rows of one batch are right-padded to the longest row; padding is only ever at the end of a row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from alignkit.data.table import token_counts
from alignkit.data.tokenize import TokenizedExample


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    example_ids: torch.Tensor  # [R, T] batch-local example index, -1 on padding
    segment_ids: torch.Tensor  # [R, T] 0 = prompt, i + 1 = response i, -1 on padding
    # One entry per loss-carrying response token (flat, no padding; every response token unless the example
    # has response_loss_masks):
    token_rows: torch.Tensor  # [N] row of the token
    token_pred_positions: torch.Tensor  # [N] column whose logits predict the token
    token_targets: torch.Tensor  # [N] the token id
    token_seq: torch.Tensor  # [N] sequence index = example * k + response
    num_examples: int
    num_responses: int  # k
    example_indices: list[int]  # dataset index of each batch-local example

    @property
    def seq_lengths(self) -> torch.Tensor:
        counts = torch.bincount(self.token_seq, minlength=self.num_examples * self.num_responses)
        return counts.view(self.num_examples, self.num_responses).float()

    @property
    def num_tokens(self) -> int:
        return int((self.example_ids >= 0).sum())

    def response_last_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of the last token of every response, [B * k] each, in sequence order (example * k + i):
        where a sequence reward model reads its score."""
        num_seq = self.num_examples * self.num_responses
        rows, cols = (self.segment_ids > 0).nonzero(as_tuple=True)
        seq = self.example_ids[rows, cols] * self.num_responses + self.segment_ids[rows, cols] - 1
        last_cols = torch.full((num_seq,), -1, dtype=torch.long).scatter_reduce(0, seq, cols, "amax")
        seq_rows = torch.zeros(num_seq, dtype=torch.long).scatter(0, seq, rows)
        return seq_rows, last_cols

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive 4-D mask [R, 1, T, T]: 0 where attention is allowed, the dtype's minimum elsewhere.
        (A boolean 4-D mask is silently wrong under HF's eager attention, so the float form is used.)"""
        return additive_mask(block_mask(self.example_ids, self.segment_ids), dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, T, T] bool -> [R, 1, T, T] additive float: 0 where allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def block_mask(example_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[R, T, T] bool: query i may see key j iff same example, j <= i, and j is prompt or i's own response."""
    T = example_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same_example = example_ids[:, :, None] == example_ids[:, None, :]
    key_seg, query_seg = segment_ids[:, None, :], segment_ids[:, :, None]
    visible_segment = (key_seg == 0) | (key_seg == query_seg)
    # Padding sees only padding (never an empty row, which would give NaN softmax).
    is_pad = example_ids[:, :, None] < 0
    return causal & same_example & (visible_segment | is_pad)


def pack(examples: list[TokenizedExample], example_indices: list[int] | None = None,
         max_tokens_per_row: int | None = 4096, pad_token_id: int = 0) -> PackedBatch:
    """Pack examples greedily (in order) into rows of at most max_tokens_per_row tokens.
    An example longer than max_tokens_per_row gets a row of its own. None: rows no longer than the longest
    example (short examples still share a row). With a dense mask every row pays T^2 attention, all of it
    spent on pairs of tokens that may not see each other beyond one example, so short rows are cheaper."""
    k = len(examples[0].response_ids)
    if any(len(e.response_ids) != k for e in examples):
        raise ValueError("all examples of a batch must have the same number of responses")
    if max_tokens_per_row is None:
        max_tokens_per_row = max(e.num_tokens for e in examples)
    rows = [[(b, examples[b]) for b in piece] for piece in
            fill_in_order(range(len(examples)), [e.num_tokens for e in examples], max_tokens_per_row)]
    T = max(sum(e.num_tokens for _, e in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    example_ids = torch.full((R, T), -1, dtype=torch.long)
    segment_ids = torch.full((R, T), -1, dtype=torch.long)
    tok_rows, tok_pred, tok_target, tok_seq = [], [], [], []
    for r, row in enumerate(rows):
        col = 0
        for b, example in row:
            P = len(example.prompt_ids)
            input_ids[r, col:col + P] = torch.tensor(example.prompt_ids)
            position_ids[r, col:col + P] = torch.arange(P)
            example_ids[r, col:col + P] = b
            segment_ids[r, col:col + P] = 0
            prompt_last = col + P - 1
            col += P
            for i, response in enumerate(example.response_ids):
                n = len(response)
                input_ids[r, col:col + n] = torch.tensor(response)
                position_ids[r, col:col + n] = torch.arange(P, P + n)
                example_ids[r, col:col + n] = b
                segment_ids[r, col:col + n] = i + 1
                # Token j of the response is predicted by the logits at the previous token:
                # the prompt's last token for j = 0, else response token j - 1.
                pred, targets = [prompt_last, *range(col, col + n - 1)], response
                if example.response_loss_masks is not None:  # a chat: only assistant tokens carry loss
                    trained = example.response_loss_masks[i]
                    pred = [p for p, keep in zip(pred, trained) if keep]
                    targets = [t for t, keep in zip(targets, trained) if keep]
                tok_pred.extend(pred)
                tok_rows.extend([r] * len(pred))
                tok_target.extend(targets)
                tok_seq.extend([b * k + i] * len(pred))
                col += n
        # Padding continues positions so they stay within the model's range.
        position_ids[r, col:] = torch.arange(T - col)
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, example_ids=example_ids, segment_ids=segment_ids,
        token_rows=torch.tensor(tok_rows, dtype=torch.long), token_pred_positions=torch.tensor(tok_pred, dtype=torch.long),
        token_targets=torch.tensor(tok_target, dtype=torch.long), token_seq=torch.tensor(tok_seq, dtype=torch.long),
        num_examples=len(examples), num_responses=k,
        example_indices=list(example_indices) if example_indices is not None else list(range(len(examples))),
    )


def mismatched_partners(num_examples: int) -> list[int]:
    """KTO's mismatched pairs within a batch: example i's prompt goes with the completion of example (i + 1) mod B
    (HALOs' pairing; TRL uses i - 1). A batch of one example pairs it with itself."""
    return [(i + 1) % num_examples for i in range(num_examples)]


def with_mismatched_completions(examples: list[TokenizedExample], max_length: int | None = None) -> list[TokenizedExample]:
    """The batch's examples, each with one more response: its partner's first response (mismatched_partners), cut
    to fit max_length after this example's prompt. Packed prefix-shared like any other response, so the KL
    log-probs come from the same forward pass as the example's own, with no second loop or padding."""
    extended = []
    for example, partner_index in zip(examples, mismatched_partners(len(examples))):
        partner = examples[partner_index]
        room = None if max_length is None else max(1, max_length - len(example.prompt_ids))
        completion = partner.response_ids[0][:room]
        masks = None
        if example.response_loss_masks is not None or partner.response_loss_masks is not None:
            own = example.response_loss_masks or [[True] * len(r) for r in example.response_ids]
            theirs = partner.response_loss_masks[0] if partner.response_loss_masks else [True] * len(completion)
            masks = [*own, theirs[:len(completion)]]
        extended.append(replace(example, response_ids=[*example.response_ids, completion], response_loss_masks=masks))
    return extended


def fill_in_order(items, sizes: list[int], budget: int) -> list[list]:
    """`items` cut, in order, into consecutive pieces whose sizes sum to at most `budget`; an item larger than the
    budget gets a piece of its own."""
    pieces, used = [], 0
    for item, size in zip(items, sizes):
        if not pieces or used + size > budget:  # the last piece is never empty: a new one starts with its item
            pieces.append([])
            used = 0
        pieces[-1].append(item)
        used += size
    return pieces


def token_budget_batches(examples: list[TokenizedExample], max_tokens_per_batch: int, seed: int, epoch: int = 0,
                         shuffle: bool = True, window: int = 64) -> list[list[int]]:
    """Batches of example indices under a token budget. Examples are shuffled (seeded by seed and epoch),
    then sorted by length within windows of `window` examples so a batch holds similar lengths; the batch
    order is shuffled again. Reproducible: same seed and epoch, same batches."""
    order = list(range(len(examples)))
    rng = random.Random(seed * 100_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    counts = token_counts(examples)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=counts.__getitem__)
        batches += fill_in_order(chunk, [counts[i] for i in chunk], max_tokens_per_batch)
    if shuffle:
        rng.shuffle(batches)
    return batches

"""The fast engine's prefill layout: prompts that start alike share their common prefix, run once.

A generate call's prompts often repeat a long start: the k conversations of one record (at the first turn, whole
identical prompts; at later turns the record's prompt, then each conversation's own turns), or one system prompt
over every record. Consecutive prompts are grouped, each group's common prefix is prefilled once (stage 1, one row
per group), and each prompt's own rest (at least its last token, whose hidden state starts the sampling) is
prefilled after it (stage 2, one row per prompt, attending to its group's prefix). Each stage is left-padded only
to its own widest row, so prompts of different lengths no longer pad to the longest whole prompt.

A row's KV cache is [its group's prefix, left-padded to the widest prefix][its rest, left-padded to the widest
rest][the sampled tokens]; padding is masked, and positions count each row's real tokens only, so every token
sees exactly the keys and RoPE positions it would see in its own unpadded sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.models.inference import left_pad


def share_groups(prompts: list[list[int]]) -> list[tuple[int, list[int]]]:
    """(shared prefix length, row indices) of consecutive prompts, greedily: a prompt joins the running group when
    that raises the tokens saved, (rows - 1) x prefix. A prefix always leaves each row at least one token."""
    groups: list[tuple[int, list[int]]] = []
    for i, ids in enumerate(prompts):
        own = max(len(ids) - 1, 0)
        if groups:
            length, rows = groups[-1]
            common = min(length, own, _common(prompts[rows[0]], ids, min(length, own)))
            if len(rows) * common > (len(rows) - 1) * length:
                groups[-1] = (common, rows + [i])
                continue
        groups.append((own, [i]))
    return groups


def _common(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Layout:
    """Stage 1 (the groups' prefixes) and stage 2 (each prompt's rest) of one chunk's prefill."""

    prefix_ids: torch.Tensor  # [G, Lp] left-padded
    prefix_mask: torch.Tensor  # [G, Lp] bool
    prefix_positions: torch.Tensor  # [G, Lp]
    group: torch.Tensor  # [B] each prompt's group
    rest_ids: torch.Tensor  # [B, Ls] left-padded
    rest_mask: torch.Tensor  # [B, Ls] bool
    rest_positions: torch.Tensor  # [B, Ls]: after the group's prefix
    lengths: torch.Tensor  # [B] each prompt's length (its next position)

    @property
    def width(self) -> int:
        """The cache slots the prompts take: the widest prefix plus the widest rest."""
        return self.prefix_ids.shape[1] + self.rest_ids.shape[1]

    def key_mask(self) -> torch.Tensor:
        """bool [B, width]: the cache slots that hold a real token of each prompt."""
        return torch.cat([self.prefix_mask[self.group], self.rest_mask], 1)

    def prefix_attention(self) -> torch.Tensor:
        """bool [G, 1, Lp, Lp]: causal over real tokens (a padding query sees itself only, so no row is empty)."""
        return _causal(self.prefix_mask, self.prefix_ids.shape[1])

    def rest_attention(self) -> torch.Tensor:
        """bool [B, 1, Ls, width]: each rest token sees its group's real prefix tokens and its own earlier ones."""
        Ls = self.rest_ids.shape[1]
        prefix = self.prefix_mask[self.group][:, None, None, :].expand(-1, 1, Ls, -1)
        return torch.cat([prefix, _causal(self.rest_mask, Ls)], -1)


def _causal(mask: torch.Tensor, T: int) -> torch.Tensor:
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = causal[None, None] & mask[:, None, None, :]
    return out | torch.eye(T, dtype=torch.bool)[None, None]


def layout(prompts: list[list[int]], device) -> Layout:
    """The two-stage prefill of prompts (their share_groups)."""
    groups = share_groups(prompts)
    prefixes = [prompts[rows[0]][:length] for length, rows in groups]
    group = torch.empty(len(prompts), dtype=torch.long)
    starts = torch.empty(len(prompts), dtype=torch.long)
    rests = [[] for _ in prompts]
    for g, (length, rows) in enumerate(groups):
        for i in rows:
            group[i], starts[i], rests[i] = g, length, prompts[i][length:]
    prefix_ids, prefix_mask, prefix_positions = left_pad(prefixes, 0, device)
    rest_ids, rest_mask, rest_positions = left_pad(rests, 0, device)
    rest_positions = rest_positions + starts[:, None].to(device)
    return Layout(prefix_ids, prefix_mask.bool(), prefix_positions, group.to(device), rest_ids, rest_mask.bool(),
                  rest_positions, torch.tensor([len(p) for p in prompts], device=device))

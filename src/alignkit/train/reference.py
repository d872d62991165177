"""Reference log-probs: computed once (no grad, eval mode) and cached on disk.

The cache key is a fingerprint of the model weights, the tokenised examples and the settings that change
the numbers (precision, chunking does not), so a changed model, dataset or tokenisation misses the cache.
Under LoRA the reference is the base model: the adapters are disabled (and left out of the fingerprint)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from alignkit.data.cache import cache_dir
from alignkit.data.pack import mismatched_partners, with_mismatched_completions
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import AlignkitError
from alignkit.models.inference import eval_mode
from alignkit.models.logprobs import response_logprobs
from alignkit.models.lora import adapters_disabled
from alignkit.train.packing import Packing

log = logging.getLogger("alignkit.train")


@dataclass
class Reference:
    """The reference's values for one data set, by example index, and the live reference model where a method needs
    more than cached log-probs (SparsePO's per-token distributions, TR-DPO's moving reference)."""

    seq_logps: torch.Tensor  # [n, k]
    token_logps: list[torch.Tensor]  # per example, flat over its responses
    # KTO's mismatched pairs: (example whose prompt, example whose completion) -> summed log-prob, for every pair
    # the run's batches form (pack.mismatched_partners)
    pair_logps: dict[tuple[int, int], float] = field(default_factory=dict)
    model: object | None = None

    def for_batch(self, batch):
        idx = batch.example_indices
        return self.seq_logps[idx], torch.cat([self.token_logps[i] for i in idx])

    def kl_for(self, batch) -> torch.Tensor:
        """[B] reference log-probs of the batch's mismatched completions."""
        idx = batch.example_indices
        pairs = [(idx[b], idx[p]) for b, p in enumerate(mismatched_partners(len(idx)))]
        missing = [pair for pair in pairs if pair not in self.pair_logps]
        if missing:
            raise AlignkitError(f"no reference log-prob for the mismatched pair {missing[0]} (prompt, completion): "
                                "the batch is not one the reference was scored for")
        return torch.tensor([self.pair_logps[pair] for pair in pairs])


def mismatched_examples(examples: list[TokenizedExample], pairs: list[tuple[int, int]],
                        max_length: int | None) -> list[TokenizedExample]:
    """One single-response example per (i, j): prompt i with completion j, tokens exactly as the packed batch
    holds them (pack.with_mismatched_completions), so scoring it alone gives the same log-prob."""
    out = []
    for i, j in pairs:
        extended = with_mismatched_completions([examples[i], examples[j]] if i != j else [examples[i]], max_length)[0]
        masks = None if extended.response_loss_masks is None else extended.response_loss_masks[-1:]
        out.append(TokenizedExample(extended.prompt_ids, extended.response_ids[-1:], extended.source, extended.row,
                                    response_loss_masks=masks))
    return out


def build_reference(model, examples: list[TokenizedExample], packing: Packing, batches=None,
                    max_length: int | None = None, use_cache: bool = True) -> Reference:
    """Reference values of `examples` under `model`. batches: the micro-batches (example indices) the run will pack
    with mismatched completions (KTO), cut to max_length; their pairs are scored too."""
    ref = Reference(*reference_logps(model, examples, packing, use_cache))
    if batches is not None:
        pairs = sorted({(mb[b], mb[p]) for mb in batches for b, p in enumerate(mismatched_partners(len(mb)))})
        pair_seq, _ = reference_logps(model, mismatched_examples(examples, pairs, max_length), packing, use_cache)
        ref.pair_logps = dict(zip(pairs, pair_seq[:, 0].tolist()))
    return ref


def weights_fingerprint(model) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:  # adapters are off while scoring the reference: only the base weights count
            continue
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def examples_fingerprint(examples: list[TokenizedExample]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for example in examples:
        digest.update(repr((example.prompt_ids, example.response_ids)).encode())
        if example.response_loss_masks is not None:  # chats: which tokens carry loss changes the log-probs kept
            digest.update(repr(example.response_loss_masks).encode())
    return digest.hexdigest()


@torch.no_grad()
def score_examples(model, examples: list[TokenizedExample], packing: Packing, with_values: bool = False):
    """Per-sequence [n, k] and per-token (one flat tensor per example) log-probs, without gradients, in eval mode;
    with_values (a PolicyWithValueHead: PPO's behaviour policy): also its per-token values, flat per example."""
    k = len(examples[0].response_ids)
    seq_logps = torch.zeros(len(examples), k)
    token_logps: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    values: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    device = next(model.parameters()).device
    with eval_mode(model):
        for indices in packing.batches(examples):
            batch = packing.pack([examples[i] for i in indices], indices)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=packing.precision == "bf16"):
                out = response_logprobs(model, batch, packing.chunk_size, packing.temperature)
            seq_logps[indices] = out.seq_logps.float().cpu()
            counts = out.lengths.sum(1).long().tolist()
            for i, part in zip(indices, torch.split(out.token_logps.float().cpu(), counts)):
                token_logps[i] = part
            if with_values:
                for i, part in zip(indices, torch.split(out.values.float().cpu(), counts)):
                    values[i] = part
    return (seq_logps, token_logps, values) if with_values else (seq_logps, token_logps)


def reference_logps(model, examples, packing: Packing, use_cache: bool = True):
    """Reference log-probs of `examples` under `model` with any LoRA adapters disabled (so the reference
    is the base model, with no second copy of it), from the disk cache when the fingerprint matches."""
    with adapters_disabled(model):
        if not use_cache:
            return score_examples(model, examples, packing)
        return _cached_logps(model, examples, packing)


def _cache_path(model, examples, packing: Packing):
    settings = packing.precision if packing.temperature == 1 else f"{packing.precision}|T={packing.temperature!r}"
    key = hashlib.blake2b(
        f"{weights_fingerprint(model)}|{examples_fingerprint(examples)}|{settings}".encode(), digest_size=16
    ).hexdigest()
    return cache_dir() / "ref_logps" / f"{key}.safetensors"


def _store(path, seq_logps: torch.Tensor, token_logps: list[torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"seq_logps": seq_logps.contiguous(), "token_logps": torch.cat(token_logps).contiguous(),
               "token_counts": torch.tensor([len(t) for t in token_logps])}, tmp)
    os.replace(tmp, path)


def _cached_logps(model, examples, packing: Packing):
    path = _cache_path(model, examples, packing)
    if path.exists():
        try:
            stored = load_file(path)
            counts = stored["token_counts"].tolist()
            log.info("reference log-probs: cache hit %s", path.name)
            return stored["seq_logps"], list(torch.split(stored["token_logps"], counts))
        except Exception as err:  # noqa: BLE001 - a broken cache file is recomputed, not fatal
            log.warning("reference cache %s unreadable (%s); recomputing", path, err)
    seq_logps, token_logps = score_examples(model, examples, packing)
    _store(path, seq_logps, token_logps)
    return seq_logps, token_logps


def cache_subsets(model, examples, packing: Packing, subsets: list[list[int]], values) -> None:
    """Store, for each subset (example indices), the cache entry a run on exactly examples[subset] under `model`
    will look up, cut from `values` (seq_logps, token_logps) of the whole set: Selective DPO's fold runs and the
    filtered run then read the reference instead of scoring it again."""
    seq_logps, token_logps = values
    with adapters_disabled(model):
        for subset in subsets:
            part = [examples[i] for i in subset]
            _store(_cache_path(model, part, packing), seq_logps[subset], [token_logps[i] for i in subset])

"""The teacher's top-k log-probs of an offline run's examples, kept on disk (`teacher_cache: DIR`) for offline
distillation (gkd, dckd with `top_k`): computed once through the packed forward, then read by every later run, which
no longer runs the teacher in its steps.

The directory's manifest names what the values depend on: the tokenised training and evaluation examples, the
teacher's weights, k, the temperature and the precision. A directory built for anything else is refused in one line
naming what differs, before anything is written (a cache is a user's directory, not a hash-keyed one: reusing the
wrong one must be loud, not a silent miss)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.losses.divergence import DenseTeacher, TopKTeacher, teacher_topk
from alignkit.models.teacher import teacher_hidden
from alignkit.train.packing import Packing
from alignkit.train.reference import examples_fingerprint, weights_fingerprint
from alignkit.train.step import autocast

CACHE_FORMAT = 1
TOPK = "teacher_topk"  # the key of each example's extras that holds its (log-probs [n, k], token ids [n, k])
MANIFEST = "manifest.json"
SETS = ("train", "eval")
# How a refusal names each entry of the manifest that differs.
DIFFERS = {"format": "by another version of alignkit", "train": "from other training data (its tokenised examples "
           "differ)", "eval": "from other evaluation data (its tokenised examples differ)", "teacher": "by another "
           "teacher (its weights differ)", "top_k": "with another top_k", "temperature": "at another temperature",
           "precision": "at another precision"}


def cache_identity(teacher, opts, examples: dict[str, list[TokenizedExample]], precision: str) -> dict:
    """What the cached values depend on, as the manifest stores it."""
    return {"format": CACHE_FORMAT, **{name: examples_fingerprint(examples[name]) for name in SETS},
            "teacher": weights_fingerprint(teacher), "top_k": opts.top_k, "temperature": opts.temperature,
            "precision": precision}


def check_cache_options(key: str, loss: str, opts, reference: str | None) -> None:
    """A top-k cache holds one teacher's k most likely tokens: the loss must compare on them."""
    if reference is not None or not hasattr(opts, "top_k"):
        raise ConfigError(key, f"loss '{loss}' reads the full vocabulary of its teachers; a top-k cache serves gkd "
                               "and dckd with loss_options.top_k")
    if opts.top_k <= 0:
        raise ConfigError(key, "holds the teacher's top-k log-probs: set loss_options.top_k > 0 (e.g. 20)")


def cache_state(path: Path, identity: dict, key: str = "teacher_cache") -> bool:
    """True where `path` holds this identity's cache; False where it is to be built (absent, empty, or an
    interrupted build of ours). A cache built for anything else is refused naming the first difference."""
    manifest = path / MANIFEST
    if manifest.exists():
        try:
            stored = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(key, f"{path}/{MANIFEST} is unreadable ({err}); delete the directory to rebuild it") from None
        for name, value in identity.items():
            if stored.get(name) != value:
                shown = f" ({stored.get(name)!r}, this run {value!r})" if name in ("top_k", "temperature",
                                                                                   "precision") else ""
                raise ConfigError(key, f"{path} was built {DIFFERS[name]}{shown}; give another directory, or delete "
                                       "this one to rebuild it")
        return True
    if path.exists():
        foreign = [p.name for p in path.iterdir() if not p.name.startswith((*(f"{s}." for s in SETS), MANIFEST))]
        if foreign:
            raise ConfigError(key, f"{path} is not a teacher cache (it holds {foreign[0]!r} and no {MANIFEST}); give "
                                   "a new or empty directory")
    return False


@torch.no_grad()
def score_topk(teacher, examples: list[TokenizedExample], packing: Packing, opts) -> list[tuple]:
    """Per example: the teacher's (log-probs [n, k] float32, token ids [n, k]) at its n trained response tokens, as
    the live path computes them in a training forward (train/teacher.teacher_target)."""
    out: list[tuple] = [None] * len(examples)
    for indices in packing.batches(examples):
        batch = packing.pack([examples[i] for i in indices], indices)
        with autocast(packing, teacher):
            top = teacher_topk(DenseTeacher(*teacher_hidden(teacher, batch)), opts.top_k, opts.temperature,
                               packing.chunk_size)
        counts = torch.bincount(batch.token_seq // batch.num_responses, minlength=batch.num_examples).tolist()
        for i, logps, ids in zip(indices, top.logps.cpu().split(counts), top.token_ids.cpu().split(counts)):
            out[i] = (logps.contiguous(), ids.to(torch.int32).contiguous())
    return out


def save_set(path: Path, name: str, values: list[tuple]) -> None:
    tensors = {"logps": torch.cat([v[0] for v in values]), "token_ids": torch.cat([v[1] for v in values]),
               "token_counts": torch.tensor([len(v[0]) for v in values], dtype=torch.long)}
    tmp = path / f"{name}.tmp{os.getpid()}"
    save_file(tensors, tmp)
    os.replace(tmp, path / f"{name}.safetensors")


def load_set(path: Path, name: str, examples: list[TokenizedExample]) -> list[tuple]:
    stored = load_file(path / f"{name}.safetensors")
    counts = stored["token_counts"].tolist()
    if len(counts) != len(examples):
        raise ConfigError("teacher_cache", f"{path}/{name}.safetensors holds {len(counts)} examples, the run "
                                           f"{len(examples)}; delete the directory to rebuild it") from None
    return list(zip(stored["logps"].split(counts), stored["token_ids"].split(counts)))


def with_topk(examples: list[TokenizedExample], values: list[tuple]) -> list[TokenizedExample]:
    """The examples, each carrying its teacher top-k in extras[TOPK] (what Method.forward hands the divergence)."""
    return [TokenizedExample(e.prompt_ids, e.response_ids, e.source, e.row, {**e.extras, TOPK: v},
                             e.response_loss_masks) for e, v in zip(examples, values)]


def cached_topk(examples: list[TokenizedExample], tail: bool) -> TopKTeacher:
    """The batch's teacher as its cached top-k, tokens in packing order (examples in batch order, each flat)."""
    logps = torch.cat([e.extras[TOPK][0] for e in examples])
    ids = torch.cat([e.extras[TOPK][1] for e in examples]).long()
    return TopKTeacher(logps, ids, tail)


@dataclass
class TeacherCache:
    """A `teacher_cache` directory checked against this run: ready where it holds this run's values."""

    path: Path
    identity: dict
    ready: bool

    @classmethod
    def open(cls, path: str, teacher, opts, examples: dict[str, list[TokenizedExample]],
             precision: str) -> TeacherCache:
        """Refuses a directory built for other data, another teacher, k, temperature or precision."""
        identity = cache_identity(teacher, opts, examples, precision)
        return cls(Path(path), identity, cache_state(Path(path), identity))

    def fill(self, teacher, opts, examples: dict[str, list[TokenizedExample]], packing: Packing,
             write: bool = True) -> dict[str, list[TokenizedExample]]:
        """The examples of each set with their teacher top-k: read from the directory, or scored with the teacher
        and written there (the manifest last, so an interrupted build is rebuilt). write: False on the other ranks
        of a torchrun, which score the same values in memory while rank 0 writes them."""
        if self.ready:
            return {name: with_topk(examples[name], load_set(self.path, name, examples[name]) if examples[name]
                                    else []) for name in SETS}
        out = {name: with_topk(examples[name], score_topk(teacher, examples[name], packing, opts)
                               if examples[name] else []) for name in SETS}
        if not write:
            return out
        self.path.mkdir(parents=True, exist_ok=True)
        for name in SETS:
            if out[name]:
                save_set(self.path, name, [e.extras[TOPK] for e in out[name]])
        tmp = self.path / f"{MANIFEST}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(self.identity, indent=1), encoding="utf-8")
        os.replace(tmp, self.path / MANIFEST)
        self.ready = True
        return out

"""Async rollouts in one process: a background thread samples the next rounds with the engine's weights while the
learner trains, at most max_staleness weight versions ahead.

The schedule is fixed, not timed: round r is always sampled with the weights of version max(0, r - N) (version v: the
policy after v rounds), so the run does not depend on thread timing and N = 0 is the synchronous run. While the
learner trains round v, the thread samples round v + N; the engine gets version v + 1 only once that rollout is done
(`drain`). Every round is trained, in order: nothing is dropped, and the thread never runs further ahead than the
schedule allows (admission control). A checkpoint after round v holds rounds v .. v + N - 1, already sampled with
earlier weights (`pending`); a resumed run trains those, so it equals the run that was not stopped.

With partial rollouts (online/partial.py) a round is sampled in N segments, segment j of round r by version
max(0, r - N + j): version v samples the next segment of each round it may touch, oldest round first; a checkpoint
keeps the part-sampled rounds too."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from alignkit.errors import ConfigError
from alignkit.online.rollout import Rollout, stamp_version
from alignkit.train.distributed import gather_objects

INFLIGHT_FILE = "inflight_rollouts.pt"  # in a checkpoint: the rounds sampled ahead of it


def sampling_version(round_index: int, max_staleness: int) -> int:
    """The weight version that samples round `round_index` (0-based): max(0, r - N)."""
    return max(0, round_index - max_staleness)


def version_metrics(rollout: Rollout, round_index: int) -> dict:
    """The round's weight_version (the learner's), sampled_version (its oldest token's), staleness and
    token_staleness (the mean over its tokens: below staleness where partial rollouts sample the tails later)."""
    versions = torch.cat(rollout.token_versions) if rollout.token_versions else torch.zeros(0)
    sampled = int(versions.min()) if len(versions) else round_index
    mean = float(round_index - versions.float().mean()) if len(versions) else 0.0
    return {"weight_version": round_index, "sampled_version": sampled, "staleness": round_index - sampled,
            "token_staleness": mean}


class RolloutProducer:
    """sample(round_index, segment, state) -> state runs on one worker thread, in order: state is None for a round's
    first segment, and its last segment's state is the round's (rollout, metrics). `start(v)` queues the segments
    version v samples, `take(r)` waits for round r, `drain()` waits for every queued segment (before the engine's
    weights change). pending: a checkpoint's rounds, sampled whole, or part-sampled (a state with segments_done)."""

    def __init__(self, sample: Callable[[int, int, object], object], rounds: int, max_staleness: int,
                 pending: dict[int, object] | None = None, segments: int = 1):
        self.sample, self.rounds, self.max_staleness, self.segments = sample, rounds, max_staleness, segments
        self.jobs: dict[int, Future] = {}  # round -> its latest queued segment
        self.queued: dict[int, int] = {}  # round -> segments queued
        for round_index, result in (pending or {}).items():
            self.jobs[round_index] = done = Future()
            done.set_result(result)
            self.queued[round_index] = getattr(result, "segments_done", segments)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignkit-rollouts")

    def version_of(self, round_index: int, segment: int) -> int:
        """The weight version that samples the segment: max(0, r - N + j)."""
        return sampling_version(round_index + segment, self.max_staleness)

    def start(self, version: int) -> None:
        """Queue every segment the schedule gives to `version` that is not queued yet (at version 0: rounds 0..N),
        oldest round first."""
        first = 0 if version == 0 else version + self.max_staleness - self.segments + 1  # rounds with a segment at v
        for round_index in range(first, min(version + self.max_staleness + 1, self.rounds)):
            segment = self.queued.get(round_index, 0)
            while segment < self.segments and self.version_of(round_index, segment) == version:
                self.jobs[round_index] = self.pool.submit(self._sampled, round_index, segment, version,
                                                          self.jobs.get(round_index))
                segment = self.queued[round_index] = segment + 1

    def _sampled(self, round_index: int, segment: int, version: int, previous: Future | None):
        state = self.sample(round_index, segment, previous.result() if previous is not None else None)
        if self.segments == 1:  # a whole round: every token by this version
            rollout, metrics = state
            return stamp_version(rollout, version), metrics
        return state

    def take(self, round_index: int) -> tuple[Rollout, dict]:
        """Round `round_index`'s rollout (waiting for it); an error in sampling or scoring is raised here."""
        if self.queued.get(round_index, 0) < self.segments:
            raise RuntimeError(f"round {round_index + 1} was never queued whole (start its sampling versions first)")
        self.queued.pop(round_index)
        return self.jobs.pop(round_index).result()

    def drain(self) -> None:
        """Wait until every queued segment is sampled: the engine's weights may change after this."""
        for job in list(self.jobs.values()):
            job.result()

    def pending(self) -> dict[int, object]:
        """The rounds sampled (or part-sampled) and not yet trained (after a drain: all of them), for a checkpoint."""
        self.drain()
        return {round_index: job.result() for round_index, job in sorted(self.jobs.items())}

    def checkpoint(self, ctx) -> dict:
        """What a checkpoint keeps of the rounds sampled ahead: whole rounds are alike on every rank (joined); rounds
        part-sampled by partial rollouts are each rank's own share, so every rank's are kept, by rank."""
        pending = self.pending()
        return pending if self.segments == 1 else {"ranks": gather_objects(pending, ctx)}

    @staticmethod
    def restored(saved: dict | None, ctx) -> dict | None:
        """This rank's rounds sampled ahead, as `checkpoint` kept them."""
        if saved is None or "ranks" not in saved:
            return saved
        if len(saved["ranks"]) != ctx.world_size:
            raise ConfigError("async.partial", f"the checkpoint holds part-sampled rounds of {len(saved['ranks'])} "
                                               f"ranks, each its share; resume it on as many, not {ctx.world_size}")
        return saved["ranks"][ctx.rank]

    def close(self) -> None:
        """Stop: queued segments not started are cancelled, a running one is waited for."""
        self.pool.shutdown(wait=True, cancel_futures=True)

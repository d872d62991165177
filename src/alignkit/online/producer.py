"""Async rollouts in one process: a background thread samples the next rounds with the engine's weights while the
learner trains, at most max_staleness weight versions ahead.

The schedule is fixed, not timed: round r is always sampled with the weights of version max(0, r - N) (version v: the
policy after v rounds), so the run does not depend on thread timing and N = 0 is the synchronous run. While the
learner trains round v, the thread samples round v + N; the engine gets version v + 1 only once that rollout is done
(`drain`). Every round is trained, in order: nothing is dropped, and the thread never runs further ahead than the
schedule allows (admission control). A checkpoint after round v holds rounds v .. v + N - 1, already sampled with
earlier weights (`pending`); a resumed run trains those, so it equals the run that was not stopped."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from alignkit.online.rollout import Rollout, stamp_version

INFLIGHT_FILE = "inflight_rollouts.pt"  # in a checkpoint: the rounds sampled ahead of it


def sampling_version(round_index: int, max_staleness: int) -> int:
    """The weight version that samples round `round_index` (0-based): max(0, r - N)."""
    return max(0, round_index - max_staleness)


class RolloutProducer:
    """sample(round_index) -> (rollout, metrics) runs on one worker thread, rounds in order; `start(v)` queues the
    rounds version v samples, `take(r)` waits for round r, `drain()` waits for every queued round (before the
    engine's weights change). pending: rounds already sampled (a checkpoint's)."""

    def __init__(self, sample: Callable[[int], tuple[Rollout, dict]], rounds: int, max_staleness: int,
                 pending: dict[int, tuple[Rollout, dict]] | None = None):
        self.sample, self.rounds, self.max_staleness = sample, rounds, max_staleness
        self.jobs: dict[int, Future] = {}
        for round_index, result in (pending or {}).items():
            self.jobs[round_index] = done = Future()
            done.set_result(result)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignkit-rollouts")

    def start(self, version: int) -> None:
        """Queue every round the schedule gives to `version` that is not sampled yet (at version 0: rounds 0..N)."""
        first = 0 if version == 0 else version + self.max_staleness
        for round_index in range(first, min(version + self.max_staleness + 1, self.rounds)):
            if round_index not in self.jobs:
                self.jobs[round_index] = self.pool.submit(self._sampled, round_index, version)

    def _sampled(self, round_index: int, version: int) -> tuple[Rollout, dict]:
        rollout, metrics = self.sample(round_index)
        return stamp_version(rollout, version), metrics

    def take(self, round_index: int) -> tuple[Rollout, dict]:
        """Round `round_index`'s rollout (waiting for it); an error in sampling or scoring is raised here."""
        if round_index not in self.jobs:
            raise RuntimeError(f"round {round_index + 1} was never queued (start its sampling version first)")
        return self.jobs.pop(round_index).result()

    def drain(self) -> None:
        """Wait until every queued round is sampled: the engine's weights may change after this."""
        for job in list(self.jobs.values()):
            job.result()

    def pending(self) -> dict[int, tuple[Rollout, dict]]:
        """The rounds sampled and not yet trained (after a drain: all of them), for a checkpoint."""
        self.drain()
        return {round_index: job.result() for round_index, job in sorted(self.jobs.items())}

    def close(self) -> None:
        """Stop: queued rounds not started are cancelled, a running one is waited for."""
        self.pool.shutdown(wait=True, cancel_futures=True)

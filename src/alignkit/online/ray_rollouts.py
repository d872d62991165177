"""Rollout workers on Ray (`ray: {rollout_workers: N}`): N Ray actors, each with its own engine (fast, or vllm on a
GPU) on its own copy of the policy, placed by one placement group (a bundle per worker). RayEngine is the driver's
stand-in with the engine interface the run already calls (generate, update_weights), so the round, the async
producer thread and resume run unchanged; the learner, the reward, environments and the producer stay in the driver.

Draws: every generate call is cut at sampling.batch_size, where the engines cut it, and each chunk is seeded as the
engine seeds it (seed + the chunk's first index), so N workers draw what one process draws. Weights: the policy's
trainable parameters, on the CPU, go into Ray's object store once per push and every worker loads them; a version
travels with them, and each generate names the version it expects. A worker that dies is restarted by Ray
(max_restarts), given the current weights again, and its chunks are redone: the run's numbers do not change."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from alignkit.errors import ConfigError
from alignkit.generate.engines import Generation, fast_engine_supports, make_engine

log = logging.getLogger("alignkit.online")
RESTART_POLL_S = 0.2  # how often a chunk retries a worker Ray is restarting


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("ray", "needs the ray package: pip install 'alignkit[ray]' (or leave ray unset to run in "
                                 "one process)") from None
    return ray


def trainable_weights(policy) -> dict[str, torch.Tensor]:
    """What an optimizer step changes (LoRA: the adapters only), as CPU copies: the push's payload."""
    return {name: p.detach().cpu() for name, p in policy.named_parameters() if p.requires_grad}  # ray.put copies


class RolloutWorker:
    """One rollout worker (a Ray actor): its copy of the policy and an engine on it, at a weight version."""

    def __init__(self, policy: list, tokenizer, sampling, threads: int):
        """policy: [the object ref of the policy], fetched here (a restart fetches it again; the driver holds it)."""
        import ray

        torch.set_num_threads(threads)
        self.policy, self.version = ray.get(policy[0]), 0
        self.engine = make_engine(self.policy, tokenizer, sampling)

    def describe(self) -> tuple[str, bool, int]:
        """(engine name, whether its log-probs are the trainer's, process id)."""
        return self.engine.name, bool(getattr(self.engine, "exact_logprobs", False)), os.getpid()

    def load(self, weights: dict[str, torch.Tensor], version: int) -> None:
        missing = set(weights) - {name for name, _ in self.policy.named_parameters()}
        if missing:
            raise RuntimeError(f"the pushed weights name parameters the worker's policy lacks: {sorted(missing)[:3]}")
        self.policy.load_state_dict(weights, strict=False)
        self.engine.update_weights(self.policy)
        self.version = version

    def generate(self, prompt_ids, sampling, num_samples: int, seed: int, version: tuple) -> Generation:
        """version: (number, [its weights' object ref]); a worker at another version (one restarted since the
        push, rebuilt at version 0) loads them first."""
        number, weights = version
        if number != self.version:
            import ray

            self.load(ray.get(weights[0]), number)
        return self.engine.generate(prompt_ids, sampling, num_samples, seed)


def join_generations(prompt_ids: list, parts: list[Generation]) -> Generation:
    """The generations of consecutive chunks of prompt_ids as one."""
    return Generation(list(prompt_ids), *([row for part in parts for row in getattr(part, column)]
                                          for column in ("ids", "logprobs", "finish_reasons", "texts", "generated")))


class RayEngine:
    """The driver's engine: generate splits the call into sampling.batch_size chunks, dealt round-robin to the
    workers (across calls); update_weights pushes the policy's trainable weights to every worker. `redone` counts the chunks
    sampled again after a worker died."""

    def __init__(self, ray, workers: list, max_restarts: int):
        self.ray, self.workers, self.max_restarts = ray, workers, max_restarts
        self.name, self.exact_logprobs, _ = ray.get(workers[0].describe.remote())
        self.weights, self.version, self.redone = None, 0, 0  # version 0: the weights the workers were built with
        self.dealt = 0  # chunks dealt so far: the next goes to worker dealt % N

    def update_weights(self, policy) -> None:
        self.weights, self.version = self.ray.put(trainable_weights(policy)), self.version + 1
        for index, job in enumerate([worker.load.remote(self.weights, self.version) for worker in self.workers]):
            try:
                self.ray.get(job)
            except self.ray.exceptions.RayActorError:  # restarted, it loads them before it samples (generate)
                log.warning("rollout worker %d died during the weight push", index)

    def generate(self, prompt_ids, sampling, num_samples: int = 1, seed: int = 0) -> Generation:
        return self.submit(prompt_ids, sampling, num_samples, seed)()

    def submit(self, prompt_ids, sampling, num_samples: int = 1, seed: int = 0) -> Callable[[], Generation]:
        """Start sampling now; the returned call waits for the Generation. Callers that make several generate calls
        (an environment's turn, one per chunk) start them all, so every worker samples at once."""
        chunks = []
        for start in range(0, len(prompt_ids), sampling.batch_size):
            chunks.append((self.dealt % len(self.workers), prompt_ids[start:start + sampling.batch_size], seed + start))
            self.dealt += 1
        jobs = [self._submit(index, chunk, sampling, num_samples, chunk_seed) for index, chunk, chunk_seed in chunks]
        return lambda: join_generations(prompt_ids, [self._result(job, index, (chunk, sampling, num_samples, seed_))
                                                     for job, (index, chunk, seed_) in zip(jobs, chunks)])

    def _submit(self, index: int, chunk, sampling, num_samples: int, seed: int):
        version = (self.version, [self.weights])  # in a list: the worker fetches the weights only if it lacks them
        return self.workers[index].generate.remote(chunk, sampling, num_samples, seed, version)

    def _result(self, job, index: int, call: tuple) -> Generation:
        """The chunk's generation; if its worker died, the chunk again on the restarted worker (which loads the
        current weights first), up to max_restarts deaths; while Ray restarts it, the chunk waits."""
        deaths, retried, errors = 0, False, self.ray.exceptions
        while True:
            try:
                generation = self.ray.get(job)
                self.redone += retried
                return generation
            except errors.ActorUnavailableError:  # Ray is restarting it: not a new death
                time.sleep(RESTART_POLL_S)
            except errors.RayActorError as err:
                deaths += 1
                if deaths > self.max_restarts:
                    raise RuntimeError(f"rollout worker {index} died {deaths} times in one generate call "
                                       f"(ray.max_restarts {self.max_restarts}); last: {err}") from err
            if not retried:
                log.warning("rollout worker %d died; its chunk is redone on the restarted worker", index)
            retried = True
            job = self._submit(index, *call)


class RolloutCluster:
    """A run's Ray side: the connection, one placement group and the workers, started with the policy (engine)."""

    def __init__(self, ray, options, engine: str):
        self.ray, self.options, self.workers = ray, options, []
        gpus = options.num_gpus_per_worker if options.num_gpus_per_worker is not None else float(engine == "vllm")
        self.bundle = {"CPU": options.num_cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        self.group = placed_group(ray, options, self.bundle, options.rollout_workers, "ray.rollout_workers")

    @classmethod
    @contextmanager
    def open(cls, cfg, ctx):
        """The run's cluster while the run lasts (None without a `ray:` section); a Ray this call started is shut
        down after, one a caller started (ray.init) is left running. In a learner rank on Ray (online/ray_learners)
        each rank has rollout_workers of its own, for its share of every round."""
        if cfg.ray is None or cfg.ray.rollout_workers == 0:  # (0: the learners on Ray sample, online/ray_learners)
            yield None
            return
        ray = import_ray()
        started = not ray.is_initialized()
        if ctx.enabled and (started or ray.get_runtime_context().get_actor_id() is None):  # not a rank on Ray
            raise ConfigError("ray", "rollout workers beside several learner ranks need the ranks started on Ray: "
                                     "set ray.learners instead of running torchrun")
        if started:
            ray.init(address=cfg.ray.address, include_dashboard=False)
        cluster = None
        try:
            cluster = cls(ray, cfg.ray, cfg.sampling.engine)
            yield cluster
        finally:
            if cluster is not None:
                cluster.close()
            if started:
                ray.shutdown()

    def engine(self, policy, tokenizer, sampling) -> RayEngine:
        """The workers, each with the engine sampling names on a copy of `policy` (its weights now: version 0)."""
        shipped = policy if next(policy.parameters()).device.type == "cpu" else copy.deepcopy(policy).cpu()
        if sampling.engine in ("auto", "fast") and not fast_engine_supports(shipped):
            raise ConfigError("sampling.engine", f"Ray workers sample with fast (Llama-family decoders) or vllm, "
                              f"not hf: {type(policy).__name__} needs vllm (GPU)")
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor = self.ray.remote(RolloutWorker)
        # held while the workers live: a restart rebuilds a worker from it
        self.policy_ref, threads = self.ray.put(shipped), max(1, int(self.options.num_cpus_per_worker))
        for index in range(self.options.rollout_workers):
            placed = PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index)
            self.workers.append(actor.options(
                num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0), max_restarts=self.options.max_restarts,
                max_task_retries=0, scheduling_strategy=placed).remote([self.policy_ref], tokenizer, sampling, threads))
        return RayEngine(self.ray, self.workers, self.options.max_restarts)

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.ray.util.remove_placement_group(self.group)


def placed_group(ray, options, bundle: dict, count: int, key: str):
    """A ready placement group of `count` bundles (options.placement); a cluster without room for them is refused,
    naming `key`, after options.placement_timeout_s."""
    from ray.util.placement_group import placement_group

    group = placement_group([dict(bundle)] * count, strategy=options.placement)
    ready, _ = ray.wait([group.ready()], timeout=options.placement_timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise ConfigError(key, f"the cluster has no room for {count} bundles of {bundle} ({options.placement}) after "
                               f"{options.placement_timeout_s:g} s (`ray status` shows what it has): ask for fewer or "
                               "smaller bundles, or add nodes")
    return group


def rollout_engine(policy, tokenizer, sampling, cluster: RolloutCluster | None):
    """The run's engine: in this process (make_engine), or the Ray workers' (RayEngine)."""
    return make_engine(policy, tokenizer, sampling) if cluster is None else cluster.engine(policy, tokenizer, sampling)

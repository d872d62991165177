"""The learner group on Ray (`ray: {learners: L, rollout_workers: 0}`): L Ray actors, one placement-group bundle each,
that are the ranks torchrun would start. Each gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
(rank 0's node and a free port there) and runs run_online as a torchrun rank does: torch.distributed (gloo on CPU,
nccl on GPUs) through train/distributed.py, each rank sampling its share of a round with its own engine (or its own
rollout workers), the shared DDP / FSDP2 step. Ray only places and starts the processes; no communication of its own. The driver waits and
returns rank 0's result."""

from __future__ import annotations

import logging
import os
import socket

import torch

from alignkit.online.ray_rollouts import import_ray, placed_group

log = logging.getLogger("alignkit.online")


class LearnerRank:
    """One rank of the learner group (a Ray actor)."""

    def address(self) -> tuple[str, int]:
        """This node's address and a port free on it now: rank 0's are the group's MASTER_ADDR / MASTER_PORT."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            return ray.util.get_node_ip_address(), probe.getsockname()[1]

    def run(self, cfg, shared: tuple, env: dict[str, str]):
        """run_online as rank env["RANK"]; shared: ((model, tokenizer), inputs). (process id, rank 0's result or
        None)."""
        os.environ.update(env)
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        from alignkit.online.run import run_online

        (model, tokenizer), inputs = shared
        result = run_online(cfg, model, tokenizer, inputs)
        return os.getpid(), result if env["RANK"] == "0" else None


def run_learner_group(cfg, model_and_tokenizer: tuple, inputs):
    """cfg.ray.learners ranks on Ray; rank 0's OnlineResult. Each rank samples its share of a round itself, or
    with rollout_workers Ray workers of its own (online/ray_rollouts)."""
    ray, options = import_ray(), cfg.ray
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, include_dashboard=False)
    bundle = {"CPU": options.num_cpus_per_learner, **({"GPU": options.num_gpus_per_learner}
                                                       if options.num_gpus_per_learner else {})}
    group = placed_group(ray, options, bundle, options.learners, "ray.learners")
    ranks = []
    try:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor = ray.remote(LearnerRank)
        for index in range(options.learners):
            placed = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
            ranks.append(actor.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                                       scheduling_strategy=placed).remote())
        master, port = ray.get(ranks[0].address.remote())
        threads = str(max(1, int(options.num_cpus_per_learner)))
        common = {"WORLD_SIZE": str(options.learners), "LOCAL_RANK": "0", "MASTER_ADDR": master,
                  "MASTER_PORT": str(port), "OMP_NUM_THREADS": threads}
        shared = ray.put((model_and_tokenizer, inputs))  # one copy in the object store for every rank
        jobs = [rank.run.remote(cfg, shared, {**common, "RANK": str(index)}) for index, rank in enumerate(ranks)]
        done = ray.get(jobs)
        log.info("learner group: %d ranks ran in processes %s (rank 0 on %s)", len(done), [pid for pid, _ in done],
                 master)
        return done[0][1]
    finally:
        for rank in ranks:
            ray.kill(rank)
        ray.util.remove_placement_group(group)
        if started:
            ray.shutdown()


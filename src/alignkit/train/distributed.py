"""Several processes launched by torchrun: each optimizer step's micro-batches are shared out across ranks,
gradients are averaged by DDP or FSDP2 (`distributed: ddp | fsdp`), metrics are summed over ranks.

In one process (no WORLD_SIZE in the environment) every function here is a no-op, so the loop has no branch
for it. The gradient of a step equals the single-process gradient of the same global batch: each rank scales
its loss by world_size / (examples in the whole step) and DDP / FSDP2 average over ranks."""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alignkit.errors import AlignkitError, ConfigError
from alignkit.models.logprobs import PackedForward


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # where this rank trains; None (one process): where the model already is
    owns_group: bool = False  # this call created the process group, so train() tears it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    nccl and one GPU per local rank where CUDA is available, gloo on CPU. One process: Dist(), nothing done."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        raise AlignkitError("WORLD_SIZE is set but RANK is not: launch with torchrun (see docs/distributed.md)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world_size, local_rank, device, owns)


def shutdown(ctx: Dist) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------------------------- sharded steps


def split_for_ranks(micro_batches: list[list[int]], world_size: int, step: int = 0) -> list[list[list[int]]]:
    """One step's micro-batches shared out so every rank runs the same number of forward/backward passes.
    The largest micro-batches are halved until their count is a multiple of world_size (or, when there are too
    few examples for that, the smallest neighbours are merged down to one); rank r then gets
    micro-batches r, r + W, r + 2W, ... (no example is dropped or repeated)."""
    n_examples = sum(len(mb) for mb in micro_batches)
    if n_examples < world_size:
        raise AlignkitError(f"step {step + 1} has {n_examples} example(s) for {world_size} ranks; every rank needs "
                            "one: raise max_tokens_per_batch or grad_accum, or launch fewer processes")
    batches = [list(mb) for mb in micro_batches]
    target = -(-len(batches) // world_size) * world_size
    if target > n_examples:  # too few examples to split that far: merge neighbours down to a multiple instead
        target = (n_examples // world_size) * world_size
    while len(batches) > target:
        i = min(range(len(batches) - 1), key=lambda j: len(batches[j]) + len(batches[j + 1]))
        batches[i:i + 2] = [batches[i] + batches[i + 1]]
    while len(batches) < target:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        half = (len(batches[largest]) + 1) // 2
        batches[largest:largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return [batches[r::world_size] for r in range(world_size)]


def shard_steps(steps: list[list[list[int]]], ctx: Dist) -> list[list[list[int]]]:
    """This rank's micro-batches of every optimizer step (all of them in one process). Done for every step
    before training, so a step with fewer examples than ranks fails at once."""
    return [split_for_ranks(mbs, ctx.world_size, s)[ctx.rank] for s, mbs in enumerate(steps)]


def gradient_sync(train_model, enabled: bool):
    """DDP / FSDP2 reduce gradients only when `enabled` (the step's last micro-batch); before it, they
    accumulate locally. A no-op for a bare model."""
    if isinstance(train_model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else train_model.no_sync()
    if hasattr(train_model, "set_requires_gradient_sync"):  # an FSDP2 module
        train_model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def sum_over_ranks(values: dict[str, float], ctx: Dist) -> dict[str, float]:
    """Per-key sums over ranks (keys any rank lacks count as 0); rank order is fixed, so all agree exactly."""
    if not ctx.enabled:
        return values
    gathered: list[dict[str, float]] = [{} for _ in range(ctx.world_size)]
    dist.all_gather_object(gathered, values)
    total: dict[str, float] = {}
    for part in gathered:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def gather_objects(value, ctx: Dist, group=None) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank (over `group`, default: the whole world)."""
    if not ctx.enabled:
        return [value]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def side_group(ctx: Dist):
    """A second gloo group over all ranks, for collectives a background thread issues (async rollouts' exchange)
    while the main thread's run on the default group: each group keeps its own order, so the two never interleave.
    Every rank must call this, at the same point. None in one process."""
    return dist.new_group(backend="gloo") if ctx.enabled else None


def total_norm(grad_norm) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor under FSDP2; its value is the same on every rank."""
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm


# ---------------------------------------------------------------------------------------------- wrapping


def wrap_model(model, mode: str, ctx: Dist):
    """The module a training step calls. One process: the model itself. Several: a PackedForward around it,
    DDP-wrapped (mode ddp) or FSDP2-sharded per decoder layer and at the root (mode fsdp). Build the
    optimizer after this: FSDP2 replaces the parameters with sharded ones."""
    if not ctx.enabled:
        return model
    module = PackedForward(model)
    if mode == "ddp":
        # device_ids=None: inputs are moved by response_logprobs, and DDP must not copy the PackedBatch. Buffers
        # (rotary tables) are equal on every rank: no need to broadcast them at every forward.
        ddp = torch.nn.parallel.DistributedDataParallel
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(ddp.__init__).parameters else {"broadcast_buffers": False})
        return ddp(module, device_ids=None, **no_buffer_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ConfigError("distributed", f"fsdp: cannot find the decoder layers of {type(model).__name__} "
                                         "(no _no_split_modules); use distributed: ddp")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)  # the root: embeddings, final norm and LM head
    return module


def is_sharded(train_model) -> bool:
    return hasattr(train_model, "set_requires_gradient_sync") and not isinstance(
        train_model, torch.nn.parallel.DistributedDataParallel)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model, train_model) -> dict | None:
    """The whole model's state gathered to rank 0 (empty on the others) under FSDP2 — a collective: every rank
    calls it. None when the model is not sharded: save the model as it is."""
    if not is_sharded(train_model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_optimizer_state(model, optimizer, train_model) -> dict | None:
    """Like full_model_state, for the optimizer (keyed by parameter name)."""
    if not is_sharded(train_model):
        return None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(model, optimizer, train_model, state: dict) -> None:
    """Restore an optimizer state saved by the checkpoint (a full, name-keyed state under FSDP2)."""
    if not is_sharded(train_model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))

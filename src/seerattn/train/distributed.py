"""Multi-process training under ``torchrun``: gates replicated, the model replicated or FSDP2-sharded.

Launch: ``torchrun --nproc_per_node N -m seerattn distill RECIPE`` (one process per GPU; on CPU
the gloo backend is used, which is what the tests run).

Why not wrap the model in ``DistributedDataParallel``: only the gates train (tens of MB of
parameters, e.g. 200 MB in fp32 for Llama-3.1-8B) while one optimizer step runs ``batch_size``
forwards of up to 64k tokens, so gradient communication is negligible and overlapping it with the
backward buys nothing. What DDP would do for us is done explicitly and visibly instead:

- gate parameters are broadcast from rank 0 at the start (every rank then holds the same gates);
- after the local gradient accumulation, the gate gradients are averaged across ranks with one
  all-reduce of a single flat buffer (DDP's bucketed all-reduce under ``no_sync`` for all but the
  last micro-batch, minus the bookkeeping); the frozen base model never takes part;
- every rank then takes the same optimizer step, so gates, optimizer and scheduler stay identical
  and rank 0 alone writes checkpoints, metrics and the adapter.

``parallel="fsdp"`` is for a base model that does not fit one GPU: each decoder layer and then the
decoder stack are wrapped with FSDP2's ``fully_shard``, with the layer's gate parameters passed as
``ignored_params`` so they stay ordinary replicated tensors handled exactly as above. The base
is frozen and the gate inputs are detached, so FSDP only all-gathers weights during the forward;
no gradient ever reaches a sharded parameter (no reduce-scatter). Each rank loads the full model
on the CPU first (``from_pretrained``) and ``fully_shard`` moves its shard to the GPU, so host
memory must hold one copy per process (16 GB per rank for an 8B model in bf16). Tested on CPU/gloo;
on GPUs use it only when the replicated (ddp) layout does not fit.

Fine-tuning (:mod:`.finetune`) trains the model too: with ``ddp`` every trainable weight's gradient
is averaged the same way (one flat buffer: meant for models whose replicas fit, e.g. the testbed or
LoRA); with ``fsdp`` the same ``fully_shard`` layout (the whole causal LM as the root unit) now
reduce-scatters the weights' gradients during the backward, while the gates stay replicated and
all-reduced as above: they are a few MB, and each layer takes its gate loss's gradient inside its
own forward (``SeerState.gate_grad_scale``; the gate reads detached inputs, so FSDP's hooks are not
involved), accumulating into ``.grad`` over the micro-batches; the one all-reduce per optimizer step
(:func:`average_gradients`, from the task's ``reduce_gradients``) follows the last micro-batch, as
before. On a step without a gate target (``gate_target_every``) the gates have no gradient and are not
all-reduced. :func:`clip_grad_norm` clips the global norm over sharded and replicated gradients alike.

Shape legend: none (parameter lists only).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "DistContext",
    "average_gradients",
    "broadcast_parameters",
    "check_replicas",
    "clip_grad_norm",
    "init_distributed",
    "shard_base_model",
]

logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``, whether it made the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks (in place; returns ``t``)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} must be an int") from e


def init_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and join (or create) the process group.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``. With CUDA each process
            uses GPU ``LOCAL_RANK`` and the NCCL backend; on CPU the gloo backend.
    """
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("recipe asks for device='cuda' but CUDA is not available here; use device=auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
        owns = True
    if world > 1:
        logger.info("rank %d/%d on %s (%s)", rank, world, dev, dist.get_backend())
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def broadcast_parameters(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Copy rank 0's values of ``params`` to every rank (one flat broadcast)."""
    if not ctx.distributed or not params:
        return
    with torch.no_grad():
        flat = _flatten_dense_tensors([p.data for p in params])
        dist.broadcast(flat, src=0)
        for p, v in zip(params, _unflatten_dense_tensors(flat, [p.data for p in params]), strict=True):
            p.copy_(v)


def average_gradients(params: Sequence[torch.nn.Parameter], ctx: DistContext) -> None:
    """Average the gradients of ``params`` over ranks (one all-reduce of a flat fp32 buffer)."""
    if not ctx.distributed:
        return
    missing = [i for i, p in enumerate(params) if p.grad is None]
    if missing:
        raise RuntimeError(f"gate parameters {missing[:5]} received no gradient; every gate must take part")
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    for g, v in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(v)


def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float, ctx: DistContext) -> float:
    """Clip the global L2 norm of the gradients of ``params`` to ``max_norm``; returns the norm before clipping.

    Plain tensors (replicated, gradients already averaged) go through ``torch.nn.utils.clip_grad_norm_``.
    FSDP2-sharded parameters (DTensors, each rank holding a disjoint shard of the averaged gradient)
    contribute the all-reduced sum of their local squares; the replicated ones are counted once.
    """
    from torch.distributed.tensor import DTensor

    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    plain = [p for p in params if not isinstance(p, DTensor)]
    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for p in sharded:
        sq += p.grad.to_local().double().pow(2).sum()
    if ctx.distributed:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    for p in plain:
        sq += p.grad.double().pow(2).sum()
    norm = float(sq.sqrt())
    if math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s epsilon
        for p in params:
            grad = p.grad.to_local() if isinstance(p, DTensor) else p.grad
            grad.mul_(coef)
    return norm


def check_replicas(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Raise unless every rank holds bitwise the same ``params`` as rank 0 (a cheap end-of-run audit)."""
    if not ctx.distributed or not params:
        return
    with torch.no_grad():
        mine = _flatten_dense_tensors([p.detach() for p in params])
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        differs = (mine != ref).any().to(torch.int32).reshape(1)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    if int(differs.item()):
        raise RuntimeError("the gates differ across ranks at the end of training: the replicas diverged")


def shard_base_model(
    base: torch.nn.Module,
    layers: Sequence[torch.nn.Module],
    ignored: set[torch.nn.Parameter],
    ctx: DistContext,
) -> None:
    """FSDP2-shard ``base`` (the decoder stack) per layer over all ranks, leaving ``ignored`` replicated.

    Buffers and ignored parameters that ``fully_shard`` does not manage are then moved to the
    rank's device explicitly (FSDP2 moves only what it shards).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if p in ignored})
    fully_shard(base, mesh=mesh, ignored_params=ignored)
    for module in base.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != ctx.device:
                module._buffers[name] = buf.to(ctx.device)
    for p in ignored:
        if p.device != ctx.device:
            p.data = p.data.to(ctx.device)

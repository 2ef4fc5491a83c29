"""Multi-process data parallelism, set up from torchrun's environment.

    torchrun --standalone --nproc_per_node=8 -m diffmem.cli.train ...

Each process trains on its share of every global batch; DistributedDataParallel averages
the gradients, so all processes keep identical weights. The backend is NCCL on CUDA and
gloo on the CPU. Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1)
everything here is a no-op and the run is a single process.
"""
from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print on the main process only."""
    if is_main():
        print(*args, **kwargs)
        sys.stdout.flush()


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else CPU. Under torchrun each process takes the GPU
    of its LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def init(device: torch.device, init_method: str | None = None, rank_: int | None = None,
         world_size_: int | None = None) -> None:
    """Join the process group if launched with more than one process. torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is used unless
    init_method/rank_/world_size_ are given (tests spawn processes that way)."""
    if is_distributed():
        return
    size = world_size_ if world_size_ is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = dict(backend=backend, timeout=datetime.timedelta(minutes=60))
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank_, world_size=size)
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is true on at least one (e.g. a stop request
    that reached only some processes)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (a copy; the input is untouched)."""
    values = values.clone()
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj: Any) -> list[Any]:
    """[obj of process 0, obj of process 1, ...] on every process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Process 0's obj on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

"""Multi-process (torch.distributed) helpers: set-up from torchrun's environment, rank queries,
and the collectives the trainer and the streaming loader need.

``dtn train`` under ``torchrun --nproc_per_node N`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) calls :func:`init_from_env`: the gloo
backend on CPU, NCCL when training on CUDA (one GPU per process, ``cuda:LOCAL_RANK``).
Without those variables everything here is a no-op for a single process.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str = "cpu", timeout_s: float = 1800.0) -> str:
    """Join the process group torchrun describes (if WORLD_SIZE > 1 and not joined yet); returns the
    device this process trains on (``cuda:LOCAL_RANK`` for a CUDA ``device``, else ``device``)."""
    if env_world_size() <= 1:
        return device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={env_world_size()} but {missing} are not set; launch with torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device is {device!r} but CUDA is not available")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return device


def cleanup(drain: bool = False) -> None:
    """Leave the process group. ``drain`` (every rank finished the run, so every rank calls this): a
    barrier first. A gloo worker thread frees a finished collective's work after the caller has moved
    on; if that work holds the last reference to a tensor Python has let go of, the free needs the GIL.
    The group's destructor (here, or later when the DDP model holding it is freed) joins those threads
    while holding the GIL, so it must not run while such a free is pending: it hung at exit about one
    run in twelve (2 processes, gloo). Waiting in the barrier releases the GIL and lets them finish.
    Not on an error path, where the other ranks may never reach it."""
    if dist.is_available() and dist.is_initialized():
        if drain:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def comm_device(device) -> torch.device:
    """Where collective tensors must live: the GPU for NCCL, the CPU for gloo."""
    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(x: torch.Tensor, device="cpu") -> torch.Tensor:
    """Every rank's rows of ``x`` [n_rank, ...] concatenated in rank order (ranks may hold different
    numbers of rows, including none). Returns ``x`` itself for a single process."""
    if not is_distributed():
        return x
    dev = comm_device(device)
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]), device=dev)
    padded[: x.shape[0]] = x.to(dev)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(x.device)


def all_reduce_sum(x: torch.Tensor, device="cpu") -> torch.Tensor:
    """The sum of ``x`` over ranks (``x`` itself for a single process)."""
    if not is_distributed():
        return x
    dev = comm_device(device)
    y = x.to(dev).clone()
    dist.all_reduce(y)
    return y.to(x.device)


__all__ = ["is_distributed", "rank_and_world", "is_main", "env_world_size", "init_from_env", "cleanup", "barrier",
           "all_gather_objects", "gather_rows", "all_reduce_sum", "comm_device"]

"""Devices and ``torch.distributed``: which device a process trains on, and the few collective steps
the trainer needs (DDP under ``torchrun --nproc_per_node=N -m onetrans_mini train ...``).

One process is the default and needs none of this: ``dist_info()`` then says rank 0 of 1, and the
helpers below are no-ops. Under torchrun each process takes the GPU of its ``LOCAL_RANK`` (nccl), or
the CPU (gloo).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import DEVICES, DataConfig, TrainError
from .data import RequestData, load_dataset

# ----------------------------------------------------------------------------------------------
# devices


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the local rank's GPU when CUDA is available, else the CPU."""
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise TrainError(f"unknown device {name!r}; expected one of {list(DEVICES)} or 'cuda:N'")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError(f"device {name!r} asked for, but CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def device_description(device: torch.device) -> str:
    """One line for logs and results: the GPU's name, or the CPU's thread count and architecture."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''}, {platform.machine()})"


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# the process group


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size of the initialized process group (1 process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialize ``torch.distributed`` from torchrun's environment when ``WORLD_SIZE > 1``:
    nccl on CUDA (one GPU per local rank), gloo on CPU. A no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist_info()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist_info()


def destroy_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all ranks (fp64, so counts stay exact); the values as they are for one process."""
    if not dist_info().enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    info = dist_info()
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself for one process)."""
    if not dist_info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist_info().enabled:
        dist.barrier()


def load_data(name: str, config: DataConfig | None = None, seed: int = 0) -> RequestData:
    """``load_dataset`` that is safe under torchrun: rank 0 prepares (and caches) first, then the others
    read its cache instead of building the same files at the same time."""
    info = dist_info()
    if info.enabled and not info.is_main:
        barrier()
    data = load_dataset(name, config=config, seed=seed)
    if info.enabled and info.is_main:
        barrier()
    return data

"""Where a process computes, in what dtype, and how its ranks talk: one Compute for every command.

    choose_compute(device, dtype) -> Compute: CUDA when available (this rank's GPU under torchrun), else the CPU;
    bfloat16 autocast on CUDA, float32 on the CPU. Weights stay float32; autocast runs the matmuls in
    the compute dtype.

Under torchrun, start_ranks joins the process group once per process (NCCL on CUDA, gloo on the CPU), and
every collective here runs on the device that group serves, whatever device its tensor is on.
"""

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Compute:
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: torch.dtype  # the compute dtype: what autocast runs matmuls in

    @property
    def device_type(self):
        return torch.device(self.device).type

    def autocast(self):
        """Matmuls in the compute dtype; nothing changes for float32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def choose_compute(device=None, dtype=None) -> Compute:
    """The device and compute dtype of this process: given ones win, else CUDA when available and
    bfloat16 autocast on it, float32 on the CPU. Under torchrun, "cuda" means this rank's GPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(device).type  # an unknown device is a RuntimeError here, not later
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this machine has no CUDA GPU (or torch was built without CUDA)")
    if device == "cuda" and world_size() > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if dtype in (None, "", "auto"):
        return Compute(device, torch.bfloat16 if kind == "cuda" else torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, bfloat16 or float32, not {dtype!r}")
    return Compute(device, DTYPES[dtype])


# ----------------------------------------------------------------------------- ranks


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_ranks(device, timeout=None):
    """(rank, world size): join the process group of a torchrun launch once per process; (0, 1) alone."""
    world = world_size()
    if world == 1:
        return 0, 1
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), world


@contextmanager
def stage_ranks():
    """Around a stage: the process group it joins (start_ranks) is left when it ends, however it ends; one it
    found joined already is kept (`nanoseek run` keeps one process group over its stages)."""
    joined = dist.is_initialized()
    try:
        yield
    finally:
        if dist.is_initialized() and not joined:
            dist.destroy_process_group()


def collective_device():
    """The device whose tensors the process group takes: this rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(t, op=None):
    """t summed (or op-reduced) over ranks, on t's own device; t itself when there are no ranks."""
    if not dist.is_initialized():
        return t
    on = t.to(collective_device())
    dist.all_reduce(on, op=op or dist.ReduceOp.SUM)
    return on.to(t.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when flag is true on any rank."""
    return float(all_reduce(torch.tensor([float(flag)]))) > 0


def from_rank0(flag: bool) -> bool:
    """Rank 0's flag, on every rank: decisions that read files are taken once."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=collective_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier():
    if dist.is_initialized():
        dist.barrier()

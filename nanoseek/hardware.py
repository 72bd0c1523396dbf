"""What a device can do: datasheet peaks of common GPUs, the measured peak of this machine (MFU's
denominator, and `nanoseek plan`'s), and whether its bfloat16 matmuls are fast."""

import functools
import time

import torch

MIB = 2**20
GPUS = {  # name -> (dense bf16 tensor-core peak in FLOP/s from the maker's datasheet, memory as the driver reports it)
    "H200": (989e12, 143771 * MIB),
    "H100": (989e12, 81559 * MIB),  # SXM; the PCIe card peaks at 756e12
    "A100": (312e12, 81920 * MIB),  # the 80 GB card; also sold with 40 GB
    "L40S": (362e12, 46068 * MIB),
    "L4": (121e12, 23034 * MIB),
    "RTX 4090": (165e12, 24564 * MIB),  # with fp32 accumulation
}


def gpu_named(name):
    """The GPUS entry whose name is in `name` (a device name such as "NVIDIA H100 80GB HBM3"), or None."""
    key = name.upper().replace("GEFORCE ", "")
    for gpu in GPUS:  # L40S before L4, so that an L40S is not taken for an L4
        if gpu.upper() in key:
            return gpu
    return None


def peak_flops(device="cpu", dtype=torch.float32):
    """(FLOP/s, where the figure comes from): on a GPU in GPUS computing in bf16, its datasheet peak; else the
    measured peak of an n x n matmul on the spot (on a large GPU far below its datasheet, so MFU would read high)."""
    if str(device).startswith("cuda") and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(torch.device(device))
        gpu = gpu_named(name)
        if gpu:
            return GPUS[gpu][0], f"{gpu} datasheet bf16 peak"
    return matmul_peak_flops(device, dtype), "measured matmul peak"


@functools.cache  # once a process: `nanoseek run` asks before it starts (the plan) and at every training stage
def matmul_peak_flops(device="cpu", dtype=torch.float32, n=1024, reps=10, budget_s=0.5):
    """Measured peak of this machine: best FLOP/s of an n x n matmul. The size starts at 128 and doubles up to n
    while `reps` matmuls of the next size fit in budget_s, so a slow dtype (bfloat16 emulated on a CPU) is
    measured in a second, not in minutes."""
    size = 128
    while True:
        seconds = matmul_seconds(device, dtype, size, 2)
        if size >= n or min(seconds) * reps * 8 > budget_s:
            break
        size *= 2
    return 2 * size**3 / min(seconds + matmul_seconds(device, dtype, size, reps))


def matmul_seconds(device, dtype, n, reps):
    """Seconds each of `reps` n x n matmuls took."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    seconds = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        seconds.append(time.perf_counter() - t)
    return seconds


@functools.cache
def fast_bfloat16(device_type):
    """Whether bfloat16 matmuls run at float32's speed or better: on a GPU, and on a CPU with bfloat16 units
    (AVX512-BF16 or AMX, as Linux lists them). Other CPUs emulate them, ~25x slower than float32 on a 2-core AVX2
    machine (docs/BENCHMARKS.md)."""
    if device_type != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no way to tell, so the safe choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

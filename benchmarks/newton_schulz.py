"""Muon's Newton-Schulz iteration in bfloat16 (the reference Muon's choice) against float32, on the hidden
matrices of a model size, one optimizer step's worth. A CPU without bfloat16 units (no AVX512-BF16 or AMX)
emulates bfloat16 matmuls; optim.newton_schulz then runs in float32 (hardware.fast_bfloat16 decides).
Prints seconds per step for each dtype, median of several timings, and the ratio last.

Usage: python benchmarks/newton_schulz.py [--size 4] [--repeats 3]
"""

import argparse
import statistics
import time

import torch

from nanoseek.hardware import fast_bfloat16
from nanoseek.model import DeepSeekV3, config_for_size
from nanoseek.optim import NS_COEFFICIENTS, NS_STEPS


def iterate(g, dtype):
    """The iteration of optim.newton_schulz, in the dtype given."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    x = x.mT if x.shape[-2] > x.shape[-1] else x
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def seconds(matrices, dtype, repeats):
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for g in matrices:
            iterate(g, dtype)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = DeepSeekV3(config_for_size(args.size, vocab_size=1024))
    matrices = [p.detach() for name, p in model.named_parameters() if p.dim() >= 2 and "embed" not in name
                and "lm_head" not in name and "gate.weight" not in name]
    print(f"size {args.size}: {len(matrices)} hidden matrices; {torch.get_num_threads()} threads; "
          f"fast bfloat16 here: {fast_bfloat16('cpu')}")
    bf16, fp32 = (seconds(matrices, dtype, args.repeats) for dtype in (torch.bfloat16, torch.float32))
    print(f"bfloat16: {bf16:.3f} s a step; float32: {fp32:.3f} s a step")
    print(f"speedup vs bfloat16: {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()

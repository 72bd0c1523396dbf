"""The three ways an MoE layer runs its routed experts at inference, timed on one layer of a model size:
sorted (one grouped matmul, what training and eager inference run), gathered (each token through copies of
its k experts' weights) and dense (every token through every expert, weighted by its routing weight), eager
and under torch.compile, for several token counts. A compiled decode step runs gathered for a handful of
tokens known when compiling (N k <= E: one sequence's step) and dense for more (model.MoE.forward).
Prints microseconds per call, median of several timings.

Usage: python benchmarks/moe_paths.py [--size 4] [--tokens 1 4 16 64 128 512]
"""

import argparse
import statistics
import time

import torch

from nanoseek.model import DeepSeekV3, config_for_size

PATHS = ("sorted", "gathered", "dense")


def run(moe, path, x):
    weights, experts, _ = moe.gate(x)
    if path == "sorted":
        return moe.sorted_experts(x, weights, experts)[0]
    return getattr(moe, f"{path}_experts")(x, weights, experts)


def microseconds(fn, x, calls):
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 128, 512])
    args = p.parse_args()
    cfg = config_for_size(args.size)
    moe = DeepSeekV3(cfg).init_weights(0).moe_layers()[0].eval()
    print(f"size {args.size}: {cfg.n_routed_experts} routed experts, top {cfg.num_experts_per_tok}, width "
          f"{cfg.hidden_size}, expert width {cfg.moe_intermediate_size}; {torch.get_num_threads()} threads, "
          "microseconds per call")
    print(f"{'tokens':>6}  " + "  ".join(f"{'eager ' + p:>15}" for p in PATHS) + "  " +
          "  ".join(f"{'compiled ' + p:>18}" for p in PATHS[1:]))
    with torch.no_grad():
        for n in args.tokens:
            x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(n))
            calls = max(5, 2000 // n)
            eager = [microseconds(lambda x, p=p: run(moe, p, x), x, calls) for p in PATHS]
            compiled = []
            for path in PATHS[1:]:
                torch._dynamo.reset()  # a graph of its own for every path and size
                compiled.append(microseconds(torch.compile(lambda x, p=path: run(moe, p, x), dynamic=False), x, calls))
            print(f"{n:>6}  " + "  ".join(f"{t:>15.0f}" for t in eager) + "  " +
                  "  ".join(f"{t:>18.0f}" for t in compiled))


if __name__ == "__main__":
    main()

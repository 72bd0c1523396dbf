"""The engine's compiled steps timed alone, per call: the plain decode step for 1 and 16 sequences and the
speculative step (MTP draft and verification of [newest, draft]) for one, over a cache of --length
positions, on a checkpoint's weights; for one sequence both under torch.compile and compiled ahead of time
(aot.AotStep, what an engine of one sequence on a CPU runs). What a decode step costs without the engine's
Python around it; run it with PYTHONPATH pointing at another checkout to compare two versions on one machine.

Usage: python benchmarks/decode_steps.py CKPT [--length 194] [--rounds 7]
"""

import argparse
import statistics
import time

import torch

from nanoseek.aot import AotStep
from nanoseek.checkpoint import load
from nanoseek.kv_cache import LatentCache
from nanoseek.speculation import speculative_step
from nanoseek.steps import compile_options, decode_step


def milliseconds(call, calls, rounds):
    for _ in range(10):
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls)
    return 1e3 * statistics.median(times)


def caches(cfg, layers, slots, length):
    cache = LatentCache(layers, slots, length, cfg.kv_lora_rank, cfg.qk_rope_head_dim, torch.float32, "cpu")
    cache.reserve(length)
    return cache


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--length", type=int, default=194, help="cache positions (bench decode's: 64 + 128 + 2)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    model = load(args.ckpt)[0].float().eval()
    cfg, options = model.config, compile_options(torch.device("cpu"))
    plain, spec = torch.compile(decode_step, **options), torch.compile(speculative_step, **options)
    ahead = {"decode": AotStep(decode_step, model, plain), "speculative": AotStep(speculative_step, model, spec)}
    start = args.length - 40  # the newest token's position
    with torch.no_grad():
        for batch in (1, 16):
            cache = caches(cfg, cfg.num_hidden_layers, batch, args.length)
            ints = torch.stack([torch.randint(3, cfg.vocab_size, (batch,)), torch.full((batch,), start),
                                torch.arange(batch)], 1)  # token, position, slot
            if batch > 1:  # as the engine marks it: one graph for any batch of more than one
                torch._dynamo.maybe_mark_dynamic(ints, 0)
            for how, step in [("torch.compile", plain)] + ([("ahead of time", ahead["decode"])] if batch == 1 else []):
                ms = milliseconds(lambda: step(model, ints, cache.latent, cache.rope),  # noqa: B023
                                  max(10, 200 // batch), args.rounds)
                print(f"decode step, {batch:>2} sequence(s), {how}: {ms:.3f} ms a call", flush=True)
        main_cache, draft = caches(cfg, cfg.num_hidden_layers, 1, args.length), caches(cfg, 1, 1, args.length)
        one = torch.tensor
        inputs = (torch.randn(1, 2, cfg.hidden_size), one([[5, 6]]), one([start - 2]), one([1]), one([7]), one([start]),
                  one([0]), (main_cache.latent, main_cache.rope), (draft.latent[0], draft.rope[0]))
        for how, step in (("torch.compile", spec), ("ahead of time", ahead["speculative"])):
            ms = milliseconds(lambda: step(model, *inputs), 200, args.rounds)  # noqa: B023
            print(f"speculative step, 1 sequence, {how}: {ms:.3f} ms a call (two tokens when the draft stands)")


if __name__ == "__main__":
    main()

"""One request at a time in a 16-slot engine (what `nanoseek serve` decodes for a lone user), greedy, 128
new tokens after a 64-token random prompt: with torch.compile's one-sequence graph or a package compiled ahead
of time (Engine(ahead_of_time=True), the server's), run from the main thread or from a second thread while
the main one waits. torch's OpenMP threads belong to the thread that first ran parallel work; kernels run
from another thread make a second team, which libgomp wakes slowly when the threads outnumber the cores.

Usage: python benchmarks/engine_thread.py CKPT [--requests 10] [--rounds 3]
"""

import argparse
import statistics
import threading
import time

import torch

from nanoseek.checkpoint import load
from nanoseek.engine import Engine
from nanoseek.sampling import SamplingParams


def tokens_per_second(engine, prompt, requests):
    params = SamplingParams(max_tokens=128, temperature=0)
    start = time.perf_counter()
    for _ in range(requests):
        engine.generate([prompt], params)
    return requests * params.max_tokens / (time.perf_counter() - start)


def in_a_thread(measure):
    result = []
    thread = threading.Thread(target=lambda: result.append(measure()))
    thread.start()
    thread.join()
    return result[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = load(args.ckpt)[0].float().eval()
    prompt = torch.randint(3, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    for ahead_of_time in (False, True):
        engine = Engine(model, None, max_batch=16, ahead_of_time=ahead_of_time)
        engine.stop_ids = set()  # decode exactly 128 tokens

        def measure():
            with torch.no_grad():
                return tokens_per_second(engine, prompt, args.requests)  # noqa: B023

        measure()  # warm-up
        step = "ahead of time" if ahead_of_time else "torch.compile"
        main_thread = [round(measure()) for _ in range(args.rounds)]
        other_thread = [round(in_a_thread(measure)) for _ in range(args.rounds)]
        print(f"{step}: main thread {main_thread} tok/s, a second thread {other_thread} tok/s")
        ratio = statistics.median(main_thread) / statistics.median(other_thread)
    print(f"speedup of the main thread over a second thread (ahead of time): {ratio:.2f}")


if __name__ == "__main__":
    main()

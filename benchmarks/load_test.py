"""Load test of `nanoseek serve` on loopback: many concurrent streaming clients, bounded requests.

    python benchmarks/load_test.py [--ckpt DIR] [--clients 64] [--requests 2] [--max-tokens 32]
    python benchmarks/load_test.py --prefill 16 [--size 6]

Prints requests served, errors, p50/p99 time to first token, total tokens/s, and then shows that
clients which disconnect mid-stream free their slots (the queue drains to zero). With --prefill N, the
engine alone prefills N prompts that each fill the context, in chunks and in one forward, and prints the
time and peak memory of each (Linux: reads /proc).
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import httpx
import uvicorn

from nanoseek import checkpoint
from nanoseek.engine import Engine
from nanoseek.model import DeepSeekV3, config_for_size
from nanoseek.sampling import SamplingParams
from nanoseek.serve import create_app, uvicorn_config
from nanoseek.tokenizer import train_tokenizer


def start(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port))  # the limits `nanoseek serve` runs with
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current size


def rss_mib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


class HealthProbe(threading.Thread):
    """Asks /health every 50 ms until stopped; `worst` is its slowest answer in seconds."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.worst, self.done = url, 0.0, threading.Event()

    def run(self):
        with httpx.Client(timeout=120) as http:
            while True:
                t0 = time.perf_counter()
                http.get(self.url + "/health")
                self.worst = max(self.worst, time.perf_counter() - t0)
                if self.done.wait(0.05):
                    return

    def stop(self):
        self.done.set()
        self.join(130)
        return self.worst


def prefill(n, size):
    """Prefill n prompts that each fill the context, in chunks and in one forward: time and peak memory."""
    tok = train_tokenizer([f"{a} + {b} = {a + b}" for a in range(200) for b in range(50)], 512)
    engine = Engine(DeepSeekV3(config_for_size(size, vocab_size=512)).init_weights(0), tok, max_batch=n)
    prompts = [[(7 * i + j) % 500 + 5 for j in range(engine.max_len - 1)] for i in range(n)]
    print(f"prefill: {n} prompts x {engine.max_len - 1} tokens, size {size}, {os.cpu_count()} CPU cores")
    for label, tokens in ((f"chunks of {Engine.prefill_tokens} tokens", Engine.prefill_tokens), ("one forward", 10**9)):
        engine.prefill_tokens = tokens
        reset_peak_rss()
        before, t0 = rss_mib("VmRSS"), time.perf_counter()
        for seq in engine.add(prompts, SamplingParams(max_tokens=1)):
            engine.abort(seq.id)
        print(f"  {label}: {time.perf_counter() - t0:.1f} s, peak memory +{rss_mib('VmHWM') - before:.0f} MiB "
              f"over {before:.0f} MiB")


async def one_request(client, url, i, max_tokens):
    body = {"model": "load", "stream": True, "max_tokens": max_tokens, "temperature": 1.0, "seed": i,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"What is {i} + {i % 7}?"}]}
    t0, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            if first is None and (delta.get("content") or delta.get("reasoning_content")):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - t0, tokens


async def load(url, clients, requests, max_tokens):
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker(c):
            out = []
            for j in range(requests):
                try:
                    out.append(await one_request(client, url, c * requests + j, max_tokens))
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    out.append(e)
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        return results, time.perf_counter() - t0


async def disconnects(url, clients, max_tokens):
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients + 8)) as client:
        async def leave(i):
            body = {"model": "load", "stream": True, "max_tokens": max_tokens, "temperature": 1.0, "seed": i,
                    "messages": [{"role": "user", "content": "count"}]}
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    break  # go away after the first chunk

        await asyncio.gather(*(leave(i) for i in range(clients)))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", help="checkpoint to serve (default: a random test-size model)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, help="measure one request of this many full-context prompts instead")
    p.add_argument("--size", type=int, default=6, help="--prefill: size of the random model")
    args = p.parse_args()
    if args.prefill:
        return prefill(args.prefill, args.size)
    if args.ckpt:
        model, tok = checkpoint.load(args.ckpt)
    else:
        tok = train_tokenizer([f"{a} + {b} = {a + b}" for a in range(200) for b in range(50)], 512)
        model = DeepSeekV3(config_for_size(2)).init_weights(0)
    engine = Engine(model, tok, max_batch=args.clients)
    engine.stop_ids = set() if not args.ckpt else engine.stop_ids  # random weights: run to max_tokens
    url, server = start(create_app(engine, "load"))
    results, seconds = asyncio.run(load(url, args.clients, args.requests, args.max_tokens))
    errors = [r for r in results if isinstance(r, Exception)]
    ok = [r for r in results if not isinstance(r, Exception)]
    ttft = sorted(r[0] for r in ok)
    tokens = sum(r[1] for r in ok)
    print(f"load test: {args.clients} concurrent streaming clients x {args.requests} requests, "
          f"{args.max_tokens} max tokens, {os.cpu_count()} CPU cores")
    print(f"requests served: {len(ok)} / {len(results)}, errors: {len(errors)}")
    if ok:
        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
        print(f"time to first token: p50 {1000 * statistics.median(ttft):.0f} ms, p99 {1000 * p99:.0f} ms")
        print(f"throughput: {tokens / seconds:.0f} generated tokens/s over {seconds:.1f} s ({tokens} tokens)")
    for e in errors[:5]:
        print("error:", e)
    asyncio.run(disconnects(url, args.clients, 10_000))
    t0, load_now = time.time(), None
    while time.time() - t0 < 30:
        load_now = httpx.get(url + "/health").json()
        if load_now["running"] == 0 and load_now["reserved"] == 0:
            break
        time.sleep(0.1)
    print(f"{args.clients} clients disconnected mid-stream; {time.time() - t0:.1f} s later the server holds "
          f"{load_now['running']} running and {load_now['reserved']} reserved sequences")
    server.should_exit = True
    sys.exit(1 if errors or load_now["running"] or load_now["reserved"] else 0)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()

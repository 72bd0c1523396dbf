"""`nanoseek bench serve`: nanoseek's server against llama.cpp's own llama-server on the same checkpoint (its
GGUF f32 export), both driven over HTTP with the same OpenAI chat requests (held-out problems of the
checkpoint's tasks, greedy), one at a time and several at once, the two servers taking turns."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from nanoseek import checkpoint
from nanoseek.bench.common import compare, held_out_conversations, interleaved, spread_text
from nanoseek.bench.llama_cpp import native_llama_tools

START_SECONDS = 300  # a server's first start compiles its steps (nanoseek) or loads the model: minutes at most


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(command, url, log):
    """A server process started with command, its output going to log; yields once url/health answers 200, and
    is stopped on leaving. Raises with the log's last lines if it exits or does not answer within
    START_SECONDS."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log) as f:
                    tail = "".join(f.readlines()[-10:])
                raise RuntimeError(f"{os.path.basename(command[0])} did not start; its log ({log}) ends:\n{tail}")
            time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url):
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def model_id(url):
    """The model a server serves (its first in /v1/models)."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def ask(url, model, messages, max_tokens):
    """One greedy chat completion -> ((its thinking, its answer), its completion tokens); surrounding
    whitespace aside, as servers split the thinking differently (llama-server keeps its last newline)."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        reply = json.load(r)
    message = reply["choices"][0]["message"]
    text = ((message.get("reasoning_content") or "").strip(), (message.get("content") or "").strip())
    return text, reply["usage"]["completion_tokens"]


def load(url, conversations, at_once, max_tokens):
    """Every conversation asked, `at_once` requests in flight -> (completion tokens a second, the replies)."""
    model = model_id(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        replies = list(pool.map(lambda m: ask(url, model, m, max_tokens), conversations))
    return sum(n for _, n in replies) / (time.perf_counter() - start), replies


def bench_serve(ckpt, at_once=(1, 8), tasks=("addition", "countdown"), n=16, difficulty=3, max_tokens=128,
                rounds=3):
    """Completion tokens a second of nanoseek serve and llama-server, both on localhost with the checkpoint,
    for the n held-out problems of each task asked `at_once` at a time, over `rounds` rounds taking turns.
    Both with torch's threads (one a core), as many slots as requests at once at most; llama-server with a
    float32 KV cache (nanoseek's) and the GGUF's own chat template (--jinja)."""
    from nanoseek.export import export_gguf

    tools = native_llama_tools()
    _, tokenizer = checkpoint.load(ckpt)
    if tokenizer is None:
        raise ValueError(f"{ckpt} has no tokenizer; benchmark a checkpoint made by nanoseek")
    conversations = held_out_conversations(tasks, n, difficulty)
    slots, threads = max(at_once), torch.get_num_threads()
    out = {"ckpt": str(ckpt), "tasks": list(tasks), "requests": len(conversations), "max_tokens": max_tokens,
           "rounds": rounds, "threads": threads, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = os.path.join(tmp, "model.gguf")
        export_gguf(ckpt, gguf, dtype="f32")
        ours, theirs = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        context = slots * (max(len(tokenizer.render_chat(m, True)[0]) for m in conversations) + max_tokens + 8)
        ours_command = [sys.executable, "-m", "nanoseek", "serve", str(ckpt), "--port", ours.rsplit(":", 1)[1],
                        "--max-batch", str(slots), "--threads", str(threads)]
        theirs_command = [tools["llama-server"], "-m", gguf, "--port", theirs.rsplit(":", 1)[1], "-t", str(threads),
                          "-np", str(slots), "-c", str(context), "-ctk", "f32", "-ctv", "f32", "--jinja"]
        with running(ours_command, ours, os.path.join(tmp, "nanoseek.log")), \
                running(theirs_command, theirs, os.path.join(tmp, "llama-server.log")):
            for k in at_once:
                out["runs"].append({"at_once": k, **serve_rounds(ours, theirs, conversations, k, max_tokens, rounds)})
    return out


def serve_rounds(ours, theirs, conversations, at_once, max_tokens, rounds):
    """The two servers (urls) in turn, after a warm-up: each side's completion tok/s a round (median, range),
    the ratio of the medians, and how many replies were the same text on both."""
    for url in (ours, theirs):  # the first requests of a size compile or allocate what it needs
        load(url, conversations[: 2 * at_once], at_once, max_tokens)
    replies = {}

    def side(url, name):
        def measure():
            rate, replies[name] = load(url, conversations, at_once, max_tokens)
            return rate
        return measure

    figures = interleaved({"nanoseek": side(ours, "nanoseek"), "llama.cpp": side(theirs, "llama.cpp")}, rounds)
    same = sum(a == b for a, b in zip(replies["nanoseek"], replies["llama.cpp"]))
    return {"same_replies": same, **compare(figures["nanoseek"], figures["llama.cpp"])}


def print_serve(r):
    print(f"bench serve: {r['ckpt']}, {r['requests']} held-out {' and '.join(r['tasks'])} problems as chat "
          f"requests, greedy, up to {r['max_tokens']} tokens; nanoseek serve against llama-server, {r['threads']} "
          f"threads each; completion tok/s, median (min-max) of {r['rounds']} rounds taking turns:")
    for row in r["runs"]:
        print(f"{row['at_once']:>3} at a time:  nanoseek {spread_text(row['nanoseek'])}   llama-server "
              f"{spread_text(row['llama.cpp'])}   same replies: {row['same_replies']} of {r['requests']}")
    for row in r["runs"]:
        print(f"speedup vs llama.cpp ({row['at_once']} at a time): {row['speedup']:.2f}")

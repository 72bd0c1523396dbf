"""Fuzz the OpenAI-compatible API with schemathesis against its own /openapi.json, then attack it by hand.

    python benchmarks/fuzz_api.py [--max-examples 100] [--attacks-only]

Starts `nanoseek serve` in-process on loopback (a random test-size model, an API key), runs schemathesis
with checks for server errors (5xx) and conformance of status codes, content types and response bodies
to the schema, and prints how many cases it tried and what failed. Then, against a 4-slot server without
a key, the hand-made attacks schemathesis cannot make: a seed that overflows the generator, a 40 MiB
chunked body, a false Content-Length beside chunked framing, and text that is not valid Unicode; for each
it prints the answer and what it cost the server (body bytes read, peak memory, slowest /health).
"""

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from load_test import HealthProbe, reset_peak_rss, rss_mib, start  # noqa: E402

from nanoseek.engine import Engine  # noqa: E402
from nanoseek.model import DeepSeekV3, config_for_size  # noqa: E402
from nanoseek.serve import create_app  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-examples", type=int, default=100, help="cases per operation and phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacks-only", action="store_true", help="skip schemathesis")
    args = p.parse_args()
    tok = train_tokenizer([f"{a} + {b} = {a + b}" for a in range(100) for b in range(30)], 400)
    code = 0 if args.attacks_only else schemathesis(tok, args.max_examples, args.seed)
    sys.exit(code or attacks(tok))


def schemathesis(tok, max_examples, seed):
    model = DeepSeekV3(config_for_size(2, vocab_size=448)).init_weights(0)
    url, server = start(create_app(Engine(model, tok, max_batch=8, max_len=128), "fuzz", api_key="fuzz-key",
                                   max_body_bytes=64_000))
    st = os.path.join(os.path.dirname(sys.executable), "st")
    cmd = [st if os.path.exists(st) else "st", "run", f"{url}/openapi.json", "-H", "Authorization: Bearer fuzz-key",
           "--checks", CHECKS,
           "--max-examples", str(max_examples), "--seed", str(seed), "--no-color",
           "--request-timeout", "60", "--suppress-health-check", "all"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    print(result.stdout[-6000:])
    cases = re.findall(r"(\d+) generated", result.stdout)
    print(f"fuzz: schemathesis exit code {result.returncode}; cases: {', '.join(cases) or 'see above'}")
    server.should_exit = True
    return result.returncode


class BodyBytes:
    """ASGI wrapper: counts the request body bytes the app has taken from uvicorn."""

    def __init__(self, app):
        self.app, self.read = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def exchange(url, head, chunks=(), timeout=60):
    """Send a request head and body chunks on a raw socket while reading the answer; returns the answer's
    head (b"" if the server closed without one) and how many body bytes went out."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sent, stop = [0], threading.Event()

    def send():
        with contextlib.suppress(OSError):
            sock.sendall(head)
            for chunk in chunks:
                if stop.is_set():
                    break
                sock.sendall(chunk)
                sent[0] += len(chunk)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answer = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in answer and (data := sock.recv(65536)):
            answer += data
    stop.set()
    sock.close()
    sender.join(timeout)
    return answer.split(b"\r\n\r\n")[0], sent[0]


def raw_post(url, headers, chunks):
    """POST /v1/completions on a raw socket with these extra headers; the status code (0 if the server closed
    without one) and the body bytes sent."""
    head, sent = exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Type: application/json\r\n" + headers + b"\r\n", chunks)
    return int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0, sent


def chunked(total, size=1 << 16):
    for _ in range(total // size):
        yield b"%x\r\n" % size + b"x" * size + b"\r\n"
    yield b"0\r\n\r\n"


def attacks(tok):
    """The attacks of issue 18 on a 4-slot server without a key; returns 1 if any did harm."""
    engine = Engine(DeepSeekV3(config_for_size(2, vocab_size=448)).init_weights(0), tok, max_batch=4)
    engine.stop_ids = set()
    counter = BodyBytes(create_app(engine, "attack"))
    url, server = start(counter)
    http, harm = httpx.Client(timeout=120), []

    def cost(label, fn):
        counter.read = 0
        reset_peak_rss()
        before, probe = rss_mib("VmRSS"), HealthProbe(url)
        probe.start()
        result = fn()
        worst = probe.stop()
        print(f"attack {label}: {result}; the app read {counter.read / 2**20:.2f} MiB of body, peak memory "
              f"+{rss_mib('VmHWM') - before:.0f} MiB, slowest /health {1000 * worst:.0f} ms")

    leak = {"model": "attack", "prompt": "hi", "seed": 18446744073709551614, "n": 4, "max_tokens": 4, "stream": True}
    statuses = [http.post(url + "/v1/completions", json=leak).status_code for _ in range(100)]
    load = http.get(url + "/health").json()
    full = http.post(url + "/v1/completions", json={**leak, "seed": 2**63 - 1, "stream": False})
    print(f"attack seed: 100 x {json.dumps(leak)} -> HTTP {sorted(set(statuses))}; then /health: {load['free']} of "
          f"{load['slots']} slots free, and a full-width request (n=4) -> HTTP {full.status_code}")
    harm += [load["free"] != 4 or full.status_code != 200]

    def chunked_body():
        status, sent = raw_post(url, b"Transfer-Encoding: chunked\r\n", chunked(40 << 20))
        harm.append(status != 413)
        return f"HTTP {status} after the client sent {sent / 2**20:.1f} of 40 MiB"

    def false_length():
        status, sent = raw_post(url, b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n", chunked(40 << 20))
        harm.append(status != 400)
        return f"HTTP {status} after the client sent {sent / 2**20:.1f} of 40 MiB"

    def big_prompt():  # 1 MB of text to tokenize, then refused: it is over the context
        r = http.post(url + "/v1/completions", json={"model": "attack", "prompt": "12 + 34 = 46. " * 70_000})
        return f"HTTP {r.status_code} ({r.json()['error']['code']})"

    cost("40 MiB chunked body", chunked_body)
    cost("Content-Length: 10 beside chunked", false_length)
    cost("a 1 MB prompt", big_prompt)
    unicode = {"reasoning_content": ("/v1/chat/completions", {"messages": [
                   {"role": "assistant", "content": "a", "reasoning_content": "\ud800"},
                   {"role": "user", "content": "hi"}]}),
               "prompt": ("/v1/completions", {"prompt": "hi \udfff"}),
               "stop": ("/v1/completions", {"prompt": "hi", "stop": ["\ud83d"]})}
    for field, (path, body) in unicode.items():
        r = http.post(url + path, content=json.dumps({"model": "attack", "max_tokens": 4, **body}),
                      headers={"Content-Type": "application/json"})
        print(f"attack lone surrogate in {field}: HTTP {r.status_code}, {r.json()['error']['message']!r}")
        harm.append(r.status_code != 400)
    load = http.get(url + "/health").json()
    print(f"after the attacks: {load['free']} of {load['slots']} slots free, {load['running']} running, "
          f"{load['reserved']} reserved")
    server.should_exit = True
    return int(any(harm) or load["free"] != 4)


if __name__ == "__main__":
    main()

"""Attacks on `nanoseek serve` on loopback, against a 4-slot server run with the production uvicorn
settings (`uvicorn_config`): each must be refused cleanly and leave every slot free."""

import contextlib
import json
import os
import socket
import sys
import threading
import time

import httpx
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from fuzz_api import BodyBytes, chunked, raw_post  # noqa: E402  the attacks the benchmark also makes

from nanoseek.engine import Engine
from nanoseek.model import DeepSeekV3, config_for_size
from nanoseek.serve import allowed_hosts, create_app, uvicorn_config

SLOTS = 4
ASK = [{"role": "user", "content": "What is 12 + 30?"}]
CHAT = {"model": "endless", "messages": ASK, "max_tokens": 4, "temperature": 0, "repetition_stop": 0}
COMPLETE = {"model": "endless", "prompt": "hi", "max_tokens": 4, "temperature": 0, "repetition_stop": 0}


def endless_engine(tokenizer):
    """A random model whose output runs to max_tokens (no end-of-sequence token)."""
    engine = Engine(DeepSeekV3(config_for_size(2, vocab_size=448)).init_weights(0), tokenizer, max_batch=SLOTS)
    engine.stop_ids = set()
    return engine


@contextlib.contextmanager
def serving(app, **limits):
    """`app` under uvicorn with nanoseek's settings on a free loopback port; yields the base url."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, **limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def attacked(tokenizer):
    """(url, engine, body counter) of a 4-slot server without a key on loopback; heads and bodies have 2 s."""
    engine = endless_engine(tokenizer)
    counter = BodyBytes(create_app(engine, "endless", body_timeout=2))
    with serving(counter, header_timeout=2) as url:
        yield url, engine, counter


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def post_raw(url, path, body):
    """POST a JSON body as Python writes it, lone surrogates escaped (httpx cannot encode them)."""
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=60,
                      headers={"Content-Type": "application/json"})


def wait_idle(url):
    """The server's load once nothing runs or is reserved (at most 30 s)."""
    deadline = time.time() + 30
    while True:
        load = httpx.get(url + "/health", timeout=10).json()
        if (load["running"] == 0 and load["reserved"] == 0) or time.time() > deadline:
            return load
        time.sleep(0.05)


def fail_once(fn):
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return fn(*a, **kw)

    return failing


def test_the_slot_leak_request_leaves_every_slot_free(attacked):
    url, _, _ = attacked
    attack = {**COMPLETE, "seed": 18446744073709551614, "n": SLOTS, "stream": True}
    with httpx.Client(timeout=60) as http:
        for _ in range(100):
            r = http.post(url + "/v1/completions", json=attack)
            assert r.status_code == 422 and r.json()["error"]["param"] == "seed"
        assert wait_idle(url)["free"] == SLOTS
        edge = http.post(url + "/v1/completions", json={**attack, "seed": 2**63 - 1, "stream": False})
    assert edge.status_code == 200 and len(edge.json()["choices"]) == SLOTS  # a full-width request is served


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_admission_releases_its_slots(attacked, monkeypatch, stream):
    url, engine, _ = attacked
    monkeypatch.setattr(engine, "_forward", fail_once(engine._forward))  # the prefill fails
    r = post(url, "/v1/completions", {**COMPLETE, "n": SLOTS, "stream": stream})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert wait_idle(url)["free"] == SLOTS
    r = post(url, "/v1/completions", {**COMPLETE, "n": SLOTS})
    assert r.status_code == 200 and len(r.json()["choices"]) == SLOTS


def test_a_streamed_error_is_typed_and_ends_with_done(attacked, monkeypatch):
    url, engine, _ = attacked
    monkeypatch.setattr(engine, "step", fail_once(engine.step))  # generation fails after admission
    r = post(url, "/v1/chat/completions", {**CHAT, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    assert wait_idle(url)["free"] == SLOTS


def test_a_chunked_body_is_refused_within_the_limit(attacked):
    url, _, counter = attacked
    counter.read = 0
    status, sent = raw_post(url, b"Transfer-Encoding: chunked\r\n", chunked(40 << 20))
    assert status == 413
    assert counter.read <= 2 << 20 and sent < 40 << 20  # about the 1 MiB limit, not the 40 MB sent at it
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_small_content_length_beside_chunked_is_refused(attacked):
    url, _, counter = attacked
    counter.read = 0
    status, _ = raw_post(url, b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n", chunked(40 << 20))
    assert status == 400 and counter.read <= 2 << 20


def test_half_sent_requests_are_closed(attacked):
    url, _, _ = attacked
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # 30 s: far past the 2 s deadline
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and the rest never comes
        assert s.recv(1024) == b""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\": ")
        assert s.recv(1024).startswith(b"HTTP/1.1 408")


def test_connections_are_capped(tokenizer):
    engine = endless_engine(tokenizer)
    body = {**CHAT, "model": "capped", "stream": True, "max_tokens": 1500}
    with serving(create_app(engine, "capped"), max_connections=3) as url, httpx.Client(timeout=60) as a, \
            httpx.Client(timeout=60) as b:
        streams = []
        for http in (a, b):  # two connections held open by streams under way
            s = http.stream("POST", url + "/v1/chat/completions", json=body)
            lines = s.__enter__().iter_lines()
            next(lines)
            streams.append((s, lines))
        assert httpx.get(url + "/health", timeout=10).status_code == 503  # the third connection
        for s, _ in streams:
            s.__exit__(None, None, None)
        deadline = time.time() + 30
        while httpx.get(url + "/health", timeout=10).status_code == 503 and time.time() < deadline:
            time.sleep(0.05)
        assert wait_idle(url)["free"] == SLOTS


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(attacked, monkeypatch):
    url, engine, _ = attacked
    admitted = []
    real_add = engine.add
    monkeypatch.setattr(engine, "add", lambda *a: admitted.extend(real_add(*a)) or admitted)
    body = json.dumps({**CHAT, "n": 2, "max_tokens": 2000}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 30
        while httpx.get(url + "/health", timeout=10).json()["running"] < 2 and time.time() < deadline:
            time.sleep(0.05)
    assert wait_idle(url)["free"] == SLOTS
    assert [s.finish_reason for s in admitted] == ["abort", "abort"]  # stopped, not run to max_tokens


def test_tokenizing_leaves_the_event_loop_free(attacked, monkeypatch):
    url, engine, _ = attacked
    entered, release = threading.Event(), threading.Event()
    encode = engine.tokenizer.encode

    def held_encode(text):
        entered.set()
        release.wait(30)
        return encode(text)

    monkeypatch.setattr(engine.tokenizer, "encode", held_encode)
    answers = []
    asking = threading.Thread(target=lambda: answers.append(post(url, "/v1/completions", COMPLETE)))
    asking.start()
    try:
        assert entered.wait(30)
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # served while the tokenizer works
    finally:
        release.set()
        asking.join(60)
    assert answers[0].status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": "a", "reasoning_content": "\ud800"},
                                                   *ASK]}, "messages.0.reasoning_content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x\udfff"}]}, "messages.0.content"),
    ("/v1/completions", {**COMPLETE, "prompt": "hi \ud83d"}, "prompt"),
    ("/v1/completions", {**COMPLETE, "prompt": ["ok", "\udc80"]}, "prompt.1"),
    ("/v1/completions", {**COMPLETE, "stop": ["\ud800"]}, "stop.0"),
])
def test_invalid_unicode_is_a_400(attacked, path, body, param):
    url, _, _ = attacked
    r = post_raw(url, path, body)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["param"] == param and "Unicode" in r.json()["error"]["message"]
    assert wait_idle(url)["free"] == SLOTS


def test_requests_that_can_never_fit_are_400(attacked):
    url, _, _ = attacked
    r = post(url, "/v1/chat/completions", {**CHAT, "n": SLOTS + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "at most 4" in r.json()["error"]["message"]
    r = post(url, "/v1/completions", {**COMPLETE, "prompt": ["a", "b", "c"], "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_only_loopback_host_names_without_a_key(attacked):
    url, _, _ = attacked
    port = url.rsplit(":", 1)[1]
    rebound = httpx.get(url + "/v1/models", headers={"Host": f"evil.example:{port}"}, timeout=10)
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    for name in ("localhost", "127.0.0.1", "LOCALHOST"):
        assert httpx.get(url + "/v1/models", headers={"Host": f"{name}:{port}"}, timeout=10).status_code == 200
    assert allowed_hosts("0.0.0.0", None) is None and allowed_hosts("127.0.0.1", "key") is None
    assert "[::1]" in allowed_hosts("::1", None) and "127.0.0.2" in allowed_hosts("127.0.0.2", None)


@pytest.mark.parametrize("field, value", [("logprobs", True), ("top_logprobs", 2), ("response_format",
                         {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("tool_choice", "auto"), ("logit_bias", {"5": 10}), ("presence_penalty", 0.5)])
def test_unsupported_fields_are_refused_by_name(attacked, field, value):
    url, _, _ = attacked
    r = post(url, "/v1/chat/completions", {**CHAT, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_fields_at_their_defaults_and_bookkeeping_are_accepted(attacked):
    url, _, _ = attacked
    r = post(url, "/v1/chat/completions", {**CHAT, "logprobs": False, "tools": [], "presence_penalty": 0,
                                           "user": "u-1", "metadata": {"k": "v"}})
    assert r.status_code == 200


def test_a_context_error_names_the_prompt(attacked):
    url, _, _ = attacked
    r = post(url, "/v1/completions", {**COMPLETE, "prompt": "1 + 1 " * 3000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_text_too_long_for_the_context_is_refused_untokenized(attacked, monkeypatch):
    url, engine, _ = attacked
    monkeypatch.setattr(engine.tokenizer, "encode", fail_once(engine.tokenizer.encode))  # must not be reached
    r = post(url, "/v1/completions", {**COMPLETE, "prompt": "12 + 34 = 46. " * 60_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "bytes" in r.json()["error"]["message"]
    r = post(url, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi " * 300_000}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_trim_history_tokenizes_no_more_than_can_fit(attacked, monkeypatch):
    """trim_history over 0.75 MB of history renders a few of its newest parts, none longer by its bytes than the
    context can hold; a last message too long by its bytes alone is refused untokenized."""
    url, engine, _ = attacked
    tokenized = []  # bytes of each batch the tokenizer encodes
    encode_batch = engine.tokenizer.encode_batch
    monkeypatch.setattr(engine.tokenizer, "encode_batch",
                        lambda texts: tokenized.append(sum(len(t.encode()) for t in texts)) or encode_batch(texts))
    history = [m for i in range(8000) for m in ({"role": "user", "content": f"What is {i} + 12?"},
                                                {"role": "assistant", "content": str(i + 12)})]
    r = post(url, "/v1/chat/completions", {**CHAT, "messages": history + ASK, "trim_history": True})
    assert r.status_code == 200 and 7000 < r.json()["usage"]["dropped_turns"] < 8000
    assert len(tokenized) <= 16 and max(tokenized) <= 2048 * engine.tokenizer.max_token_bytes
    tokenized.clear()
    huge = history[:10] + [{"role": "user", "content": "hi " * 300_000}]
    r = post(url, "/v1/chat/completions", {**CHAT, "messages": huge, "trim_history": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" and tokenized == []
    assert wait_idle(url)["free"] == SLOTS
